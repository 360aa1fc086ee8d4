"""TLS for the reference control plane: ``wss://``, and mutual TLS bound to node ids.

:func:`server_context` builds the context :class:`~agent.controlplane.ControlPlane`
serves with (``ssl=``); with ``client_ca`` it requires every agent to present a client
certificate signed by that CA, and OpenSSL refuses the handshake otherwise.

Which node a certificate may be: its subject's common name (CN) **is** the node id. A
certificate that verifies but whose CN is not the ``node_id`` of the ``hello`` is
refused with close code 4401 (docs/protocol.md §1: credentials refused; the agent retries at
its maximum backoff) and a reason that names both ids. The CN is a choice made for
operators: ``openssl req -subj /CN=gpu-node-01`` is one flag, and the CN is what
``openssl x509 -subject`` shows first. Subject alternative names are not consulted.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path
from typing import Any


def server_context(cert: Path, key: Path | None, client_ca: Path | None = None) -> ssl.SSLContext:
    """A server context presenting ``cert`` (a PEM chain) and ``key``; with
    ``client_ca``, one that requires a client certificate signed by a CA in that PEM.

    Raises ``OSError`` / ``ssl.SSLError`` for files that cannot be used.
    """
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if client_ca is not None:
        context.load_verify_locations(cafile=str(client_ca))
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def requires_client_cert(context: ssl.SSLContext | None) -> bool:
    return context is not None and context.verify_mode is ssl.CERT_REQUIRED


@dataclass(frozen=True)
class PresentedCert:
    """What the control plane saw of a client certificate that OpenSSL verified."""

    common_name: str | None
    serial: str  # upper-case hex, as OpenSSL prints it
    not_after: str  # e.g. "Dec 30 15:35:48 2026 GMT"


def presented_cert(peercert: dict[str, Any] | None) -> PresentedCert | None:
    """``getpeercert()``'s dict (the transport's ``peercert``), or ``None`` without one."""
    if not peercert:
        return None
    names = [
        value for rdn in peercert.get("subject", ()) for name, value in rdn if name == "commonName"
    ]
    return PresentedCert(
        names[0] if len(names) == 1 else None,
        str(peercert.get("serialNumber", "")),
        str(peercert.get("notAfter", "")),
    )


def node_refusal(cert: PresentedCert | None, node_id: str) -> str | None:
    """The close reason when ``cert`` may not be ``node_id``, else ``None``. Short: a
    close reason is at most 123 bytes, so long ids are clipped."""
    if cert is None:
        return "client certificate required"
    if cert.common_name != node_id:
        reason = f"client certificate is for node {cert.common_name!r:.40}, not {node_id!r:.40}"
        return reason.encode()[:123].decode(errors="ignore")
    return None
