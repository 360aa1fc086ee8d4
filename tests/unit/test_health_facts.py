"""The one health predicate: what makes /healthz 503 and what starves the watchdog."""

from __future__ import annotations

from agent.gpu.base import GpuInfo, GpuInventory
from agent.health.facts import (
    LOOP_STALL_S,
    ControlPlaneFacts,
    NodeFacts,
    Problem,
    assess,
    watchdog_ok,
)


def _gpu(index: int, health: str, reasons: tuple[str, ...] = ()) -> GpuInfo:
    return GpuInfo(
        index=index,
        uuid=f"GPU-{index}",
        name="H100",
        memory_total_mib=81559,
        memory_used_mib=0,
        pci_bus_id=None,
        driver_version=None,
        cuda_version=None,
        utilization_pct=None,
        temperature_c=None,
        power_w=None,
        ecc_volatile_uncorrected=None,
        mig_mode=None,
        health=health,
        health_reasons=reasons,  # type: ignore[arg-type]
    )


def test_fresh_node_is_healthy() -> None:
    facts = NodeFacts()
    assert assess(facts, max_disconnected_s=600) == []


def test_stalled_loop_is_unhealthy_and_starves_the_watchdog() -> None:
    facts = NodeFacts(loop_tick=100.0)
    problems = assess(facts, max_disconnected_s=600, monotonic_now=100.0 + LOOP_STALL_S + 1)
    assert [p.code for p in problems] == ["event_loop_stalled"]
    assert not watchdog_ok(problems)


def test_state_dir_problem_starves_the_watchdog() -> None:
    facts = NodeFacts(
        state_dir_problem=Problem(
            "state_dir_unwritable",
            "state directory /x is not writable: Read-only file system",
            True,
        )
    )
    problems = assess(facts, max_disconnected_s=600)
    assert problems[0].detail.endswith("Read-only file system")
    assert not watchdog_ok(problems)


def test_lost_gpu_is_unhealthy_but_a_restart_would_not_help() -> None:
    inv = GpuInventory(
        gpus=(_gpu(0, "ok"), _gpu(1, "lost", ("GPU is lost (fallen off the bus)",))),
        available=True,
        reason=None,
        driver_version=None,
        cuda_version=None,
    )
    problems = assess(NodeFacts(gpus=inv), max_disconnected_s=600)
    assert [p.code for p in problems] == ["gpu_lost"]
    assert "GPU 1 (GPU-1): GPU is lost" in problems[0].detail
    assert watchdog_ok(problems)


def test_control_plane_outage_counts_from_when_the_link_went_down() -> None:
    """Attack: a provider redeploys after an idle hour; the last message from the control
    plane is an hour old, and /healthz used to turn 503 the instant the link dropped."""
    cp = ControlPlaneFacts(
        configured=True,
        state="disconnected",
        since=1000.0,  # the link went down here
        last_contact=100.0,  # the control plane's last message, long before
        last_error="token refused by control plane",
    )
    facts = NodeFacts(started_at=0.0, control_plane=cp)
    assert assess(facts, max_disconnected_s=600, now=1500.0) == []
    problems = assess(facts, max_disconnected_s=600, now=1601.0)
    assert problems[0].code == "control_plane_unreachable"
    assert "601 s" in problems[0].detail and "token refused" in problems[0].detail
    assert watchdog_ok(problems)


def test_unconfigured_control_plane_is_not_a_problem() -> None:
    facts = NodeFacts(started_at=0.0)
    assert assess(facts, max_disconnected_s=1, now=10_000.0) == []
