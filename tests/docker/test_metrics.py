"""/metrics after real jobs on the real engine: ended jobs, durations, result bytes."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.jobnode import JobNode

RESULT = b"x" * 5000  # more than one line, less than one chunk


def _samples(node: JobNode) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    code, body = node.agent.get("/metrics")
    assert code == 200
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body.decode())
        for s in family.samples
    }


def test_ended_jobs_their_durations_and_result_bytes_reach_the_metrics(node: JobNode) -> None:
    """Attack (operational): jobs fail on the node all night and results leave it, and
    the administrator's dashboard shows nothing: no count of ended jobs by reason, no
    duration, no egress. A succeeded job with results and a failed one must show in
    `cloudbender_jobs_total`, `cloudbender_job_duration_seconds` and
    `cloudbender_result_bytes_sent_total`, with the engine reported up."""
    before = _samples(node)
    assert before[("cloudbender_result_bytes_sent_total", ())] == 0
    assert before[("cloudbender_engine_up", ())] == 1

    node.assign("j-ok", f"head -c {len(RESULT)} /dev/zero | tr '\\0' x > /opt/output/r.txt")
    node.assign("j-bad", "exit 3")
    assert node.wait_end("j-ok")["state"] == "succeeded"
    assert node.wait_end("j-bad")["reason"] == "exit_nonzero"

    after = _samples(node)
    jobs = "cloudbender_jobs_total"
    assert after[(jobs, (("reason", "completed"), ("state", "succeeded")))] == 1
    assert after[(jobs, (("reason", "exit_nonzero"), ("state", "failed")))] == 1
    duration = "cloudbender_job_duration_seconds"
    for state in ("succeeded", "failed"):
        assert after[(f"{duration}_count", (("state", state),))] == 1
        assert after[(f"{duration}_sum", (("state", state),))] > 0
        assert after[(f"{duration}_bucket", (("le", "+Inf"), ("state", state)))] == 1
    assert after[("cloudbender_result_bytes_sent_total", ())] == len(RESULT)
