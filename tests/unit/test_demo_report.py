"""The demo's checks on what it shows: pure functions, no engine."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from agent.demo.dataset import cohort, vitals_csv
from agent.demo.report import isolation_lines, isolation_problems

ISOLATED: dict[str, Any] = {
    "user": "65534:65534",
    "networks": [],
    "mounts": [
        {"target": "/opt/data", "type": "bind", "rw": False},
        {"target": "/opt/model", "type": "bind", "rw": False},
        {"target": "/opt/output", "type": "bind", "rw": True},
    ],
    "host_config": {
        "NetworkMode": "none",
        "ReadonlyRootfs": True,
        "CapDrop": ["ALL"],
        "CapAdd": None,
        "Privileged": False,
        "NanoCpus": 1_000_000_000,
        "Memory": 512 * 1024 * 1024,
        "PidsLimit": 256,
    },
}


def test_an_isolated_container_passes_and_reads_as_such() -> None:
    assert isolation_problems(ISOLATED) == []
    text = "\n".join(isolation_lines(ISOLATED))
    assert "network        none" in text
    assert "/opt/data    bind, read-only" in text


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"host_config": {**ISOLATED["host_config"], "NetworkMode": "bridge"}}, "network"),
        ({"networks": ["bridge"]}, "network"),
        ({"host_config": {**ISOLATED["host_config"], "ReadonlyRootfs": False}}, "writable"),
        ({"host_config": {**ISOLATED["host_config"], "CapDrop": ["NET_RAW"]}}, "capabilities"),
        ({"host_config": {**ISOLATED["host_config"], "Privileged": True}}, "privileged"),
        ({"user": "0:0"}, "runs as"),
        ({"user": ""}, "runs as"),
        ({"mounts": [{"target": "/opt/data", "type": "bind", "rw": True}]}, "/opt/data"),
    ],
)
def test_a_container_that_is_not_isolated_fails_the_demo(
    change: dict[str, Any], problem: str
) -> None:
    """Attack: an agent or engine change that gives the job a network, a writable root,
    capabilities, root or a writable datastore, while the demo still prints a
    reassuring report. Each must be a problem that fails the demo."""
    problems = isolation_problems({**ISOLATED, **change})
    assert any(problem in p for p in problems), problems


def test_the_dataset_is_the_same_for_a_seed_and_differs_across_seeds() -> None:
    """Attack (on the test itself): scores checked against data regenerated differently
    from what the job read. The file is a function of the seed alone."""
    first = vitals_csv(cohort(np.random.default_rng([3, 0]), 200, "ICU-"))
    again = vitals_csv(cohort(np.random.default_rng([3, 0]), 200, "ICU-"))
    other = vitals_csv(cohort(np.random.default_rng([4, 0]), 200, "ICU-"))
    assert first == again != other
    header, row = first.decode().splitlines()[:2]
    assert header == "patient_id,sex,age,heart_rate,resp_rate,sys_bp,spo2,temp_c,gcs,lactate"
    assert row.startswith("ICU-000001,")
