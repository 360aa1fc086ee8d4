"""``cloudbender-agent doctor`` and ``check-config`` as a person runs them on a node:
a real subprocess, the real Docker engine, a real control plane on loopback."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.controlplane import ThreadedControlPlane
from tests.helpers.env import valid_config, write_config
from tests.helpers.proc import run_cli

TOKEN = "doctor-test-token-0123456789abcdef"


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args)


@pytest.fixture
def cp() -> Iterator[ThreadedControlPlane]:
    with ThreadedControlPlane(tokens={TOKEN: "*"}) as server:
        yield server


def _good_node(tmp_path: Path, cp: ThreadedControlPlane) -> tuple[dict[str, Any], Path]:
    config = valid_config(tmp_path)
    data = Path(config["datastores"][0]["path"])
    data.chmod(0o755)
    (data / "vitals.csv").write_text("patient,hr\n1,80\n")
    (data / "vitals.csv").chmod(0o644)
    (tmp_path / "token").write_text(TOKEN + "\n")
    config["control_plane"]["url"] = cp.url
    # A group this host has: a missing control group is a ⚠ line (only root may drain).
    config.setdefault("control", {})["group"] = "root"
    unit = tmp_path / "cloudbender-agent.service"
    unit.write_text(
        f"[Service]\nProtectSystem=strict\nStateDirectory=cloudbender-agent\n"
        f"ReadWritePaths={config['state_dir']}\nProtectHome=true\n"
    )
    return config, unit


def _unreadable_datastore(config: dict[str, Any]) -> Path:
    data = Path(config["datastores"][0]["path"])
    data.chmod(0o755)
    (data / "ok.csv").write_text("patient,hr\n1,80\n")
    (data / "ok.csv").chmod(0o644)
    (data / "ward7.csv").write_text("patient,hr\n2,95\n")
    (data / "ward7.csv").chmod(0o600)  # root's, as a copy made with root's umask leaves it
    (data / "icu").mkdir(mode=0o700)
    (data / "icu" / "beds.csv").write_text("bed\n1\n")
    return data


def test_doctor_on_a_good_node_every_line_is_a_tick(
    tmp_path: Path, cp: ThreadedControlPlane
) -> None:
    """Attack (on the administrator's night): a preflight that cannot pass on a healthy
    node trains people to ignore it. Engine up, datastore readable, token 0600, control
    plane accepting the token, unit writable state_dir: every line is ✓, exit 0, the
    token appears nowhere in the output, and no session was opened (a hello would have
    replaced a running agent's)."""
    config, unit = _good_node(tmp_path, cp)
    path = write_config(tmp_path, config)
    proc = _cli("doctor", "--config", str(path), "--unit", str(unit))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) >= 7, proc.stdout
    assert all(line.startswith("✓ ") for line in lines), proc.stdout
    report = proc.stdout
    for needle in ("Docker engine", "datastore vitals", "token file", "MiB free", cp.url):
        assert needle in report
    assert TOKEN not in report + proc.stderr
    # The dial stopped at the upgrade: no hello, so a running agent's session is never
    # replaced by doctor's.
    assert cp.nodes() == {}


def test_doctor_shows_a_datastore_the_job_user_cannot_read(
    tmp_path: Path, cp: ThreadedControlPlane
) -> None:
    """Attack (on the consumer's results): a root-owned 0600 file and a 0700 directory in a
    datastore are invisible to the job user (65534); the job skips them and "succeeds" on
    part of the data. doctor must show ✗ naming both, with the fix, and exit non-zero."""
    config, unit = _good_node(tmp_path, cp)
    data = _unreadable_datastore(config)
    path = write_config(tmp_path, config)
    proc = _cli("doctor", "--config", str(path), "--unit", str(unit))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    bad = [line for line in proc.stdout.splitlines() if line.startswith("✗ ")]
    assert len(bad) == 1 and "datastore vitals" in bad[0], proc.stdout
    assert "ward7.csv" in bad[0] and "icu/" in bad[0] and "ok.csv" not in bad[0]
    assert f"setfacl -R -m u:65534:rX {data}" in proc.stdout
    assert f"chmod -R o+rX {data}" in proc.stdout


def test_doctor_shows_a_datastore_directory_closed_to_the_job_user(
    tmp_path: Path, cp: ThreadedControlPlane
) -> None:
    """Attack (on the consumer's results): the datastore directory itself at 0700 gives the
    job an empty /opt/data; doctor must say the job user cannot open it."""
    config, unit = _good_node(tmp_path, cp)
    Path(config["datastores"][0]["path"]).chmod(0o700)
    proc = _cli("doctor", "--config", str(write_config(tmp_path, config)), "--unit", str(unit))
    assert proc.returncode == 1
    assert "✗ datastore vitals" in proc.stdout and "cannot open the directory" in proc.stdout


def test_check_config_warns_about_a_datastore_the_job_user_cannot_read(tmp_path: Path) -> None:
    """Attack (on the consumer's results): check-config said OK for a datastore whose files
    the job user cannot read. It must warn (naming the files) and keep exit code 0."""
    config = valid_config(tmp_path)
    _unreadable_datastore(config)
    proc = _cli("check-config", "--config", str(write_config(tmp_path, config)))
    assert proc.returncode == 0, proc.stderr
    assert "warning: datastore vitals" in proc.stderr
    assert "ward7.csv" in proc.stderr and "icu/" in proc.stderr


def test_doctor_refused_token_and_read_only_state_dir(
    tmp_path: Path, cp: ThreadedControlPlane
) -> None:
    """Attack (on the administrator): a token the control plane refuses, and a state_dir
    outside the unit's writable paths (a watchdog restart loop under systemd), must each be
    a ✗ with its fix; the refused token must not be printed."""
    config, _ = _good_node(tmp_path, cp)
    wrong = "not-the-right-token-0123456789"
    (tmp_path / "token").write_text(wrong)
    unit = tmp_path / "other.service"
    unit.write_text("[Service]\nProtectSystem=strict\nStateDirectory=cloudbender-agent\n")
    proc = _cli("doctor", "--config", str(write_config(tmp_path, config)), "--unit", str(unit))
    assert proc.returncode == 1
    assert "token refused by control plane (HTTP 401)" in proc.stdout
    assert f"ReadWritePaths={config['state_dir']}" in proc.stdout
    assert wrong not in proc.stdout + proc.stderr
