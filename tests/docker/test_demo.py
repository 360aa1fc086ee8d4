"""`cloudbender-agent demo` end to end: the demo image, a real agent, a real ONNX job.

The image is built before the tests by `make test` (scripts/build-demo-image.sh, which does
nothing when the image of its recipe is there already): the test fetches nothing.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort  # type: ignore[import-untyped,unused-ignore]
import pytest

from agent.demo import DEMO_IMAGE
from agent.demo.dataset import read_features
from agent.demo.report import sha256_file
from tests.helpers.env import seconds
from tests.helpers.jobnode import unmount_under
from tests.helpers.proc import agent_command

pytestmark = pytest.mark.docker

SEED = 11


@pytest.fixture(scope="session")
def demo_image(docker_client: object) -> str:
    found = subprocess.run(
        ["docker", "image", "inspect", DEMO_IMAGE], capture_output=True, text=True, check=False
    )
    if found.returncode != 0:
        pytest.fail(
            f"no {DEMO_IMAGE} image: run `make test` (it builds it with "
            "scripts/build-demo-image.sh), or that script once",
            pytrace=False,
        )
    return DEMO_IMAGE


@pytest.fixture(scope="session")
def demo_run(demo_image: str, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """One run of `cloudbender-agent demo` for the tests below: (workdir, stdout)."""
    workdir = tmp_path_factory.mktemp("demo")
    command = [*agent_command(), "demo", "--seed", str(SEED), "--workdir", str(workdir)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=seconds(120))
    finally:
        unmount_under(workdir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return workdir, done.stdout


def accepted_results(workdir: Path) -> Path:
    (job_dir,) = (workdir / "cp-results" / "demo-node").iterdir()
    return job_dir


@pytest.mark.timeout(180)
def test_demo_scores_are_the_models_scores_on_the_consumers_data(
    demo_run: tuple[Path, str],
) -> None:
    """Attack: a job that claims to run the provider's model but sends back something
    else (another model, altered or invented scores). The scores that reached the
    control plane must be the ONNX model's own, recomputed outside the container with
    onnxruntime on the very file the datastore held, to 1e-5, for every patient."""
    workdir, _ = demo_run
    ids, x = read_features((workdir / "datastore" / "icu-vitals" / "vitals.csv").read_bytes())
    session = ort.InferenceSession(
        str(workdir / "provider" / "model.onnx"), providers=["CPUExecutionProvider"]
    )
    expected = session.run(["risk"], {"vitals": x})[0].reshape(-1)

    lines = (accepted_results(workdir) / "scores.csv").read_text().splitlines()
    assert lines[0] == "patient_id,risk"
    rows = [line.split(",") for line in lines[1:]]
    assert [pid for pid, _ in rows] == ids
    got = np.array([float(risk) for _, risk in rows])
    assert len(got) == 4000
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    assert 0.01 < float(got.mean()) < 0.5  # a risk score, not a constant


def test_demo_names_what_left_with_sha256_and_shows_egress_failed(
    demo_run: tuple[Path, str],
) -> None:
    """Attack: a model that phones home (the docker bridge's host address, a public
    resolver) and a report that hides what left. Every connection must have failed, the
    engine must report network none and a read-only root, and the output must list each
    result file the control plane holds with its true sha256."""
    workdir, stdout = demo_run
    job_dir = accepted_results(workdir)
    files = sorted(p.name for p in job_dir.iterdir())
    assert files == ["egress.txt", "scores.csv", "summary.json"]
    for name in files:
        assert re.search(rf"{re.escape(name)} .* sha256 {sha256_file(job_dir / name)}\n", stdout)

    egress = (job_dir / "egress.txt").read_text().splitlines()
    assert [line.split()[0] for line in egress] == ["172.17.0.1:80", "172.17.0.1:443"]
    assert all(" blocked (" in line for line in egress), egress
    assert "network        none" in stdout
    assert "root fs        read-only" in stdout
    assert "/opt/data    bind, read-only" in stdout
    assert "OK: " in stdout and "chain intact" in stdout
    assert str(job_dir) in stdout


def test_demo_refuses_without_the_demo_extra_naming_it(tmp_path: Path) -> None:
    """Attack (on the front door): a user without numpy/onnx gets a traceback instead of
    the install hint. The demo must name the missing extra and exit 1."""
    blocker = tmp_path / "onnx.py"
    blocker.write_text("raise ImportError('blocked for the test', name='onnx')\n")
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); "
        "from agent.cli import main; sys.exit(main(['demo']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "demo extra" in done.stderr and "onnx" in done.stderr
