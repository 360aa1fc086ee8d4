"""``doctor`` on a config with an invalid section: it must not report on the defaults.

In-process (``run_doctor`` writing to a string), the real Docker engine and file system;
no control plane is dialled, since every config here has a problem in that section or
none is configured.
"""

from __future__ import annotations

import io
from pathlib import Path

from agent.doctor import run_doctor
from tests.helpers.env import valid_config, write_config


def _doctor(tmp_path: Path, config: dict[str, object]) -> tuple[bool, str]:
    path = write_config(tmp_path, config)
    unit = tmp_path / "cloudbender-agent.service"
    unit.write_text("[Service]\nProtectSystem=strict\nStateDirectory=cloudbender-agent\n")
    out = io.StringIO()
    return run_doctor(path, out, unit=unit), out.getvalue()


def test_token_file_0644_is_checked_and_the_control_plane_is_not_called_missing(
    tmp_path: Path,
) -> None:
    """Attack (an untrue report): with a 0644 token file the control_plane section is
    invalid, and doctor used to fall back to its default, saying "no control_plane
    configured: this node will never get a job" and leaving out the token mode line,
    so the administrator chased a missing section instead of running chmod."""
    config = valid_config(tmp_path)
    token = tmp_path / "token"
    token.chmod(0o644)
    ok, report = _doctor(tmp_path, config)
    assert not ok, report
    assert "no control_plane configured" not in report, report
    assert f"✗ token file {token} has mode 0644" in report, report
    assert f"fix: chmod 600 {token}" in report, report
    assert (
        "✗ the control plane and the token: not checked, because of the config "
        "problem in control_plane shown above" in report
    ), report


def test_bad_state_dir_is_not_replaced_by_the_default(tmp_path: Path) -> None:
    """Attack (an untrue report): with an invalid state_dir doctor used to check the
    default /var/lib/cloudbender-agent instead and print ✓ for it (free space and the
    unit's ReadWritePaths), so a node whose configured directory is wrong looked fine."""
    config = valid_config(tmp_path)
    config["state_dir"] = ["/srv/state"]  # a list where a path belongs
    ok, report = _doctor(tmp_path, config)
    assert not ok, report
    assert "/var/lib/cloudbender-agent" not in report, report
    for what in ("free space in the state directory", "the systemd unit against state_dir"):
        assert f"✗ {what}: not checked, because of the config problem in state_dir" in report
    # The sections that are valid are still checked.
    assert "✓ datastore vitals" in report, report
    assert f"✓ token file {tmp_path / 'token'} has mode 0600" in report, report
