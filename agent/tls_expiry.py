"""When the certificates of ``control_plane`` expire: the warnings of ``check-config``,
``run`` and ``doctor``.

The ``ssl`` module parses a certificate only on a live connection, so ``notAfter`` is
read with ``cryptography``'s X.509 loader, one PEM block at a time; a block it cannot
load is skipped here (the config validation has already said whether the file holds a
usable certificate).
"""

from __future__ import annotations

import re
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path

from agent.config.models import ControlPlaneConfig

WARN_WITHIN = timedelta(days=14)

_PEM = re.compile(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", re.S)


def not_after(pem: bytes) -> list[datetime]:
    """``notAfter`` of each PEM certificate in ``pem``, in file order; certificates that
    cannot be parsed are left out. Raises nothing."""
    # Imported here, not at the top: ``cryptography`` adds about 8 MiB to the daemon's
    # resident memory, and most nodes name no certificate file (the idle budget is
    # 48 MiB, docs/benchmarks.md).
    from cryptography import x509
    from cryptography.utils import CryptographyDeprecationWarning

    found = []
    for block in _PEM.finditer(pem):
        try:
            with warnings.catch_warnings():
                # Old CA certificates (a serial of zero) still have a date to report.
                warnings.simplefilter("ignore", CryptographyDeprecationWarning)
                cert = x509.load_pem_x509_certificate(block.group(0))
            found.append(cert.not_valid_after_utc)
        except ValueError:
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
