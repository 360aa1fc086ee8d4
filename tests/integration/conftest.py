"""Fixtures shared by the integration tests (real agent processes on loopback)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[socket.socket]:
    """A unix datagram socket where a daemon given it as NOTIFY_SOCKET sends its
    sd_notify messages, as systemd would receive them."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(tmp_path / "notify.sock"))
    sock.settimeout(0.2)
    yield sock
    sock.close()
