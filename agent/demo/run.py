"""Drive the demo: data, model, node, one job, and what a person should see of it.

:func:`run_demo` is the whole demo; ``cloudbender-agent demo`` calls it. Each claim it
prints is checked against its source (the engine's inspect, the control plane's stored
files, the agent's ledger) and a claim that does not hold raises :class:`DemoError`.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from agent.demo import DEMO_IMAGE, DemoError
from agent.demo.dataset import cohort, vitals_csv
from agent.demo.node import DATASTORE, NODE_ID, DemoNode
from agent.demo.report import Steps, human_size, isolation_lines, isolation_problems, sha256_file
from agent.demo.riskmodel import artifact, to_onnx, train

DOCKER_HOST = os.environ.get("DOCKER_HOST", "unix:///var/run/docker.sock")
BUILD_SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "build-demo-image.sh"
PATIENTS = 4000
TRAINING_PATIENTS = 20000
JOB_TIMEOUT_S = 300


@dataclass
class DemoResult:
    """What a caller (the test) needs to check the demo's job from outside."""

    workdir: Path
    job_id: str
    dataset: Path
    model_onnx: Path
    results: dict[str, Path]
    isolation: dict[str, Any]
    timings: list[tuple[str, float]] = field(default_factory=list)


def ensure_image(steps: Steps) -> None:
    """Build the demo image with scripts/build-demo-image.sh when the engine lacks it.
    The script decides whether its recipe changed; here only absence is checked, so an
    installed agent without the repository still runs with an image built elsewhere."""
    from agent.runtime.docker import DockerRuntime

    if DockerRuntime(DOCKER_HOST).image_id(DEMO_IMAGE, None) is not None:
        steps.line(f"{DEMO_IMAGE} is in the local image store (built locally, never pulled)")
        return
    if not BUILD_SCRIPT.is_file():
        raise DemoError(f"{DEMO_IMAGE} is missing; build it with scripts/build-demo-image.sh")
    steps.line(f"{DEMO_IMAGE} is missing: building it ({BUILD_SCRIPT.name}, about a minute)")
    if subprocess.run(["bash", str(BUILD_SCRIPT)], check=False).returncode != 0:
        raise DemoError(f"{BUILD_SCRIPT} failed (its output is above)")


class _EngineWatch(threading.Thread):
    """Reads the job container's isolation back from the engine while it exists: the
    agent removes it just after the job ends, so it is caught while the job runs."""

    def __init__(self, job_id: str) -> None:
        super().__init__(name="demo-engine-watch", daemon=True)
        self.job_id = job_id
        self.isolation: dict[str, Any] | None = None
        self.container_id: str | None = None
        self.done = threading.Event()

    def run(self) -> None:
        from agent.errors import ContainerRuntimeError
        from agent.runtime.docker import DockerRuntime

        runtime = DockerRuntime(DOCKER_HOST)
        while not self.done.wait(0.05):
            try:
                for state in runtime.list_jobs(NODE_ID):
                    if state.job_id == self.job_id:
                        self.isolation = runtime.applied_isolation(state.id)
                        self.container_id = state.id
                        return
            except ContainerRuntimeError:
                continue  # removed between listing and inspecting: the ledger has it


def _ledger_entries(node: DemoNode, job_id: str) -> list[dict[str, Any]]:
    from agent.audit import ledger_path, read

    return list(read(ledger_path(node.state_dir), job_id))


