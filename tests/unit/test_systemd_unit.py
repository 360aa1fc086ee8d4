"""The shipped unit file, checked by systemd's own tools without a running systemd.

``systemd-analyze`` is required, not optional: a unit that systemd would half-ignore
is a silent loss of hardening, so a machine without it fails here (CI installs systemd).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "cloudbender-agent.service"
SHIPPED_EXEC_START = "ExecStart=/usr/local/bin/cloudbender-agent run"
MAX_EXPOSURE = 2.5
# A guard against a hung tool, not a wait: systemd-analyze answers in well under a second.
TIMEOUT_S = 60.0


def _systemd_analyze(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("systemd-analyze")
    if binary is None:
        pytest.fail("systemd-analyze not found: install systemd (apt-get install systemd)")
    return subprocess.run(
        [binary, *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SYSTEMD_COLORS": "0"},
        check=False,
    )


@pytest.fixture
def unit_copy(tmp_path: Path) -> Path:
    # verify reports "Command ... is not executable" for an ExecStart= binary that is not
    # installed, and it is not installed where tests run. Point it at one that exists;
    # every other line is checked exactly as shipped, under the shipped file name.
    text = UNIT.read_text()
    assert text.count(SHIPPED_EXEC_START + "\n") == 1
    copy = tmp_path / UNIT.name
    copy.write_text(text.replace(SHIPPED_EXEC_START, f"ExecStart={sys.executable} run"))
    return copy


def test_verify_prints_nothing(unit_copy: Path) -> None:
    # verify exits 0 even for unknown keys or bad values: any output at all is a finding.
    result = _systemd_analyze("verify", "--man=no", str(unit_copy))
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_exposure_score_is_ok(unit_copy: Path) -> None:
    result = _systemd_analyze("security", "--offline=true", "--no-pager", str(unit_copy))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match is not None, result.stdout
    assert float(match.group(1)) <= MAX_EXPOSURE, result.stdout


def _directives(text: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";", "[")):
            key, value = line.split("=", 1)
            found.setdefault(key, []).append(value)
    return found


def test_the_contracts_with_the_daemon_are_in_the_unit() -> None:
    # These are promises the code relies on; the score would not notice them missing.
    d = _directives(UNIT.read_text())
    assert d["Type"] == ["notify"]  # agent.systemd sends READY=1
    assert d["NotifyAccess"] == ["main"]
    assert d["WatchdogSec"] == ["30"]  # the agent pings at half of WATCHDOG_USEC
    assert d["RestartPreventExitStatus"] == ["78"]  # agent.cli: ConfigError → 78
    assert d["KillMode"] == ["process"]  # stopping the agent leaves jobs running
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["StateDirectory"] == ["cloudbender-agent"]  # matches config.state_dir's default
    assert d["Environment"] == ["CLOUDBENDER_AGENT_CONFIG=/etc/cloudbender-agent/config.yaml"]
    assert "ProcSubset" not in d  # would hide /proc/stat and /proc/meminfo from psutil
    # Soft = hard, set explicitly: systemd's default soft limit is 1024, and the agent
    # raises no limit itself (docs/systemd.md).
    assert d["LimitNOFILE"] == ["16384"]


def test_run_is_read_only() -> None:
    """Attack (issue 12, systemd 252): a bug in the agent writes under /run (e.g. over
    another service's pid or socket file) although the unit says ProtectSystem=strict:
    ProtectKernelTunables=, ProtectControlGroups= and ProtectProc= imply MountAPIVFS=,
    which leaves /run out of the read-only remount, so /run must be made read-only by
    name, and no ReadWritePaths= may open it (or anything under it) again."""
    d = _directives(UNIT.read_text())
    assert d["ProtectSystem"] == ["strict"]
    assert "/run" in " ".join(d.get("ReadOnlyPaths", [])).split()
    writable = " ".join(d.get("ReadWritePaths", [])).split()
    # A RuntimeDirectory= (its own /run/cloudbender-agent) stays writable: systemd
    # exempts it from ReadOnlyPaths=. Nothing else under /run may be opened again.
    assert not [p for p in writable if p.lstrip("-+") == "/run" or p.startswith("/run/")]


def test_the_control_socket_directory_is_the_units_runtime_directory() -> None:
    """Attack (operational): with ReadOnlyPaths=/run the agent cannot create its control
    socket, or creates it where the operator's group cannot reach it, and `drain` fails
    on the day it is needed. The unit must make /run/cloudbender-agent (writable under
    ReadOnlyPaths=/run, as a RuntimeDirectory=) with a mode the group can traverse, and
    it must be where the config's default socket lives."""
    from agent.config import Config

    d = _directives(UNIT.read_text())
    assert d["RuntimeDirectory"] == ["cloudbender-agent"]
    assert int(d["RuntimeDirectoryMode"][0], 8) & 0o011 == 0o011  # group and others: x
    assert Config().control.socket.parent == Path("/run") / d["RuntimeDirectory"][0]
