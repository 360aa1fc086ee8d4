"""``wss://`` and mutual TLS against real TLS servers on loopback (issue 15).

The agent's :class:`Connection` dials the reference control plane served with
certificates this test makes (a private CA, a server certificate for 127.0.0.1, client
certificates whose CN is the node id). Each refusal must come with words a person can
act on and the right retry class; one real agent process shows them in ``/status``,
``status`` and the log, with no key material and no token. ``openssl s_server`` stands
in for a control plane that sends TLS alerts (the reference one, like every asyncio
server, drops the connection without one).
"""

from __future__ import annotations

import shutil
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.controlplane.mtls import server_context
from agent.health.facts import ControlPlaneFacts
from tests.helpers.certs import Issued, TestCA
from tests.helpers.env import free_port, seconds
from tests.helpers.proc import run_cli, running_agent
from tests.integration.test_control_plane_session import (
    NODE,
    TOKEN,
    agent_config,
    control_plane,
    wait_status,
)
from tests.integration.test_hostile_control_plane import _config, errors, run_connection


@dataclass(frozen=True)
class Pki:
    ca: TestCA
    other: TestCA  # a CA nobody trusts
    server: Issued  # for 127.0.0.1
    client: Issued  # CN = NODE
    rotated: Issued  # CN = NODE, a later serial
    other_node: Issued  # CN = another node, by the trusted CA
    foreign_client: Issued  # CN = NODE, by the other CA


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = TestCA(tmp_path_factory.mktemp("ca"))
    other = TestCA(tmp_path_factory.mktemp("other"), "Other CA")
    return Pki(
        ca,
        other,
        ca.issue("server", "cp", ip="127.0.0.1", server=True),
        ca.issue("client", NODE),
        ca.issue("rotated", NODE),
        ca.issue("other-node", "other-node"),
        other.issue("foreign", NODE),
    )


def _agent(tmp_path: Path, url: str, ca: Path, client: Issued | None, **extra: Any) -> Any:
    tls: dict[str, Any] = {"ca_file": str(ca)}
    if client is not None:
        tls |= {"client_cert": str(client.cert), "client_key": str(client.key)}
    return _config(tmp_path, url, **tls, **extra)


def _refused(config: Any, server: Issued, client_ca: Path | None) -> ControlPlaneFacts:
    """The first failure the agent reports against a reference CP serving ``server``."""
    ctx = server_context(server.cert, server.key, client_ca)
    with control_plane(ssl=ctx) as cp:
        config = _with_url(config, cp.url)
        published = run_connection(config, lambda p: bool(errors(p)))
    return next(f for f in published if f.state != "connecting" and f.last_error)


def _with_url(config: Any, url: str) -> Any:
    return config.model_copy(update={"url": url})


def test_wss_with_ca_file_and_mutual_tls_connects_and_binds_the_node(
    tmp_path: Path, pki: Pki
) -> None:
    """The happy path nobody had run: a private CA, ``ca_file``, a client certificate."""
    ctx = server_context(pki.server.cert, pki.server.key, pki.ca.cert)
    with control_plane(ssl=ctx) as cp:
        config = _agent(tmp_path, cp.url, pki.ca.cert, pki.client)
        run_connection(config, lambda p: any(f.state == "connected" for f in p))
        seen = cp.client_certs[NODE]
    assert cp.url.startswith("wss://127.0.0.1:")
    assert [(c.common_name, c.serial) for c in seen] == [(NODE, pki.client.serial)]


@pytest.mark.parametrize(
    ("case", "words"),
    [
        ("untrusted", "it is not signed by a CA in the CA file {other_ca}"),
        ("name", "it is not issued for the host name or address in control_plane.url"),
        ("expired", "it has expired"),
        ("not_yet", "it is not valid yet (is this node's clock right?)"),
    ],
)
def test_a_server_certificate_the_agent_refuses_is_said_and_retried_at_max(
    tmp_path: Path, pki: Pki, case: str, words: str
) -> None:
    """A man in the middle (another CA, another name) or a lapsed certificate: the agent
    must refuse it, say which, and not hammer the control plane."""
    server, ca = pki.server, pki.ca.cert
    if case == "untrusted":
        ca = pki.other.cert
    elif case == "name":
        server = pki.ca.issue("by-name", "cp", dns="cp.example", server=True)
    elif case == "expired":
        server = pki.ca.issue("old", "cp", ip="127.0.0.1", server=True, **_PAST)
    elif case == "not_yet":
        server = pki.ca.issue("new", "cp", ip="127.0.0.1", server=True, **_FUTURE)
    facts = _refused(_agent(tmp_path, "wss://x/", ca, pki.client), server, None)
    expected = "agent refused the control plane's TLS certificate: " + words.format(
        other_ca=pki.other.cert
    )
    assert facts.last_error is not None and facts.last_error.startswith(expected), facts
    assert facts.state == "disconnected"
    assert facts.backoff_s is not None and facts.backoff_s >= 0.5  # reconnect.max_s


_PAST = {"start": "20200101000000Z", "end": "20200201000000Z"}
_FUTURE = {"start": "20400101000000Z", "end": "20400201000000Z"}


@pytest.mark.parametrize("case", ["missing", "foreign"])
def test_a_client_certificate_the_reference_cp_refuses_is_said(
    tmp_path: Path, pki: Pki, case: str
) -> None:
    """The reference CP (asyncio) drops the connection without a TLS alert: the agent
    still says what is most likely wrong, naming its own certificate file."""
    client = None if case == "missing" else pki.foreign_client
    facts = _refused(_agent(tmp_path, "wss://x/", pki.ca.cert, client), pki.server, pki.ca.cert)
    guess = (
        "if it requires a client certificate, control_plane.client_cert is not set"
        if client is None
        else f"it may have refused the client certificate in {client.cert}"
    )
    head = "control plane closed the connection after the TLS handshake: "
    assert facts.last_error is not None and facts.last_error.startswith(head + guess), facts


