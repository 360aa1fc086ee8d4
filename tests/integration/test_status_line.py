"""Issue 12, the unit under a real systemd: ``systemctl status`` tells the link as it is.

The ``STATUS=`` line was refreshed only by the watchdog pass (every 15 s under the
shipped ``WatchdogSec=30``), so for up to 15 s after the link came up, and for ever
without a watchdog, ``systemctl status`` said "connecting" or "disconnected".
"""

from __future__ import annotations

import socket
from pathlib import Path

from agent.controlplane import ThreadedControlPlane
from tests.helpers.env import valid_config, write_config
from tests.helpers.notify import messages_until, statuses
from tests.helpers.proc import running_agent

TOKEN = "s3cr3t-token-for-tests-0123456789"  # what valid_config writes to the token file


def _statuses_until(sock: socket.socket, wanted: str, timeout: float) -> list[str]:
    """Every STATUS= value received until one contains ``wanted``."""

    def done(message: str) -> bool:
        return any(wanted in status for status in statuses([message])[-1:])

    return statuses(messages_until(sock, done, timeout, f"STATUS= with {wanted!r}"))


def test_status_follows_the_link(tmp_path: Path, notify_socket: socket.socket) -> None:
    """Attack (issue 12): an administrator checks `systemctl status cloudbender-agent`
    after the control plane accepted the node and reads "control plane connecting";
    and after the control plane went away reads "connected" for up to 15 s more."""
    cp = ThreadedControlPlane(tokens={TOKEN: "*"})
    cp.start()
    try:
        config = valid_config(tmp_path)
        config["control_plane"]["url"] = cp.url
        config["control_plane"]["reconnect"] = {"initial_s": 0.2, "max_s": 1.0}
        port = int(config["health"]["listen"].rsplit(":", 1)[1])
        path = write_config(tmp_path, config)
        # No WATCHDOG_USEC: no watchdog pass refreshes STATUS=, only the link's changes.
        env = {"NOTIFY_SOCKET": str(tmp_path / "notify.sock")}
        with running_agent(path, port, tmp_path, env=env) as agent:
            _statuses_until(notify_socket, "control plane connected", timeout=10)
            cp.stop()
            _statuses_until(notify_socket, "control plane disconnected", timeout=10)
            assert agent.stop()[0] == 0
    finally:
        cp.stop()
