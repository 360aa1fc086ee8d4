"""Item 5 of the hostile review: taking the agent down through its health port.

Any local user can connect to 127.0.0.1:8787. 1,100 idle connections used to exhaust
the agent's descriptors; the sampler's ``EMFILE`` then ended the daemon, and under
systemd the user could repeat it after every restart. These tests reproduce the attack
against the health server alone (short limits, so they run in about a second each),
against a real agent process, and against the daemon's loops.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import resource
import select
import signal
import socket
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import pytest
import structlog

import agent.daemon
import agent.sampling
from agent.config import load_config
from agent.daemon import Daemon
from agent.gpu.base import GpuInventory
from agent.health.server import MAX_CONNECTIONS, REQUEST_TIMEOUT_S, Endpoints, HealthServer
from agent.loops import LoopFailures, every
from agent.runtime.docker import DockerRuntime
from agent.systemd import Notifier
from tests.helpers.env import seconds, valid_config, write_config
from tests.helpers.proc import AgentProcess, running_agent
from tests.helpers.waiting import wait_until

ATTACK_CONNECTIONS = 1100
# The agent's descriptor limit during the attack: low, so that the old server (one
# descriptor per idle connection, no cap) ran out after some 230 connections.
AGENT_NOFILE = 256


@contextmanager
def health_server(*, timeout_s: float, max_connections: int = 8) -> Iterator[HealthServer]:
    endpoints = Endpoints(problems=lambda: [], status=lambda: {}, metrics=lambda: b"")
    server = HealthServer(
        "127.0.0.1",
        0,
        endpoints,
        request_timeout_s=timeout_s,
        max_connections=max_connections,
    )
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _connect(server: HealthServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=seconds(5))


def _dropped_within(sock: socket.socket, timeout: float) -> bool:
    """Whether the server closes ``sock`` (EOF or reset) within ``timeout`` seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def _healthz(url: str, timeout: float) -> int | None:
    """The status of one GET, or None when the connection was refused or dropped."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, urllib.error.URLError):
        return None


def test_an_idle_connection_is_dropped_after_the_request_timeout() -> None:
    """Attack: open a connection and send nothing, holding a descriptor and a thread
    of the agent's for as long as the attacker likes."""
    timeout = seconds(0.5)
    with health_server(timeout_s=timeout) as server, _connect(server) as idle:
        start = time.monotonic()
        assert _dropped_within(idle, timeout + seconds(3))
        assert time.monotonic() - start >= timeout * 0.9


def test_a_request_sent_a_byte_at_a_time_is_dropped_at_the_deadline() -> None:
    """Attack (slowloris): send the request slowly, one byte well within any read
    timeout, so that a timeout per read never fires and the connection lives for ever."""
    timeout = seconds(0.5)
    pace = timeout / 5
    trickle = b"GET /healthz HTTP/1.1\r\nX-Slow: " + b"a" * 10_000
    with health_server(timeout_s=timeout) as server, _connect(server) as slow:
        start = time.monotonic()
        dropped = False
        for byte in trickle:
            try:
                slow.sendall(bytes([byte]))
            except (BrokenPipeError, ConnectionResetError):
                dropped = True
                break
            readable, _, _ = select.select([slow], [], [], pace)  # the attacker's pace
            if readable and _dropped_within(slow, seconds(1)):
                dropped = True
                break
            if time.monotonic() - start > timeout + seconds(3):
                break
        assert dropped, "a slow request kept its connection past the deadline"


def test_connections_over_the_cap_are_closed_at_once_and_healthz_comes_back() -> None:
    """Attack: open more idle connections than the server may hold. Those over the cap
    must be closed at once (not queued, holding descriptors); once the idle ones are
    dropped, a well-behaved client gets its answer."""
    timeout = seconds(2)
    cap = 4
    with (
        health_server(timeout_s=timeout, max_connections=cap) as server,
        ExitStack() as stack,
        structlog.testing.capture_logs() as logged,
    ):
        held = [stack.enter_context(_connect(server)) for _ in range(cap)]
        start = time.monotonic()
        over = [stack.enter_context(_connect(server)) for _ in range(3)]
        # Well before the held ones time out, every one over the cap is closed.
        assert all(_dropped_within(sock, timeout / 2) for sock in over)
        assert time.monotonic() - start < timeout
        refused = [e for e in logged if e["event"] == "health_connection_refused"]
        assert len(refused) == 1  # three refusals, one log line
        assert all(_dropped_within(sock, timeout + seconds(3)) for sock in held)
        host, port = server.address
        assert _healthz(f"http://{host}:{port}/healthz", seconds(5)) == 200


