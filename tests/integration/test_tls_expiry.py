"""``check-config`` and ``doctor`` say when a ``control_plane`` certificate is about to
expire (issue 15): a node must not go dark on the day its certificate lapses."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import certifi

from agent.tls_expiry import not_after
from tests.helpers.certs import TestCA
from tests.helpers.env import valid_config, write_config
from tests.helpers.proc import run_cli


def _stamp(at: datetime) -> str:
    return at.strftime("%Y%m%d%H%M%SZ")


def _config(tmp_path: Path, days_left: float) -> tuple[Path, Path]:
    ca = TestCA(tmp_path / "ca")
    now = datetime.now(UTC)
    client = ca.issue(
        "client", "node-a", start=_stamp(now - timedelta(days=1)),
        end=_stamp(now + timedelta(days=days_left)),
    )  # fmt: skip
    raw = valid_config(tmp_path)
    raw["control_plane"] |= {
        "url": "wss://127.0.0.1:9/agent/v1",
        "ca_file": str(ca.cert),
        "client_cert": str(client.cert),
        "client_key": str(client.key),
    }
    return write_config(tmp_path, raw), client.cert


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return run_cli(*args, timeout=120)


def test_check_config_warns_of_a_client_certificate_expiring_within_14_days(
    tmp_path: Path,
) -> None:
    """A renewal forgotten: the config is valid today, the node is dark in 5 days."""
    path, cert = _config(tmp_path, days_left=5)
    done = _run("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    out = done.stdout + done.stderr
    assert f"control_plane.client_cert: a certificate in {cert} expires on" in out
    assert "control_plane.ca_file" not in out  # the CA has 30 days left


def test_check_config_is_quiet_for_a_certificate_with_a_month_left(tmp_path: Path) -> None:
    path, _ = _config(tmp_path, days_left=30)
    done = _run("check-config", "--config", str(path))
    assert done.returncode == 0, done.stderr
    assert "expires on" not in done.stdout + done.stderr


def test_doctor_shows_the_expiry_line(tmp_path: Path) -> None:
    path, cert = _config(tmp_path, days_left=3)
    done = _run("doctor", "--config", str(path))
    assert f"⚠ control_plane.client_cert: a certificate in {cert} expires on" in done.stdout


def test_not_after_reads_every_certificate_of_a_real_bundle() -> None:
    """The DER walk against the CA bundle every install has: no certificate skipped."""
    pem = Path(certifi.where()).read_bytes()
    ends = not_after(pem)
    assert len(ends) == pem.count(b"-----BEGIN CERTIFICATE-----")
    assert all(end.year > 2000 for end in ends)


def test_a_node_without_certificate_files_never_loads_cryptography(tmp_path: Path) -> None:
    """The expiry check is the only use of ``cryptography``, about 8 MiB of the daemon's
    resident memory (the idle budget is 48 MiB): a node that names no certificate file
    must not pay for it, in the daemon's modules or in its startup warnings."""
    path = write_config(tmp_path, valid_config(tmp_path))
    script = (
        "import sys, pathlib\n"
        "import agent.cli, agent.service, agent.daemon\n"
        "from agent.config.loading import load_config\n"
        "from agent.config.host_warnings import host_warnings\n"
        f"host_warnings(load_config(pathlib.Path({str(path)!r})))\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] == 'cryptography'))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
