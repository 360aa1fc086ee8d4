"""sd_notify against a real unix datagram socket standing in for systemd.

A datagram to a unix socket is queued in the receiver before ``sendto`` returns, so
every check reads without waiting; an empty queue shows up as ``BlockingIOError``.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from agent.systemd import Notifier


def _bind(address: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(address)
    sock.setblocking(False)
    return sock


def _received(sock: socket.socket) -> list[bytes]:
    messages = []
    while True:
        try:
            messages.append(sock.recv(4096))
        except BlockingIOError:
            return messages


@pytest.fixture
def socket_path(tmp_path: Path) -> str:
    return str(tmp_path / "notify")


@pytest.fixture
def systemd(socket_path: str) -> Iterator[socket.socket]:
    sock = _bind(socket_path)
    yield sock
    sock.close()


@pytest.fixture
def notifier(socket_path: str, systemd: socket.socket) -> Iterator[Notifier]:
    n = Notifier({"NOTIFY_SOCKET": socket_path})
    yield n
    n.close()


def test_each_call_sends_one_datagram_as_sd_notify_specifies(
    notifier: Notifier, systemd: socket.socket
) -> None:
    assert notifier.enabled
    notifier.ready()
    notifier.ready("serving 2 GPUs")
    notifier.status("3 jobs running")
    notifier.watchdog()
    notifier.stopping("draining")
    notifier.stopping()

    assert _received(systemd) == [
        b"READY=1",
        b"READY=1\nSTATUS=serving 2 GPUs",
        b"STATUS=3 jobs running",
        b"WATCHDOG=1",
        b"STOPPING=1\nSTATUS=draining",
        b"STOPPING=1",
    ]


def test_abstract_namespace_socket() -> None:
    name = f"cloudbender-test-{secrets.token_hex(8)}"
    systemd = _bind("\0" + name)
    notifier = Notifier({"NOTIFY_SOCKET": "@" + name})
    try:
        notifier.ready()
        assert _received(systemd) == [b"READY=1"]
    finally:
        notifier.close()
        systemd.close()


def test_newline_in_status_cannot_inject_an_assignment(
    notifier: Notifier, systemd: socket.socket
) -> None:
    notifier.status("loading\nREADY=1")
    notifier.stopping("a\r\nMAINPID=1\0WATCHDOG=1")

    first, second = _received(systemd)
    assert first.split(b"\n") == [b"STATUS=loading READY=1"]
    assert second.split(b"\n") == [b"STOPPING=1", b"STATUS=a  MAINPID=1 WATCHDOG=1"]


@pytest.mark.parametrize(
    ("environ", "interval"),
    [
        ({"WATCHDOG_USEC": "30000000"}, 15.0),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())}, 15.0),
        ({"WATCHDOG_USEC": "500"}, 0.00025),
        ({}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "-5"}, None),
        ({"WATCHDOG_USEC": "30s"}, None),
        ({"WATCHDOG_USEC": "30000000", "WATCHDOG_PID": "not-a-pid"}, None),
    ],
)
def test_watchdog_interval_is_half_of_watchdog_usec(
    environ: dict[str, str], interval: float | None
) -> None:
    assert Notifier({"NOTIFY_SOCKET": "/run/x", **environ}).watchdog_interval_s == interval


def test_watchdog_meant_for_another_process_is_ignored() -> None:
    other = str(os.getpid() + 1)
    n = Notifier({"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": other})
    assert n.watchdog_interval_s is None


@pytest.mark.parametrize("value", [None, "", "@", "relative/notify", "vsock:2:1234"])
def test_without_a_usable_notify_socket_everything_is_a_no_op(
    value: str | None, systemd: socket.socket
) -> None:
    n = Notifier({} if value is None else {"NOTIFY_SOCKET": value})
    assert not n.enabled
    n.ready("x")
    n.status("x")
    n.watchdog()
    n.stopping("x")
    n.close()
    assert _received(systemd) == []


def test_reads_os_environ_by_default(
    monkeypatch: pytest.MonkeyPatch, socket_path: str, systemd: socket.socket
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", socket_path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    n = Notifier()
    n.ready()
    n.close()
    assert n.watchdog_interval_s == 1.0
    assert _received(systemd) == [b"READY=1"]
    assert os.environ["NOTIFY_SOCKET"] == socket_path


def test_a_socket_that_goes_away_is_logged_once_and_never_raises(
    notifier: Notifier, systemd: socket.socket, socket_path: str
) -> None:
    notifier.ready()
    systemd.close()
    os.unlink(socket_path)

    with capture_logs() as logs:
        notifier.watchdog()
        notifier.status("still alive")
        notifier.watchdog()
    assert [(e["log_level"], e["event"], e["socket"]) for e in logs] == [
        ("warning", "sd_notify_failed", socket_path)
    ]

    # systemd came back (daemon-reexec): messages flow again, and a new outage is logged.
    back = _bind(socket_path)
    try:
        notifier.watchdog()
        assert _received(back) == [b"WATCHDOG=1"]
    finally:
        back.close()
        os.unlink(socket_path)
    with capture_logs() as logs:
        notifier.watchdog()
    assert len(logs) == 1


def test_a_full_receive_queue_drops_the_message_instead_of_blocking(
    notifier: Notifier, systemd: socket.socket
) -> None:
    systemd.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1)
    with capture_logs() as logs:
        for _ in range(10_000):
            notifier.status("x" * 1000)
    assert [e["event"] for e in logs] == ["sd_notify_failed"]


def test_close_is_idempotent_and_a_later_message_reopens(
    notifier: Notifier, systemd: socket.socket
) -> None:
    notifier.close()
    notifier.close()
    notifier.watchdog()
    assert _received(systemd) == [b"WATCHDOG=1"]