def _raise_own_nofile(wanted: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"the attacker needs {wanted} descriptors; the hard limit is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _held(pid: int, port: int) -> int:
    """How many accepted connections to ``port`` process ``pid`` holds a descriptor of."""
    inodes: set[str] = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        with contextlib.suppress(OSError):  # closed meanwhile
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    held = set()
    # Read in chunks while the table changes, the file may list a socket twice: count
    # sockets, not lines.
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port, state, inode = int(fields[1].rsplit(":", 1)[1], 16), fields[3], fields[9]
        if local_port == port and state != "0A" and inode in inodes:  # 0A: LISTEN
            held.add(inode)
    return len(held)


def test_a_real_agent_survives_1100_idle_connections(tmp_path: Path) -> None:
    """Attack (hostile review, item 5): a local user opens 1,100 idle connections to the
    health port of a real agent whose descriptor limit is 256, and keeps them open. The
    agent must hold no more than its cap of them, drop the ones it holds, not exit, and
    answer /healthz again, while the attacker still holds every one open."""
    _raise_own_nofile(ATTACK_CONNECTIONS + 200)
    config = valid_config(tmp_path, control_plane=False)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    with running_agent(path, port, tmp_path) as agent:
        pid = agent.proc.pid
        _wait_recovery(agent)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (AGENT_NOFILE, AGENT_NOFILE))
        with ExitStack() as attack:
            for _ in range(ATTACK_CONNECTIONS):
                sock = attack.enter_context(socket.socket())
                # One SYN retry: a connection the full backlog turned away gives up
                # after a second or so instead of arriving up to two minutes later.
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_SYNCNT, 1)
                sock.setblocking(False)
                sock.connect_ex(("127.0.0.1", port))

            start, peak, held = time.monotonic(), 0, 0
            deadline = start + seconds(REQUEST_TIMEOUT_S * 4)
            while time.monotonic() < deadline:
                assert agent.proc.poll() is None, f"the agent exited:\n{agent.log()}"
                held = _held(pid, port)
                peak = max(peak, held)
                if held == 0 and time.monotonic() - start > REQUEST_TIMEOUT_S:
                    break
                time.sleep(seconds(0.05))
            assert peak > MAX_CONNECTIONS // 2, "the attack never reached the agent"
            # Never more than the cap held (plus the one being accepted to be refused),
            # whatever was attempted, and each one dropped after the request timeout
            # although the attacker still holds it open.
            assert peak <= MAX_CONNECTIONS + 1, peak
            assert held == 0, f"{held} idle connections still held"
            assert _healthz(agent.url("/healthz"), seconds(5)) == 200, agent.log()
            assert "task_failed" not in agent.log()
        assert agent.stop()[0] == 0


def _wait_recovery(agent: AgentProcess) -> None:
    """Until the agent's startup recovery is done, or waits for an engine (without one it
    retries every 10 s, and a failure to list is retried, never fatal)."""
    wait_until(
        lambda: "jobs_recovered" in (log := agent.log()) or "job_recovery_waiting" in log,
        "job recovery",
        seconds(15),
    )


def _cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_an_agent_out_of_descriptors_neither_spins_nor_exits(tmp_path: Path) -> None:
    """Attack (hostile review, item 5): with the agent out of descriptors, one connection
    to the health port made accept() fail with EMFILE at once, again and again: the
    serving thread burnt a core for as long as the attacker's connection waited. The
    agent must idle, stay up, and answer the waiting client once descriptors are back."""
    config = valid_config(tmp_path, control_plane=False)
    port = int(config["health"]["listen"].rsplit(":", 1)[1])
    path = write_config(tmp_path, config)
    with running_agent(path, port, tmp_path) as agent:
        pid = agent.proc.pid
        # Startup done (its job recovery opens directories too), so that only the
        # health server meets the lack of descriptors.
        _wait_recovery(agent)
        full = len(os.listdir(f"/proc/{pid}/fd"))
        soft, hard = resource.prlimit(pid, resource.RLIMIT_NOFILE)
        resource.prlimit(pid, resource.RLIMIT_NOFILE, (full, hard))  # only the soft one
        with socket.create_connection(("127.0.0.1", port), timeout=seconds(10)) as waiting:
            waiting.sendall(b"GET /healthz HTTP/1.1\r\nHost: agent\r\n\r\n")
            before, start = _cpu_s(pid), time.monotonic()
            time.sleep(seconds(1))  # the window in which a spinning server burns its core
            burnt = _cpu_s(pid) - before
            assert burnt < 0.3 * (time.monotonic() - start), f"{burnt:.2f} s of CPU"
            assert agent.proc.poll() is None, agent.log()
            resource.prlimit(pid, resource.RLIMIT_NOFILE, (soft, hard))
            assert waiting.recv(64).startswith(b"HTTP/1.1 200 ")
        assert agent.proc.poll() is None
        assert "task_failed" not in agent.log()
        assert agent.stop()[0] == 0


