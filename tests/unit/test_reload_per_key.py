"""Issue 12, "a test per reloadable key": each leaf key of ``limits``, ``results`` and
``logging`` changed by a reload holds for the next job.

The job system is the daemon's (``agent.jobs.setup.build_jobs``) on the fake engine
(tests/helpers/fakejobs.py), built around a config holder that a reload swaps as
``Daemon._reload`` does (``plan_reload``); the janitor and the log set-up are driven
through the daemon's own methods. Each test first shows the job the start-up value
allows, then the one the reloaded value changes: a copy taken at start fails it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from agent import logs
from agent.config import parse_config
from agent.daemon import Daemon
from agent.jobs.joblogs import logs_dir, read_log
from agent.jobs.model import State
from agent.jobs.outputfs import OutputVolumes
from agent.jobs.setup import build_jobs
from agent.jobs.store import JobRecord
from agent.reload import plan_reload
from agent.runtime.base import ContainerSpec
from agent.runtime.fake import FakeEngine, FakeRuntime
from tests.helpers.env import seconds, valid_config
from tests.helpers.fakejobs import IMAGE, CapturingLink, FakeJobs, NoMount

DAY_S = 86400.0


class RecordingRuntime(FakeRuntime):
    """The fake runtime, keeping each container spec it was asked to create."""

    def __init__(self, engine: FakeEngine) -> None:
        super().__init__(engine)
        self.specs: dict[str, ContainerSpec] = {}

    def create(self, spec: ContainerSpec) -> str:
        self.specs[spec.job_id] = spec
        return super().create(spec)


class Node(FakeJobs):
    raw: dict[str, Any]
    holder: SimpleNamespace
    runtime: RecordingRuntime

    def reload(self, section: str, **values: Any) -> tuple[str, ...]:
        """Change ``section``'s keys and apply them as a SIGHUP does; the keys applied."""
        self.raw.setdefault(section, {}).update(values)
        plan = plan_reload(self.holder.config, parse_config(self.raw))
        self.holder.config = plan.config
        return plan.applied

    async def sent(self, type_: str, job_id: str) -> list[dict[str, Any]]:
        """The messages of ``type_`` for ``job_id``, once there is one (scaled deadline)."""
        changed = self.link._changed  # the capturing link's own condition

        async with changed:
            await asyncio.wait_for(
                changed.wait_for(lambda: self.link.of(type_, job_id)), seconds(10)
            )
        return self.link.of(type_, job_id)

    def rejection(self, job_id: str) -> dict[str, Any] | None:
        return next(iter(self.link.of("job.rejected", job_id)), None)


@asynccontextmanager
async def node(tmp_path: Path) -> AsyncIterator[Node]:
    raw = valid_config(tmp_path)
    raw["runtime"] = {"allowed_images": ["registry.example/provider/*"]}
    holder = SimpleNamespace(config=parse_config(raw))
    engine = FakeEngine(gpu_support=True)
    engine.add_image(IMAGE)
    runtime = RecordingRuntime(engine)
    state_dir: Path = holder.config.state_dir
    await asyncio.to_thread(state_dir.mkdir, parents=True, exist_ok=True)
    system = build_jobs(
        lambda: holder.config,
        runtime=runtime,
        state_dir=state_dir,
        gpus=lambda: None,
        node_cpus=lambda: 8,
        gpu_support=lambda: True,
    )
    system.ctx.outputs = OutputVolumes(state_dir / "jobs", "65534:65534", NoMount())
    link = CapturingLink()
    await system.session.on_established(link)
    n = Node(engine, system, link, holder.config, state_dir)
    n.raw, n.holder, n.runtime = raw, holder, runtime
    try:
        yield n
    finally:
        await system.close()


# (key, reloaded value, what the next job asks for, the words of its rejection)
ADMISSION_CAPS = [
    ("max_timeout_s", 60, {"timeout_s": 120}, "timeout_s 120 is more than this node allows (60)"),
    ("max_cpus", 1, {"resources": {"cpus": 2}}, "resources.cpus 2 is more than this node allows"),
    (
        "max_memory_mib",
        256,
        {"resources": {"memory_mib": 512}},
        "resources.memory_mib 512 is more than this node allows (256)",
    ),
]


