"""/metrics as Prometheus reads it, rendered from facts (no agent, no loop)."""

from __future__ import annotations

import dataclasses

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.health.facts import CONTROL_PLANE_STATES, ControlPlaneFacts, NodeFacts
from agent.health.metrics import AgentCollector, build_registry, render
from agent.jobs.tally import JobTally
from agent.runtime.base import RuntimeInfo

# What an alert rule may name, and the type Prometheus must see it as.
EXPECTED = {
    "cloudbender_control_plane_state": "gauge",
    "cloudbender_last_contact_timestamp_seconds": "gauge",
    "cloudbender_engine_up": "gauge",
    "cloudbender_draining": "gauge",
    "cloudbender_jobs_current": "gauge",
    "cloudbender_jobs": "counter",  # exposed as cloudbender_jobs_total
    "cloudbender_job_duration_seconds": "histogram",
    "cloudbender_result_bytes_sent": "counter",
    "cloudbender_gpu_health": "gauge",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
    "process_open_fds": "gauge",
}


def _scrape(facts: NodeFacts) -> dict[str, Metric]:
    collector = AgentCollector(facts, node_id="n1", version="0.0.0", assess=list)
    text = render(build_registry(collector)).decode()
    return {f.name: f for f in text_string_to_metric_families(text)}


def _values(family: Metric, label: str) -> dict[str, float]:
    return {s.labels[label]: s.value for s in family.samples}


def _connected_facts() -> NodeFacts:
    facts = NodeFacts()
    facts.control_plane = ControlPlaneFacts(
        configured=True, state="connected", last_contact=1_700_000_000.0
    )
    facts.runtime = RuntimeInfo("docker", "27.0", False, True, None)
    return facts


def test_every_metric_an_alert_names_is_there_with_its_type_and_help() -> None:
    """Attack (operational): an alert on `cloudbender_engine_up == 0`, on the job
    counters or on the agent's own memory never fires because the series does not
    exist; each must be exported, typed and documented from the first scrape."""
    families = _scrape(_connected_facts())
    for name, kind in EXPECTED.items():
        assert name in families, name
        assert families[name].type == kind, name
    for name, family in families.items():
        assert family.documentation, f"{name} has no HELP"
    assert families["cloudbender_engine_up"].samples[0].value == 1
    assert families["cloudbender_draining"].samples[0].value == 0
    last = families["cloudbender_last_contact_timestamp_seconds"]
    assert last.samples[0].value == 1_700_000_000.0


@pytest.mark.parametrize("current", CONTROL_PLANE_STATES)
def test_control_plane_state_lists_every_state_with_exactly_one_set(current: str) -> None:
    """Attack (operational): the link drops and `{state="connected"}` vanishes instead of
    turning 0, so `cloudbender_control_plane_state{state="connected"} == 0` never fires
    and nobody is paged for a node that has left the fleet."""
    facts = _connected_facts()
    facts.control_plane = dataclasses.replace(facts.control_plane, state=current)
    states = _values(_scrape(facts)["cloudbender_control_plane_state"], "state")
    assert set(states) == set(CONTROL_PLANE_STATES)
    assert [s for s, v in states.items() if v == 1] == [current]
    assert sum(states.values()) == 1


def test_engine_that_stops_answering_is_engine_up_0() -> None:
    """Attack (operational): the Docker engine dies and the metric an alert reads still
    says 1 (or is gone): the node silently takes no jobs."""
    facts = _connected_facts()
    facts.runtime = RuntimeInfo("docker", None, False, False, "no answer")
    families = _scrape(facts)
    assert families["cloudbender_engine_up"].samples[0].value == 0


def test_ended_jobs_durations_and_bytes_are_counted() -> None:
    """Attack (operational): jobs fail all night (`exit_nonzero`, `container_lost`) and
    nothing a dashboard reads moves: no counter by reason, no duration, no egress."""
    facts = _connected_facts()
    sent = [0]
    facts.tally = JobTally(lambda: sent[0])
    facts.tally.job_ended("succeeded", "completed", 3.0)
    facts.tally.job_ended("failed", "exit_nonzero", 0.5)
    facts.tally.job_ended("failed", "exit_nonzero", 7200.0)
    sent[0] = 4096
    families = _scrape(facts)
    jobs = {
        (s.labels["state"], s.labels["reason"]): s.value
        for s in families["cloudbender_jobs"].samples
        if s.name == "cloudbender_jobs_total"
    }
    assert jobs == {("succeeded", "completed"): 1, ("failed", "exit_nonzero"): 2}
    samples = families["cloudbender_job_duration_seconds"].samples
    failed = {
        s.labels.get("le", s.name.rsplit("_", 1)[1]): s.value
        for s in samples
        if s.labels["state"] == "failed"
    }
    assert (failed["1"], failed["5"], failed["3600"], failed["7200"], failed["+Inf"]) == (
        1,
        1,
        1,
        2,
        2,
    )
    assert (failed["count"], failed["sum"]) == (2, 7200.5)
    timed_out = [s for s in samples if s.labels["state"] == "timed_out"]
    assert timed_out and all(s.value == 0 for s in timed_out)  # there before any job
    sent_total = families["cloudbender_result_bytes_sent"].samples[0]
    assert (sent_total.name, sent_total.value) == ("cloudbender_result_bytes_sent_total", 4096)
