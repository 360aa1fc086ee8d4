"""Prometheus metrics, rendered at scrape time from the latest facts.

A custom collector rather than long-lived gauges: a GPU that disappears stops being
exported instead of lingering with its last value, and a value the hardware cannot
report (``None``) is left out rather than exported as a made-up number.

Every enum state is a labelled gauge that lists all its states, 1 for the current one
and 0 for the others (node_exporter's and dcgm-exporter's convention): an alert on
``cloudbender_control_plane_state{state="connected"} == 0`` needs the series to be
there, at 0, while the link is down. The agent's own process metrics (``process_*``)
come from prometheus_client's ProcessCollector on the same registry.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from agent.gpu.base import HEALTH_STATES
from agent.health.facts import CONTROL_PLANE_STATES, NodeFacts, Problem
from agent.health.node_rows import held
from agent.jobs.model import TERMINAL, State
from agent.jobs.tally import EMPTY, TallySnapshot

MIB = 1024 * 1024
GPU_LABELS = ["index", "uuid", "name"]
# From the types that define them, so a new state is exported without a change here.
JOB_STATES = tuple(s.value for s in State)
TERMINAL_STATES = tuple(s.value for s in State if s in TERMINAL)


class AgentCollector(Collector):
    def __init__(
        self,
        facts: NodeFacts,
        *,
        node_id: str,
        version: str,
        assess: Callable[[], list[Problem]],
    ) -> None:
        self._facts = facts
        self._node_id = node_id
        self._version = version
        self._assess = assess

    def collect(self) -> Iterator[Metric]:
        facts = self._facts
        info = InfoMetricFamily("cloudbender_agent", "Agent build and node identity.")
        info.add_metric([], {"version": self._version, "node_id": self._node_id})
        yield info
        yield GaugeMetricFamily("cloudbender_agent_up", "1 while the agent runs.", value=1)
        yield GaugeMetricFamily(
            "cloudbender_agent_start_time_seconds",
            "Unix time the agent started.",
            value=facts.started_at,
        )
        yield GaugeMetricFamily(
            "cloudbender_agent_healthy",
            "1 when /healthz answers 200, else 0.",
            value=0 if self._assess() else 1,
        )
        yield _enum_gauge(
            "cloudbender_control_plane_state",
            "Control-plane link state: 1 for the current one, 0 for the others.",
            CONTROL_PLANE_STATES,
            facts.control_plane.state,
        )
        if facts.control_plane.last_contact is not None:  # never in contact: left out
            yield GaugeMetricFamily(
                "cloudbender_last_contact_timestamp_seconds",
                "Unix time the link to the control plane was last known up "
                "(refreshed at every heartbeat while connected).",
                value=facts.control_plane.last_contact,
            )
        runtime = facts.runtime
        yield GaugeMetricFamily(
            "cloudbender_engine_up",
            "1 when the container engine answered its latest probe, else 0.",
            value=1 if runtime is not None and runtime.reachable else 0,
        )
        yield GaugeMetricFamily(
            "cloudbender_draining",
            "1 while the node takes no new jobs (drain), else 0.",
            value=1 if facts.draining else 0,
        )
        yield CounterMetricFamily(
            "cloudbender_control_plane_reconnects",
            "Connection attempts after the first.",
            value=max(facts.control_plane.attempts - 1, 0),
        )
        messages = CounterMetricFamily(
            "cloudbender_control_plane_messages",
            "Protocol messages by direction and type.",
            labels=["direction", "type"],
        )
        for direction, counts in (
            ("in", dict(facts.messages.received)),
            ("out", dict(facts.messages.sent)),
        ):
            for kind, count in sorted(counts.items()):
                messages.add_metric([direction, kind], count)
        yield messages
        yield from self._job_metrics()
        yield from self._gpu_metrics()
        yield from self._host_metrics()

    def _job_metrics(self) -> Iterator[Metric]:
        current = GaugeMetricFamily(
            "cloudbender_jobs_current",
            "Jobs on the node by state, until the control plane acknowledges their end.",
            labels=["state"],
        )
        counts: dict[str, int] = dict.fromkeys(JOB_STATES, 0)
        for job in self._facts.jobs:
            counts[job["state"]] = counts.get(job["state"], 0) + 1
        for state, count in counts.items():
            current.add_metric([state], count)
        yield current
        review = held(self._facts.jobs, time.time())
        yield GaugeMetricFamily(
            "cloudbender_jobs_held",
            "Jobs whose results wait for review on the node (results.review).",
            value=review["count"],
        )
        yield GaugeMetricFamily(
            "cloudbender_jobs_held_oldest_seconds",
            "How long the longest-held job's results have waited for review (0: none).",
            value=review["oldest_s"],
        )
        tally = self._facts.tally
        snap = tally.snapshot() if tally is not None else TallySnapshot({}, {}, 0)
        ended = CounterMetricFamily(
            "cloudbender_jobs",
            "Jobs ended since the agent started, by terminal state and reason.",
            labels=["state", "reason"],
        )
        for (state, reason), count in sorted(snap.ended.items()):
            ended.add_metric([state, reason], count)
        yield ended
        durations = HistogramMetricFamily(
            "cloudbender_job_duration_seconds",
            "Time from a job's acceptance to its end, by terminal state.",
            labels=["state"],
        )
        for state in TERMINAL_STATES:
            histogram = snap.durations.get(state, EMPTY)
            durations.add_metric([state], histogram.cumulative(), histogram.total_s)
        yield durations
        yield CounterMetricFamily(
            "cloudbender_result_bytes_sent",
            "Result bytes handed to the control-plane link, resends included.",
            value=snap.result_bytes_sent,
        )

    def _gpu_metrics(self) -> Iterator[Metric]:
        inventory = self._facts.gpus
        gpus = inventory.gpus if inventory is not None else ()
        yield GaugeMetricFamily(
            "cloudbender_gpus", "GPUs NVML reports on this node.", value=len(gpus)
        )
        families = {
            "util": GaugeMetricFamily(
                "cloudbender_gpu_utilization_percent", "GPU utilisation.", labels=GPU_LABELS
            ),
            "mem_used": GaugeMetricFamily(
                "cloudbender_gpu_memory_used_bytes", "GPU memory in use.", labels=GPU_LABELS
            ),
            "mem_total": GaugeMetricFamily(
                "cloudbender_gpu_memory_total_bytes", "GPU memory in total.", labels=GPU_LABELS
            ),
            "temp": GaugeMetricFamily(
                "cloudbender_gpu_temperature_celsius", "GPU temperature.", labels=GPU_LABELS
            ),
            "power": GaugeMetricFamily(
                "cloudbender_gpu_power_watts", "GPU power draw.", labels=GPU_LABELS
            ),
            "ecc": GaugeMetricFamily(
                "cloudbender_gpu_ecc_volatile_uncorrected_errors",
                "Uncorrected ECC errors since the driver loaded.",
                labels=GPU_LABELS,
            ),
            "alloc": GaugeMetricFamily(
                "cloudbender_gpu_allocatable",
                "1 when the GPU may be leased to jobs.",
                labels=GPU_LABELS,
            ),
        }
        health = GaugeMetricFamily(
            "cloudbender_gpu_health",
            "GPU health verdict: 1 for the current state, 0 for the others.",
            labels=[*GPU_LABELS, "state"],
        )
        for gpu in gpus:
            labels = [str(gpu.index), gpu.uuid or "", gpu.name or ""]
            values: dict[str, float | None] = {
                "util": gpu.utilization_pct,
                "mem_used": None if gpu.memory_used_mib is None else gpu.memory_used_mib * MIB,
                "mem_total": None if gpu.memory_total_mib is None else gpu.memory_total_mib * MIB,
                "temp": gpu.temperature_c,
                "power": gpu.power_w,
                "ecc": gpu.ecc_volatile_uncorrected,
                "alloc": 1 if gpu.allocatable else 0,
            }
            for key, value in values.items():
                if value is not None:
                    families[key].add_metric(labels, value)
            for state in HEALTH_STATES:
                health.add_metric([*labels, state], 1 if gpu.health == state else 0)
        yield from families.values()
        yield health

    def _host_metrics(self) -> Iterator[Metric]:
        host = self._facts.host
        if host is None:
            return
        if host.cpu_pct is not None:
            yield GaugeMetricFamily(
                "cloudbender_host_cpu_percent", "Host CPU utilisation.", value=host.cpu_pct
            )
        yield GaugeMetricFamily(
            "cloudbender_host_memory_total_bytes", "Host memory.", value=host.memory_total_mib * MIB
        )
        yield GaugeMetricFamily(
            "cloudbender_host_memory_used_bytes",
            "Host memory in use.",
            value=host.memory_used_mib * MIB,
        )
        if host.state_dir_free_mib is not None:
            yield GaugeMetricFamily(
                "cloudbender_state_dir_free_bytes",
                "Free space in the agent's state directory.",
                value=host.state_dir_free_mib * MIB,
            )


def _enum_gauge(name: str, documentation: str, states: tuple[str, ...], current: str) -> Metric:
    """A gauge with one series per state: 1 for ``current``, 0 for the others. A state
    missing from ``states`` is still exported (at 1), never dropped."""
    gauge = GaugeMetricFamily(name, documentation, labels=["state"])
    for state in states if current in states else (*states, current):
        gauge.add_metric([state], 1 if state == current else 0)
    return gauge


def build_registry(collector: AgentCollector) -> CollectorRegistry:
    """The agent's registry: its collector, and the process's CPU, memory and files."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    ProcessCollector(registry=registry)
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