def run_demo(
    workdir: Path, *, seed: int = 7, keep: bool = False, out: TextIO = sys.stdout
) -> DemoResult:
    """Run the demo in ``workdir`` (created if missing; left in place for inspection).
    With ``keep``, wait for Ctrl-C (``KeyboardInterrupt``) before stopping the agent and
    control plane. Raises :class:`DemoError`."""
    if os.geteuid() != 0:
        raise DemoError(
            "the demo needs root: the agent mounts each job's output as a size-capped "
            "filesystem (sudo, or `make demo` as root)"
        )
    steps = Steps(out)
    workdir.mkdir(parents=True, exist_ok=True)
    out.write(
        f"cloudbender-agent demo: one federated inference job on this machine (seed {seed})\n"
    )

    steps.step("The job image")
    ensure_image(steps)

    node = DemoNode(
        workdir, "cloudbender-demo/*", cpus=min(2, os.cpu_count() or 1), memory_mib=1024
    )
    node.prepare()
    steps.step("What stays: the consumer's data")
    patients = cohort(np.random.default_rng([seed, 0]), PATIENTS, "ICU-")
    dataset = node.write_dataset("vitals.csv", vitals_csv(patients))
    steps.lines(
        [
            f"{PATIENTS} made-up ICU patients, 8 vital signs each: {dataset}",
            f"{human_size(dataset.stat().st_size)}, sha256 {sha256_file(dataset)[:16]}…",
            f"datastore '{DATASTORE}': mounted read-only at /opt/data; its path never leaves",
        ]
    )

    steps.step("The provider's model: trained on synthetic patients, exported to ONNX")
    model = train(cohort(np.random.default_rng([seed, 1]), TRAINING_PATIENTS, "TRAIN-"))
    onnx_bytes = to_onnx(model)
    provider = workdir / "provider"
    provider.mkdir(exist_ok=True)
    (provider / "model.onnx").write_bytes(onnx_bytes)
    bundle = artifact(onnx_bytes, model)
    (provider / "icu-risk.tar.gz").write_bytes(bundle)
    bundle_sha = sha256_file(provider / "icu-risk.tar.gz")
    steps.lines(
        [
            f"logistic regression, AUC {model.holdout_auc:.3f} on held-out synthetic patients",
            f"artifact icu-risk.tar.gz (model.onnx, model.json, predict.py): "
            f"{human_size(len(bundle))}, sha256 {bundle_sha[:16]}…",
        ]
    )

    job_id = f"icu-risk-{secrets.token_hex(3)}"
    try:
        steps.step("Control plane and agent on loopback")
        node.start()
        node.cp.add_artifact("icu-risk", bundle)
        steps.lines(
            [
                f"control plane {node.cp.url} (the reference one, in this process)",
                f"agent pid {node.agent_pid}: cloudbender-agent run --config {node.config_path}",
            ]
        )

        steps.step(f"Job {job_id}: python3 /opt/model/predict.py in {DEMO_IMAGE}")
        watch = _EngineWatch(job_id)
        watch.start()
        node.cp.assign(
            NODE_ID,
            job_id,
            DEMO_IMAGE,
            DATASTORE,
            command=["python3", "/opt/model/predict.py"],
            model={"artifact": "icu-risk", "sha256": bundle_sha, "size": len(bundle)},
            resources={"cpus": 1, "memory_mib": 512},
            timeout_s=JOB_TIMEOUT_S,
        )
        end = node.cp.wait_for_job(NODE_ID, job_id, timeout=JOB_TIMEOUT_S + 30)
        watch.done.set()
        watch.join()
        states = [s["state"] for s in node.cp.job_states(NODE_ID, job_id)]
        steps.line(f"states: {' → '.join(states)}")
        if end["state"] != "succeeded":
            raise DemoError(
                f"job {job_id} ended {end['state']} ({end.get('reason')}):\n{node.log_tail()}"
            )

        steps.step("How it ran: the job container's isolation, as the engine reports it")
        isolation = _isolation(node, job_id, watch, steps)
        steps.lines(isolation_lines(isolation))
        problems = isolation_problems(isolation)
        if problems:
            raise DemoError("the job container was not isolated: " + "; ".join(problems))

        steps.step("What left: the result files, verified by the control plane")
        results = _results(node, job_id, steps)

        summary = json.loads(results["summary.json"].read_text())
        steps.line(
            f"summary.json: {summary['patients']} patients scored, {summary['high_risk']} with "
            f"risk >= {summary['high_risk_threshold']} (in the container: python "
            f"{summary['python']}, onnxruntime {summary['onnxruntime']})"
        )
        if summary["patients"] != PATIENTS:
            raise DemoError(f"the job scored {summary['patients']} patients, not {PATIENTS}")

        steps.step("The egress attempt")
        egress = results["egress.txt"].read_text().splitlines()
        steps.lines(egress)
        if not egress or any("CONNECTED" in line for line in egress):
            raise DemoError("the job reached the network (see egress.txt above)")
        steps.line("every connection failed: the container has no network")

        steps.step("The audit ledger: cloudbender-agent audit --verify")
        _audit_verify(node, steps)

        steps.step("Where the results landed")
        steps.line(f"{node.results_dir / NODE_ID / job_id}/  (the control plane's store)")
        timings = steps.finish()
        out.write(f"\ndone in {steps.elapsed():.1f} s; everything is in {workdir}\n")
        if keep:
            _hold(node, out)
        return DemoResult(
            workdir, job_id, dataset, provider / "model.onnx", results, isolation, timings
        )
    finally:
        node.stop()


