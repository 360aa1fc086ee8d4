"""Issue 12, reload that keeps its word: the job system reads every reloadable value
through the config callable, so a SIGHUP's new value holds for the next job.

These build the real job system (agent.jobs.setup.build_jobs) around a config holder
and swap the holder as the daemon's reload does; tests/docker/test_reload_keys.py
sends real SIGHUPs to a real daemon for the keys a job shows directly.
"""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

from agent.config import Config, parse_config
from agent.jobs.setup import JobSystem, build_jobs
from agent.reload import RELOADABLE, plan_reload
from tests.helpers.env import valid_config


class _Holder:
    def __init__(self, config: Config) -> None:
        self.config = config

    def reload(self, raw: dict[str, Any]) -> tuple[str, ...]:
        plan = plan_reload(self.config, parse_config(raw))
        self.config = plan.config
        return plan.applied


def _system(tmp_path: Path) -> tuple[JobSystem, _Holder, dict[str, Any]]:
    raw = valid_config(tmp_path)
    holder = _Holder(parse_config(raw))
    (tmp_path / "state").mkdir(mode=0o700)
    system = build_jobs(
        lambda: holder.config,
        runtime=None,  # type: ignore[arg-type]  # nothing here reaches the engine
        state_dir=tmp_path / "state",
        gpus=lambda: None,
        node_cpus=lambda: 1,
        gpu_support=lambda: False,
    )
    return system, holder, raw


def _close(system: JobSystem) -> None:
    asyncio.run(system.close())


def test_job_user_pull_grace_and_log_tail_follow_a_reload(tmp_path: Path) -> None:
    """Attack: SIGHUP logged runtime.job_user as applied, yet the next job's container
    still ran as the start-up uid (the runner context held a copy)."""
    system, holder, raw = _system(tmp_path)
    try:
        raw["runtime"] = {"job_user": "1234:1234", "pull": False, "stop_grace_s": 7}
        raw["logging"]["job_log_tail_kib"] = 3
        applied = holder.reload(raw)
        assert {"runtime.job_user", "runtime.pull", "runtime.stop_grace_s"} <= set(applied)
        assert system.ctx.job_user() == "1234:1234"
        assert system.ctx.allow_pull() is False
        assert system.ctx.stop_grace_s() == 7.0
    finally:
        _close(system)


def test_models_cache_size_follows_a_reload(tmp_path: Path) -> None:
    """Attack: models.cache_max_mib lowered by SIGHUP because the disk is filling; the
    cache kept fetching and keeping models up to the start-up size."""
    system, holder, raw = _system(tmp_path)
    try:
        assert system.ctx.models is not None
        raw["models"] = {"cache_max_mib": 3}
        assert "models.cache_max_mib" in holder.reload(raw)
        assert system.ctx.models.max_bytes == 3 * 1024 * 1024
    finally:
        _close(system)


def test_more_job_slots_after_a_reload_get_their_own_wait_threads(tmp_path: Path) -> None:
    """Attack: limits.max_concurrent_jobs raised from 2 to 4 by SIGHUP; the wait pool,
    sized at start, left the extra jobs' waits queued behind the others, so their ends
    were noticed late. Four waits that block together must all be running at once."""
    system, holder, raw = _system(tmp_path)
    try:
        raw["limits"] = {"max_concurrent_jobs": 4}
        holder.reload(raw)
        started = threading.Barrier(5)  # one spare thread per the pool's contract
        futures = [system.wait_pool.submit(started.wait, 10) for _ in range(4)]
        started.wait(10)  # raises BrokenBarrierError if a wait could not start
        assert all(f.result(10) is not None for f in futures)
    finally:
        _close(system)


def test_every_reloadable_key_is_covered_by_a_test() -> None:
    """Attack: a key added to RELOADABLE without a test that it takes effect is the
    same broken promise again."""
    covered = {
        "datastores": "tests/integration/test_daemon.py (SIGHUP)",
        "runtime.allowed_images": "tests/docker/test_reload_keys.py (SIGHUP)",
        "runtime.require_digest": "tests/docker/test_reload_keys.py (SIGHUP)",
        "runtime.pull": "test_job_user_pull_grace_and_log_tail_follow_a_reload",
        "runtime.job_user": "tests/docker/test_reload_keys.py (SIGHUP) and above",
        "runtime.stop_grace_s": "test_job_user_pull_grace_and_log_tail_follow_a_reload",
        "gpus": "tests/integration/test_reload_keys.py (SIGHUP)",
        "limits": "tests/integration/test_reload_keys.py (SIGHUP) and the wait-pool test",
        "results": "tests/docker/test_reload_keys.py (SIGHUP)",
        "models": "test_models_cache_size_follows_a_reload",
        "health.max_disconnected_s": "tests/integration/test_reload_keys.py (SIGHUP)",
        "logging": "tests/integration/test_reload_keys.py (SIGHUP) and above",
    }
    assert set(RELOADABLE) == set(covered)