@pytest.mark.parametrize(("key", "value", "asks", "words"), ADMISSION_CAPS)
def test_a_lowered_job_cap_refuses_the_next_job(
    tmp_path: Path, key: str, value: int, asks: dict[str, Any], words: str
) -> None:
    """Attack: the consumer lowers limits.max_timeout_s, max_cpus or max_memory_mib by
    SIGHUP (a ward needs the machine back); the reload calls it applied, but admission
    kept the start-up caps and accepted a job over the new one."""

    async def run() -> None:
        async with node(tmp_path) as n:
            await n.assign("before", **asks)  # accepted: it runs, then waits to upload
            await n.link.state("before", "uploading")
            assert f"limits.{key}" in n.reload("limits", **{key: value})
            await n.assign("after", **asks)
            refused = n.rejection("after")
            assert refused is not None and refused["code"] == "limits_exceeded", n.link.sent
            assert words in refused["detail"]

    asyncio.run(run())


def test_pids_and_tmp_size_follow_a_reload_into_the_next_container(tmp_path: Path) -> None:
    """Attack: limits.pids and limits.tmp_mib lowered by SIGHUP after a job forked
    without end; the next container was still created with the start-up limits."""

    async def run() -> None:
        async with node(tmp_path) as n:
            await n.assign("before")
            await n.link.state("before", "uploading")
            assert (n.runtime.specs["before"].pids, n.runtime.specs["before"].tmp_mib) == (
                1024,
                1024,
            )
            n.reload("limits", pids=77, tmp_mib=33)
            await n.assign("after")
            await n.link.state("after", "uploading")
            assert (n.runtime.specs["after"].pids, n.runtime.specs["after"].tmp_mib) == (77, 33)

    asyncio.run(run())


def test_shm_size_follows_a_reload_into_the_next_container(tmp_path: Path) -> None:
    """Attack: limits.shm_mib raised by SIGHUP for a multi-GPU job that needs a larger
    /dev/shm; the next container was still created with the start-up size."""

    async def run() -> None:
        async with node(tmp_path) as n:
            await n.assign("before")
            await n.link.state("before", "uploading")
            assert n.runtime.specs["before"].shm_mib == 1024
            n.reload("limits", shm_mib=4096)
            await n.assign("after")
            await n.link.state("after", "uploading")
            assert n.runtime.specs["after"].shm_mib == 4096

    asyncio.run(run())


def test_fewer_job_slots_after_a_reload_refuse_the_next_job(tmp_path: Path) -> None:
    """Attack: limits.max_concurrent_jobs lowered from 2 to 1 by SIGHUP; the manager
    kept two slots and started a second job next to the running one."""

    async def run() -> None:
        async with node(tmp_path) as n:
            n.engine.default = n.engine.default.__class__(run_s=None)  # runs until cancelled
            await n.assign("first")
            await n.link.state("first", "running")
            n.reload("limits", max_concurrent_jobs=1)
            await n.assign("second")
            refused = n.rejection("second")
            assert refused is not None and refused["code"] == "no_capacity", n.link.sent
            assert "all 1 job slots are busy" in refused["detail"]
            await n.cancel("first")
            await n.ended("first")

    asyncio.run(run())


def test_a_raised_disk_floor_refuses_the_next_job(tmp_path: Path) -> None:
    """Attack: limits.min_free_mib raised by SIGHUP because the disk is filling; the
    next job was still accepted and filled it."""

    async def run() -> None:
        async with node(tmp_path) as n:
            n.reload("limits", min_free_mib=10**9)  # MiB: more than any disk here
            await n.assign("after")
            refused = n.rejection("after")
            assert refused is not None and refused["code"] == "no_space", n.link.sent
            assert "(limits.min_free_mib)" in refused["detail"]

    asyncio.run(run())


@pytest.mark.parametrize(
    ("key", "value", "outputs"),
    [
        ("max_bytes", 10, {"risk.csv": b"x" * 100}),
        ("max_files", 2, {"a.csv": b"1", "b.csv": b"2", "c.csv": b"3"}),
    ],
)
def test_a_lowered_result_cap_holds_for_the_next_job(
    tmp_path: Path, key: str, value: int, outputs: dict[str, bytes]
) -> None:
    """Attack: results.max_bytes or max_files lowered by SIGHUP (the consumer wants
    less to leave); the next job's results were still checked against the start-up
    cap and streamed off the site."""

    async def run() -> None:
        async with node(tmp_path) as n:
            n.engine.default = n.engine.default.__class__(outputs=outputs)
            await n.assign("before")
            (manifest,) = await n.sent("result.manifest", "before")  # within the caps
            assert len(manifest["files"]) == len(outputs)
            assert f"results.{key}" in n.reload("results", **{key: value})
            await n.assign("after")
            end = await n.link.state("after", "failed")
            assert end.get("reason") == "result_too_large", end
            assert not n.link.of("result.manifest", "after")

    asyncio.run(run())


