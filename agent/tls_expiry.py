"""When the certificates of ``control_plane`` expire: the warnings of ``check-config``,
``run`` and ``doctor``.

The ``ssl`` module parses a certificate only on a live connection, and the
``cryptography`` package is not a dependency, so this reads ``notAfter`` from the DER
itself: Certificate → tbsCertificate → (version, serial, signature, issuer) → validity.
It reads only that walk; a file it cannot walk is skipped here (the config validation
has already said whether the file holds a usable certificate).
"""

from __future__ import annotations

import base64
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.config.models import ControlPlaneConfig

WARN_WITHIN = timedelta(days=14)

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def not_after(pem: bytes) -> list[datetime]:
    """``notAfter`` of each PEM certificate in ``pem``, in file order; certificates that
    cannot be parsed are left out. Raises nothing."""
    found = []
    for block in _PEM.findall(pem):
        try:
            found.append(_validity_end(base64.b64decode(block)))
        except (ValueError, IndexError):
            continue
    return found


def expiring(
    cp: ControlPlaneConfig | None, now: datetime | None = None
) -> list[tuple[str, Path, datetime]]:
    """``(key, file, notAfter)`` for each certificate of ``ca_file`` / ``client_cert``
    that has expired or expires within :data:`WARN_WITHIN`. Raises nothing."""
    if cp is None:
        return []
    now = now or datetime.now(UTC)
    found = []
    for key, path in (("ca_file", cp.ca_file), ("client_cert", cp.client_cert)):
        if path is None:
            continue
        try:
            ends = not_after(Path(path).read_bytes())
        except OSError:
            continue  # the config validation reports unreadable files
        # A client_cert file starts with the node's own certificate; the rest is chain.
        for end in ends[:1] if key == "client_cert" else ends:
            if end - now <= WARN_WITHIN:
                found.append((key, Path(path), end))
    return found


def expiry_warnings(cp: ControlPlaneConfig | None, now: datetime | None = None) -> list[str]:
    """:func:`expiring` as ``control_plane.<key>: words`` lines. Raises nothing."""
    now = now or datetime.now(UTC)
    return [f"control_plane.{key}: {when(path, end, now)}" for key, path, end in expiring(cp, now)]


def when(path: Path, end: datetime, now: datetime) -> str:
    stamp = end.strftime("%Y-%m-%d %H:%M UTC")
    if end <= now:
        return f"a certificate in {path} expired on {stamp}; the TLS handshake will fail"
    days = (end - now).days
    return (
        f"a certificate in {path} expires on {stamp} (in {days} day(s)); renew it: "
        "the agent reads the new file at its next dial, no restart needed"
    )


def _validity_end(der: bytes) -> datetime:
    _, cert = _open(der, 0, 0x30)  # Certificate
    _, tbs = _open(der, cert, 0x30)  # tbsCertificate
    pos = tbs
    if der[pos] == 0xA0:  # [0] version, optional
        pos = _skip(der, pos)
    for _ in range(3):  # serialNumber, signature, issuer
        pos = _skip(der, pos)
    _, validity = _open(der, pos, 0x30)
    not_before_end = _skip(der, validity)
    tag = der[not_before_end]
    length, start = _length(der, not_before_end + 1)
    text = der[start : start + length].decode("ascii")
    if tag == 0x17:  # UTCTime: YYMMDDHHMMSSZ, years 1950-2049 (RFC 5280 §4.1.2.5.1)
        year = int(text[:2])
        text = f"{1900 + year if year >= 50 else 2000 + year}{text[2:]}"
    elif tag != 0x18:  # GeneralizedTime
        raise ValueError("notAfter is not a time")
    return datetime.strptime(text, "%Y%m%d%H%M%SZ").replace(tzinfo=UTC)


def _length(der: bytes, pos: int) -> tuple[int, int]:
    """(length, where the content starts) for the length octets at ``pos``."""
    first = der[pos]
    if first < 0x80:
        return first, pos + 1
    count = first & 0x7F
    if not 0 < count <= 4:
        raise ValueError("bad DER length")
    return int.from_bytes(der[pos + 1 : pos + 1 + count], "big"), pos + 1 + count


def _open(der: bytes, pos: int, tag: int) -> tuple[int, int]:
    if der[pos] != tag:
        raise ValueError(f"expected tag {tag:#x}")
    return _length(der, pos + 1)


def _skip(der: bytes, pos: int) -> int:
    length, start = _length(der, pos + 1)
    return start + length