class _OutOfDescriptors:
    """A GPU backend and a host sampler that fail as they do once descriptors run out."""

    def __init__(self, calls: dict[str, int], what: str) -> None:
        self._calls, self._what = calls, what

    def _fail(self) -> None:
        self._calls[self._what] = self._calls.get(self._what, 0) + 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    def snapshot(self) -> GpuInventory:
        self._fail()
        raise AssertionError("unreachable")

    def sample(self) -> None:
        self._fail()

    def close(self) -> None:
        pass


def test_sampler_and_state_dir_check_failing_with_emfile_do_not_end_the_daemon(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Attack (hostile review, item 5): once the process is out of descriptors, psutil,
    NVML and the state-directory probe raise OSError(EMFILE); the first one used to end
    the daemon (and systemd restarted it for the attacker to repeat). The daemon must
    keep running and serving, and log each kind of failure once, not on every pass."""
    calls: dict[str, int] = {}
    monkeypatch.setattr(agent.daemon, "SAMPLE_INTERVAL_S", seconds(0.02))
    monkeypatch.setattr(agent.daemon, "STATE_DIR_CHECK_S", seconds(0.02))
    monkeypatch.setattr(agent.sampling, "HostSampler", lambda _: _OutOfDescriptors(calls, "host"))

    def state_dir_check(_: Path) -> None:
        calls["state_dir"] = calls.get("state_dir", 0) + 1
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    monkeypatch.setattr(agent.sampling, "check_state_dir", state_dir_check)
    config = load_config(write_config(tmp_path, valid_config(tmp_path, control_plane=False)))
    daemon = Daemon(
        config,
        gpu=_OutOfDescriptors(calls, "gpu"),
        notifier=Notifier({}),
        runtime=DockerRuntime(config.runtime.docker_host),
    )
    url = f"http://{config.health.listen}/healthz"

    async def scenario() -> int | None:
        task = asyncio.create_task(daemon.run())
        deadline = time.monotonic() + seconds(20)
        while min(calls.get(k, 0) for k in ("host", "gpu", "state_dir")) < 5:
            assert not task.done(), f"the daemon stopped: {daemon.failure!r}"
            assert time.monotonic() < deadline, calls
            await asyncio.sleep(seconds(0.02))
        code = await asyncio.to_thread(_healthz, url, seconds(5))
        assert not task.done(), f"the daemon stopped: {daemon.failure!r}"
        os.kill(os.getpid(), signal.SIGTERM)  # its handler is installed: the daemon stops
        await asyncio.wait_for(task, seconds(15))
        return code

    with structlog.testing.capture_logs() as logged:
        code = asyncio.run(scenario())
    assert daemon.failure is None
    assert code == 200
    failed = [(e["loop"], e["kind"]) for e in logged if e["event"] == "loop_failed"]
    assert sorted(failed) == [
        ("gpu-sampler", "OSError[EMFILE]"),
        ("host-sampler", "OSError[EMFILE]"),
        ("state-dir-check", "OSError[EMFILE]"),
    ]
    assert not [e for e in logged if e["event"] == "task_failed"]


def test_a_failing_loop_goes_on_but_still_stops_when_cancelled() -> None:
    """Attack (hostile review, item 5): the failure that must not end a loop (EMFILE on
    every pass) must not make it unstoppable either: swallowing CancelledError would
    hang the daemon's shutdown, and systemd would SIGKILL it mid-write."""
    passes = 0

    async def out_of_descriptors() -> None:
        nonlocal passes
        passes += 1
        if passes == 3:
            await asyncio.Event().wait()  # a slow pass: the stop arrives in the middle of it
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    async def scenario() -> None:
        failures = LoopFailures()
        task = asyncio.create_task(
            every("sampler", 0.0, out_of_descriptors, failures, wait_first=False)
        )
        while passes < 3:
            assert not task.done()
            await asyncio.sleep(0)
        task.cancel()
        # Not wait_for: it would wait for ever on a task that swallows its cancellation.
        await asyncio.wait({task}, timeout=seconds(5))
        assert task.cancelled()

    with structlog.testing.capture_logs():
        asyncio.run(scenario())