def _ended_long_ago(job_id: str, days: float) -> JobRecord:
    ended = time.time() - days * DAY_S
    assignment = {"job_id": job_id, "image": {"ref": IMAGE}, "datastore": "vitals"}
    record = JobRecord(job_id, State.FAILED, assignment, ended - 60, ended)
    record.reason, record.ended_at, record.acked_at = "exit_nonzero", ended, ended
    return record


def test_a_longer_result_retention_keeps_the_job_history_as_long(tmp_path: Path) -> None:
    """Attack: results.retention_h raised to 10 days by SIGHUP, yet the janitor still
    forgot ended jobs after a fixed 7 days, so `jobs --all` no longer listed a job whose
    results the node still kept (the issue: history for retention_h or longer). The
    janitor pass is the daemon's own, reading the daemon's config."""

    async def run() -> None:
        async with node(tmp_path) as n:
            for job_id, days in (("8-days", 8.0), ("11-days", 11.0)):
                ended = _ended_long_ago(job_id, days)
                n.system.store.insert(ended)
                n.system.store.update(ended)  # insert keeps a new job's fields only
            assert "results.retention_h" in n.reload("results", retention_h=240)
            daemon = SimpleNamespace(config=n.holder.config)
            await Daemon._janitor_pass(daemon, n.system)  # type: ignore[arg-type]
            assert n.system.store.get("8-days") is not None  # kept: retention is 10 days
            assert n.system.store.get("11-days") is None  # older than both: forgotten

    asyncio.run(run())


def test_a_smaller_log_tail_holds_for_the_next_job(tmp_path: Path) -> None:
    """Attack: logging.job_log_tail_kib lowered by SIGHUP (the state directory is
    small); the next failed job's log was still kept at the start-up size."""
    output = b"".join(b"line %05d of a chatty model\n" % i for i in range(400))  # ~11 KiB

    async def run() -> None:
        async with node(tmp_path) as n:
            n.engine.default = n.engine.default.__class__(exit_code=3, logs=output)
            await n.assign("before")
            await n.ended("before")
            assert read_log(logs_dir(n.state_dir), "before") == output  # under 64 KiB
            assert "logging.job_log_tail_kib" in n.reload("logging", job_log_tail_kib=1)
            await n.assign("after")
            await n.ended("after")
            kept = read_log(logs_dir(n.state_dir), "after")
            assert kept is not None and 0 < len(kept) <= 1024 and output.endswith(kept)

    asyncio.run(run())


@pytest.fixture
def restore_logging() -> Iterator[None]:
    import logging

    import structlog

    saved, root = structlog.get_config(), logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    structlog.configure(**saved)
    root.handlers[:] = handlers
    root.setLevel(level)


def test_log_level_and_format_follow_a_reload(
    tmp_path: Path, restore_logging: None, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack: logging.level set to debug and logging.format to console by SIGHUP, to
    look at a problem by hand; the daemon went on writing info-level JSON. The reload
    is the daemon's own (``Daemon._reload`` reading the file)."""
    import structlog

    raw = valid_config(tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw))
    daemon = SimpleNamespace(
        _config_path=path,
        config=parse_config(raw),
        facts=SimpleNamespace(pending_restart=()),
        _sampler=SimpleNamespace(reapply_gpu_allow=lambda: None),
    )
    logs.configure(raw["logging"]["level"], raw["logging"]["format"])  # as at start: info, json
    probe = structlog.get_logger("reload-probe")
    probe.debug("probe_before")
    raw["logging"] = {"level": "debug", "format": "console"}
    path.write_text(yaml.safe_dump(raw))
    asyncio.run(Daemon._reload(daemon))  # type: ignore[arg-type]
    probe.debug("probe_after")
    lines = capsys.readouterr().err.splitlines()
    assert not [line for line in lines if "probe_before" in line], lines
    (after,) = [line for line in lines if "probe_after" in line]
    (reloaded,) = [line for line in lines if "config_reloaded" in line]
    for line in (after, reloaded):
        assert not line.lstrip().startswith("{"), line  # console now, not JSON
    assert "logging.level" in reloaded and "logging.format" in reloaded