def _isolation(node: DemoNode, job_id: str, watch: _EngineWatch, steps: Steps) -> dict[str, Any]:
    if watch.isolation is not None and watch.container_id is not None:
        steps.line(f"docker inspect {watch.container_id[:12]} (read while the job ran):")
        return watch.isolation
    # The job ended before it was caught: the agent read the same settings back from the
    # engine when it started the container, and recorded them in the ledger.
    for entry in _ledger_entries(node, job_id):
        if entry.get("kind") == "container_started":
            steps.line("recorded in the audit ledger when the container started:")
            return dict(entry["isolation"])
    raise DemoError(f"no container of {job_id} was seen, and the ledger records none")


def _results(node: DemoNode, job_id: str, steps: Steps) -> dict[str, Path]:
    state = node.cp.wait_for_results(NODE_ID, job_id, timeout=60)
    sent = {
        e["path"]: e["sha256"]
        for e in _ledger_entries(node, job_id)
        if e.get("kind") == "result_file_sent"
    }
    for name, path in sorted(state.files.items()):
        digest = sha256_file(path)
        steps.line(f"{name:<13} {human_size(path.stat().st_size):>10}  sha256 {digest}")
        if sent.get(name) != digest:
            raise DemoError(f"{name}: the ledger records sha256 {sent.get(name)}, not {digest}")
    if set(sent) != set(state.files):
        raise DemoError(f"the ledger lists {sorted(sent)}, the control plane {sorted(state.files)}")
    steps.line("each sha256 is also in the agent's audit ledger; nothing else left the node")
    return dict(state.files)


def _agent_command() -> list[str]:
    exe = shutil.which("cloudbender-agent", path=str(Path(sys.executable).parent))
    return [exe] if exe else [sys.executable, "-m", "agent.cli"]


def _audit_verify(node: DemoNode, steps: Steps) -> None:
    command = [*_agent_command(), "audit", "--verify", "--config", str(node.config_path)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    steps.lines((done.stdout + done.stderr).strip().splitlines())
    if done.returncode != 0:
        raise DemoError(f"audit --verify exited {done.returncode}")


def _hold(node: DemoNode, out: TextIO) -> None:
    exe = " ".join(_agent_command())
    config = node.config_path
    out.write(
        "\nThe agent and the control plane keep running (--keep). From another shell:\n"
        f"    {exe} status --config {config}\n"
        f"    {exe} jobs --config {config}\n"
        f"    {exe} audit --config {config}\n"
        "Press Ctrl-C here to stop both.\n"
    )
    out.flush()
    try:
        threading.Event().wait()  # only Ctrl-C ends it; stop() runs in run_demo's finally
    except KeyboardInterrupt:
        out.write("\nstopping the agent and the control plane\n")
