"""Issue 12, the unit under a real systemd: a datastore that ProtectHome= hides.

``check-config`` in a root shell found /home/... and passed; the service, whose unit
has ``ProtectHome=true``, said the same path "does not exist", and the administrator
went looking at the disk instead of the unit. The message must name ProtectHome.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from agent.cli import main
from tests.helpers.env import valid_config, write_config

HINT = "under systemd, ProtectHome=true hides /home, /root and /run/user"


@pytest.mark.parametrize("root", ["/home", "/root", "/run/user", "/srv/../home"])
def test_a_missing_datastore_under_a_hidden_dir_names_protect_home(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], root: str
) -> None:
    """Attack (issue 12): the service reports a datastore under /home as missing, as it
    sees it under ProtectHome=true, and nothing points at the unit's setting."""
    config = valid_config(tmp_path, control_plane=False)
    missing = f"{root}/cloudbender-test-{uuid.uuid4().hex}/vitals"  # never exists
    config["datastores"][0]["path"] = missing
    assert main(["check-config", "--config", str(write_config(tmp_path, config))]) == 78
    err = capsys.readouterr().err
    assert f"datastores[0].path: {missing} does not exist ({HINT}" in err, err
    assert "docs/systemd.md" in err


def test_a_missing_datastore_elsewhere_has_no_systemd_hint(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Attack (issue 12, the other side): a typo in /srv/... must read as a typo, not
    send the administrator to the unit's ProtectHome= for a path it does not hide."""
    config = valid_config(tmp_path, control_plane=False)
    config["datastores"][0]["path"] = "/srv/homework/nowhere"
    assert main(["check-config", "--config", str(write_config(tmp_path, config))]) == 78
    err = capsys.readouterr().err
    assert "datastores[0].path: /srv/homework/nowhere does not exist" in err, err
    assert "ProtectHome" not in err