def test_a_certificate_for_another_node_is_refused_4401(tmp_path: Path, pki: Pki) -> None:
    """A stolen but valid certificate of node B used by node A: refused at hello."""
    config = _agent(tmp_path, "wss://x/", pki.ca.cert, pki.other_node)
    facts = _refused(config, pki.server, pki.ca.cert)
    assert facts.state == "auth_failed"
    assert facts.last_error == (
        "token or client certificate refused by control plane (close 4401): "
        "client certificate is for node 'other-node', not 'test-node'"
    )


@pytest.fixture
def alerting_server(pki: Pki) -> Iterator[int]:
    """``openssl s_server`` requiring a client certificate of the trusted CA: a TLS
    server that, unlike asyncio's, sends the alert when it refuses one."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command")
    port = free_port()
    proc = subprocess.Popen(
        [
            *("openssl", "s_server", "-quiet", "-accept", f"127.0.0.1:{port}"),
            *("-cert", str(pki.server.cert), "-key", str(pki.server.key)),
            *("-Verify", "1", "-verify_return_error", "-CAfile", str(pki.ca.cert)),
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield port
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize("case", ["missing", "foreign", "expired"])
def test_a_tls_alert_about_the_client_certificate_is_auth_failed(
    tmp_path: Path, pki: Pki, alerting_server: int, case: str
) -> None:
    """A server that asks for a client certificate and refuses ours (or its absence)
    with an alert: the agent says which, and retries at the maximum backoff only."""
    client = {
        "missing": None,
        "foreign": pki.foreign_client,
        "expired": pki.ca.issue("expired-client", NODE, **_PAST),
    }[case]
    url = f"wss://127.0.0.1:{alerting_server}/agent/v1"
    config = _agent(tmp_path, url, pki.ca.cert, client)
    published = run_connection(config, lambda p: bool(errors(p)), timeout=seconds(20))
    facts = next(f for f in published if f.state != "connecting" and f.last_error)
    why = {
        "missing": "it requires one, and control_plane.client_cert is not set",
        "foreign": f"the certificate in {client and client.cert}: it is not signed by a CA "
        "the control plane trusts",
        "expired": f"the certificate in {client and client.cert}: it has expired",
    }[case]
    assert facts.state == "auth_failed", facts
    assert facts.last_error == f"client certificate missing or refused by control plane: {why}"
    assert facts.backoff_s is not None and facts.backoff_s >= 0.5


def test_a_rotated_client_certificate_is_presented_at_the_next_dial(
    tmp_path: Path, pki: Pki
) -> None:
    """Renewal without a restart: new files on disk, the session dropped, and the next
    dial must present the new certificate (not one cached at start)."""
    ctx = server_context(pki.server.cert, pki.server.key, pki.ca.cert)
    cert, key = tmp_path / "node.pem", tmp_path / "node.key"
    shutil.copy(pki.client.cert, cert)
    shutil.copy(pki.client.key, key)
    with control_plane(ssl=ctx) as cp:
        config = _config(
            tmp_path, cp.url, ca_file=str(pki.ca.cert), client_cert=str(cert), client_key=str(key)
        )

        def rotate_once_connected(published: list[ControlPlaneFacts]) -> bool:
            if len(cp.client_certs.get(NODE, [])) == 1 and not rotated:
                shutil.copy(pki.rotated.cert, cert)
                shutil.copy(pki.rotated.key, key)
                # From another thread: this loop must answer the close handshake.
                dropper = threading.Thread(target=cp.disconnect_all, args=(1001, "rotate"))
                dropper.start()
                rotated.append(dropper)
            return len(cp.client_certs.get(NODE, [])) >= 2

        rotated: list[threading.Thread] = []
        run_connection(config, rotate_once_connected, timeout=seconds(20))
        for dropper in rotated:
            dropper.join(seconds(10))
        serials = [c.serial for c in cp.client_certs[NODE]]
    assert serials[:2] == [pki.client.serial, pki.rotated.serial]


def test_the_words_reach_status_and_the_log_without_secrets(tmp_path: Path, pki: Pki) -> None:
    """A refused certificate on a real agent: ``/status``, ``status`` and the log say
    why; none of them shows the token or the private key."""
    ctx = server_context(pki.server.cert, pki.server.key, pki.ca.cert)
    with control_plane(ssl=ctx) as cp:
        path, port = agent_config(tmp_path, cp.url)
        raw = yaml.safe_load(path.read_text())
        raw["control_plane"] |= {
            "ca_file": str(pki.ca.cert),
            "client_cert": str(pki.other_node.cert),
            "client_key": str(pki.other_node.key),
        }
        path.write_text(yaml.safe_dump(raw))
        with running_agent(path, port, tmp_path) as agent:
            status = wait_status(agent, "auth_failed", timeout=20)
            shown = run_cli("status", "--config", str(path))
            assert agent.stop()[0] == 0
            log = agent.log()
    words = "client certificate is for node 'other-node', not 'test-node'"
    assert words in status["last_error"]
    assert words in shown.stdout
    assert words in log
    key_body = pki.other_node.key.read_text().splitlines()[1]
    for text in (str(status), shown.stdout, log):
        assert TOKEN not in text and key_body not in text and "PRIVATE KEY" not in text
