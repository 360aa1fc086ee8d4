"""What a failed ``wss://`` dial means, in words a person can act on. Pure: no I/O.

A TLS failure reaches the agent in one of three shapes:

1. The agent refused the control plane's certificate: an
   ``ssl.SSLCertVerificationError`` from the handshake, whose ``verify_code`` says why
   (untrusted, name mismatch, expired, not yet valid).
2. The control plane refused the agent's client certificate, or its absence, with a
   TLS alert. In TLS 1.3 the client's half of the handshake is over before the server
   looks at the client certificate, so the alert arrives at the first read: websockets
   then reports "no valid HTTP response", and the alert is the ``ssl.SSLError`` the
   connection was lost with (``lost``).
3. A server that closes without sending that alert (Python's asyncio servers, the
   reference control plane among them, drop the connection at once): only an EOF
   before the upgrade's answer. The agent cannot know why; the words say what the
   likely reason is, given whether a client certificate is configured.

The words name the files used (the CA file, the client certificate), never their
content: no key material, no certificate text, no token.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.protocol.retry import Cause, Ended

# OpenSSL's X509_V_ERR_* codes (x509_vfy.h) that :func:`server_cert_refused` words.
_NOT_YET_VALID = 9
_EXPIRED = 10
_UNTRUSTED = frozenset({2, 18, 19, 20, 21, 24, 27, 28})
_NAME_MISMATCH = frozenset({62, 64})  # host name, IP address

# TLS alerts a server sends about the client certificate (OpenSSL's reason names).
_CLIENT_CERT_ALERTS = {
    "TLSV1_ALERT_UNKNOWN_CA": "it is not signed by a CA the control plane trusts",
    "SSLV3_ALERT_BAD_CERTIFICATE": "the control plane calls it bad",
    "SSLV3_ALERT_CERTIFICATE_EXPIRED": "it has expired",
    "SSLV3_ALERT_CERTIFICATE_REVOKED": "it has been revoked",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "the control plane could not verify it",
    "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE": "its type or usage is not accepted",
    "TLSV1_ALERT_ACCESS_DENIED": "access denied",
}
_CERT_REQUIRED = "TLSV13_ALERT_CERTIFICATE_REQUIRED"


def server_cert_refused(exc: ssl.SSLCertVerificationError, ca_file: Path | None) -> Ended:
    """The agent refused the control plane's certificate: persistent (retrying faster
    cannot mend a certificate), :data:`Cause.TLS_SERVER_CERT`."""
    code = exc.verify_code
    if code in _UNTRUSTED:
        trusted = (
            f"the CA file {ca_file} (control_plane.ca_file) or the system trust store"
            if ca_file is not None
            else "the system trust store (control_plane.ca_file is not set)"
        )
        words = f"it is not signed by a CA in {trusted}"
    elif code in _NAME_MISMATCH:
        words = "it is not issued for the host name or address in control_plane.url"
    elif code == _EXPIRED:
        words = "it has expired"
    elif code == _NOT_YET_VALID:
        words = "it is not valid yet (is this node's clock right?)"
    else:
        words = f"verification failed (OpenSSL error {code})"
    return Ended(Cause.TLS_SERVER_CERT, detail=words)


def client_cert_refused(lost: BaseException | None, client_cert: Path | None) -> Ended | None:
    """The control plane's TLS alert about our client certificate, as :class:`Ended`
    (:data:`Cause.TLS_CLIENT_CERT`), or ``None`` when ``lost`` is no such alert."""
    reason = getattr(lost, "reason", None) if isinstance(lost, ssl.SSLError) else None
    if reason == _CERT_REQUIRED or (reason in _CLIENT_CERT_ALERTS and client_cert is None):
        return Ended(
            Cause.TLS_CLIENT_CERT,
            detail="it requires one, and control_plane.client_cert is not set",
        )
    if reason in _CLIENT_CERT_ALERTS:
        why = _CLIENT_CERT_ALERTS[reason]
        return Ended(
            Cause.TLS_CLIENT_CERT,
            detail=f"the certificate in {client_cert}: {why}",
        )
    return None


def closed_before_answer(client_cert: Path | None) -> Ended:
    """``wss://``: the TLS handshake passed, then the control plane closed without a
    word (shape 3 above). Normal backoff: it may also be a control plane going down."""
    if client_cert is None:
        guess = "if it requires a client certificate, control_plane.client_cert is not set"
    else:
        guess = (
            f"it may have refused the client certificate in {client_cert} "
            "(not signed by a CA it trusts, expired, or issued for another node)"
        )
    return Ended(Cause.TLS_CLOSED, detail=guess)
