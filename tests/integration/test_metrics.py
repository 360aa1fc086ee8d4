"""/metrics of a real agent process, read as Prometheus reads it, across a link outage."""

from __future__ import annotations

import time
from pathlib import Path

from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from agent.health.facts import CONTROL_PLANE_STATES
from tests.helpers.env import seconds
from tests.helpers.proc import AgentProcess, running_agent
from tests.integration.test_control_plane_session import agent_config, control_plane, wait_status

STATE = "cloudbender_control_plane_state"
CONTACT = "cloudbender_last_contact_timestamp_seconds"
TYPES = {
    STATE: "gauge",
    CONTACT: "gauge",
    "cloudbender_engine_up": "gauge",
    "cloudbender_draining": "gauge",
    "cloudbender_jobs": "counter",
    "cloudbender_job_duration_seconds": "histogram",
    "cloudbender_result_bytes_sent": "counter",
    "process_cpu_seconds": "counter",
    "process_resident_memory_bytes": "gauge",
}


def _scrape(agent: AgentProcess) -> dict[str, Metric]:
    code, body = agent.get("/metrics")
    assert code == 200
    return {f.name: f for f in text_string_to_metric_families(body.decode())}


def _states(families: dict[str, Metric]) -> dict[str, float]:
    return {s.labels["state"]: s.value for s in families[STATE].samples}


def test_link_state_series_turn_0_instead_of_vanishing_when_the_link_drops(
    tmp_path: Path,
) -> None:
    """Attack (operational): the control plane goes away and the agent stops exporting
    `{state="connected"}` instead of setting it to 0, so the administrator's alert
    `cloudbender_control_plane_state{state="connected"} == 0` never fires; and last
    contact, which an alert compares with `time()`, must move while the link is up."""
    with control_plane(heartbeat_s=1) as cp:
        path, port = agent_config(tmp_path, cp.url)
        with running_agent(path, port, tmp_path) as agent:
            wait_status(agent, "connected")
            families = _scrape(agent)
            for name, kind in TYPES.items():
                assert families[name].type == kind, name
                assert families[name].documentation, name
            states = _states(families)
            assert set(states) == set(CONTROL_PLANE_STATES)
            assert [s for s, v in states.items() if v == 1] == ["connected"]
            first = families[CONTACT].samples[0].value
            assert abs(first - time.time()) < seconds(10)

            deadline = time.monotonic() + seconds(10)
            while _scrape(agent)[CONTACT].samples[0].value <= first:
                assert time.monotonic() < deadline, "last contact not refreshed while up"
                time.sleep(0.1)

            cp.stop()
            deadline = time.monotonic() + seconds(15)
            while (states := _states(_scrape(agent)))["connected"] == 1:
                assert time.monotonic() < deadline, agent.log()
                time.sleep(0.05)
            assert set(states) == set(CONTROL_PLANE_STATES)
            assert states["connected"] == 0
            assert sum(states.values()) == 1
            assert CONTACT in _scrape(agent)  # the last contact stays, for `time() - x`
            assert agent.stop()[0] == 0
