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

from pydantic import BaseModel

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


def test_job_user_pull_and_grace_follow_a_reload(tmp_path: Path) -> None:
    """Attack: SIGHUP logged runtime.job_user as applied, yet the next job's container
    still ran as the start-up uid (the runner context held a copy)."""
    system, holder, raw = _system(tmp_path)
    try:
        raw["runtime"] = {"job_user": "1234:1234", "pull": False, "stop_grace_s": 7}
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


PER_KEY = "tests/unit/test_reload_per_key.py::"
LIVE = "tests/unit/test_reload_live.py::"
SIGHUP_DOCKER = "tests/docker/test_reload_keys.py::"
SIGHUP = "tests/integration/test_reload_keys.py::test_sighup_applies_gpus_disk_floor_and_"
# Each leaf key a reload applies, and the test that shows it holding for the next job.
COVERED = {
    "datastores": "tests/integration/test_daemon.py::test_sighup_applies_datastores_and_"
    "reports_what_needs_a_restart",
    "runtime.allowed_images": SIGHUP_DOCKER
    + "test_sighup_images_digest_and_result_cap_hold_for_the_next_job",
    "runtime.require_digest": SIGHUP_DOCKER
    + "test_sighup_images_digest_and_result_cap_hold_for_the_next_job",
    "runtime.pull": LIVE + "test_job_user_pull_and_grace_follow_a_reload",
    "runtime.job_user": SIGHUP_DOCKER + "test_sighup_job_user_runs_the_next_job_as_the_new_user",
    "runtime.stop_grace_s": LIVE + "test_job_user_pull_and_grace_follow_a_reload",
    "gpus.allow": SIGHUP + "disconnect_limit_and_shows_pending_restart",
    "limits.max_concurrent_jobs": PER_KEY
    + "test_fewer_job_slots_after_a_reload_refuse_the_next_job",
    "limits.max_timeout_s": PER_KEY + "test_a_lowered_job_cap_refuses_the_next_job",
    "limits.max_cpus": PER_KEY + "test_a_lowered_job_cap_refuses_the_next_job",
    "limits.max_memory_mib": PER_KEY + "test_a_lowered_job_cap_refuses_the_next_job",
    "limits.pids": PER_KEY + "test_pids_and_tmp_size_follow_a_reload_into_the_next_container",
    "limits.tmp_mib": PER_KEY + "test_pids_and_tmp_size_follow_a_reload_into_the_next_container",
    "limits.shm_mib": PER_KEY + "test_shm_size_follows_a_reload_into_the_next_container",
    "limits.min_free_mib": PER_KEY + "test_a_raised_disk_floor_refuses_the_next_job",
    "results.max_bytes": PER_KEY + "test_a_lowered_result_cap_holds_for_the_next_job",
    "results.max_files": PER_KEY + "test_a_lowered_result_cap_holds_for_the_next_job",
    "results.retention_h": PER_KEY + "test_a_longer_result_retention_keeps_the_job_history_as_long",
    "models.cache_max_mib": LIVE + "test_models_cache_size_follows_a_reload",
    "health.max_disconnected_s": SIGHUP + "disconnect_limit_and_shows_pending_restart",
    "logging.level": PER_KEY + "test_log_level_and_format_follow_a_reload",
    "logging.format": PER_KEY + "test_log_level_and_format_follow_a_reload",
    "logging.job_log_tail_kib": PER_KEY + "test_a_smaller_log_tail_holds_for_the_next_job",
}
AIRLOCK = "tests/unit/test_airlock.py::test_review_settings_follow_a_reload"
COVERED.update({f"results.{key}": AIRLOCK for key in ("review", "review_command")})
COVERED.update({f"results.{key}": AIRLOCK for key in ("review_timeout_h", "review_approvals")})
AIRLOCK_PENDING: set[str] = set()


def _leaf_keys() -> set[str]:
    """RELOADABLE with each whole section opened into its keys: a test of a section
    (one key of it changed) says nothing about the others."""
    leaves = set()
    for key in RELOADABLE:
        section, _, field = key.partition(".")
        model = Config.model_fields[section].annotation
        if field or not (isinstance(model, type) and issubclass(model, BaseModel)):
            leaves.add(key)
        else:
            leaves |= {f"{section}.{name}" for name in model.model_fields}
    return leaves


def test_every_reloadable_key_is_covered_by_a_test() -> None:
    """Attack: a key added to RELOADABLE without a test that it takes effect is the
    same broken promise again; so is a section whose test changes one of its keys
    (limits.max_concurrent_jobs) and vouches for the others (limits.max_cpus)."""
    assert _leaf_keys() - AIRLOCK_PENDING == set(COVERED)
    root = Path(__file__).resolve().parents[2]
    for key, where in COVERED.items():
        path, _, name = where.partition("::")
        assert f"def {name}(" in (root / path).read_text(encoding="utf-8"), (key, where)
