"""A private CA and certificates made by the test with the ``openssl`` command.

The ``cryptography`` package is not in the venv; ``openssl ca`` can set any validity
window (an expired certificate, one not yet valid), which ``openssl x509 -req`` cannot.
Keys are EC P-256: quick to make. Every certificate carries the extensions a strict
verifier (``VERIFY_X509_STRICT``) asks for.
"""

from __future__ import annotations

import itertools
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

_serials = itertools.count(0x1000)

_CA_CONF = """\
[ca]
default_ca = test_ca
[test_ca]
dir = {dir}
database = {dir}/index.txt
new_certs_dir = {dir}/issued
serial = {dir}/serial
default_md = sha256
policy = anything
unique_subject = no
copy_extensions = none
[anything]
commonName = supplied
"""


@dataclass(frozen=True)
class Issued:
    cert: Path
    key: Path
    serial: str  # upper-case hex, as ``getpeercert()`` writes it


class TestCA:
    """A private CA in ``directory``: ``ca.pem`` (its certificate) and its key."""

    __test__ = False  # not a pytest class

    def __init__(self, directory: Path, name: str = "Test CA") -> None:
        if shutil.which("openssl") is None:
            pytest.skip("needs the openssl command")
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)
        (directory / "issued").mkdir(exist_ok=True)
        (directory / "index.txt").write_text("")
        self.conf = directory / "ca.cnf"
        self.conf.write_text(_CA_CONF.format(dir=directory))
        self.cert, self.key = directory / "ca.pem", directory / "ca.key"
        _openssl(
            *("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-days", "30", "-subj", f"/CN={name}"),
            *("-keyout", str(self.key), "-out", str(self.cert)),
            *("-addext", "basicConstraints=critical,CA:TRUE"),
            *("-addext", "keyUsage=critical,keyCertSign,cRLSign"),
            *("-addext", "subjectKeyIdentifier=hash"),
        )

    def issue(
        self,
        name: str,
        cn: str,
        *,
        ip: str | None = None,
        dns: str | None = None,
        server: bool = False,
        start: str | None = None,
        end: str | None = None,
        days: int = 30,
    ) -> Issued:
        """A certificate for ``cn`` in ``<dir>/<name>.pem`` and its key in ``<name>.key``.

        ``start`` / ``end``: ``YYYYMMDDHHMMSSZ``, for a window in the past or future.
        """
        key, csr, cert = (self.dir / f"{name}{ext}" for ext in (".key", ".csr", ".pem"))
        _openssl(
            *("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"),
            *("-nodes", "-subj", f"/CN={cn}", "-keyout", str(key), "-out", str(csr)),
        )
        key.chmod(0o600)
        sans = [f"IP:{ip}"] if ip else []
        sans += [f"DNS:{dns}"] if dns else []
        ext = self.dir / f"{name}.ext"
        lines = [
            "basicConstraints=critical,CA:FALSE",
            "keyUsage=critical,digitalSignature",
            f"extendedKeyUsage={'serverAuth' if server else 'clientAuth'}",
            "subjectKeyIdentifier=hash",
            "authorityKeyIdentifier=keyid",
        ]
        if sans:
            lines.append("subjectAltName=" + ",".join(sans))
        ext.write_text("\n".join(lines) + "\n")
        serial = f"{next(_serials):04X}"
        (self.dir / "serial").write_text(serial + "\n")
        dates = ["-startdate", start] if start else []
        dates += ["-enddate", end] if end else ["-days", str(days)]
        _openssl(
            *("ca", "-batch", "-notext", "-config", str(self.conf), "-cert", str(self.cert)),
            *("-keyfile", str(self.key), "-in", str(csr), "-out", str(cert)),
            *("-extfile", str(ext), *dates),
        )
        return Issued(cert, key, serial)


def _openssl(*args: str) -> None:
    done = subprocess.run(["openssl", *args], capture_output=True, text=True, timeout=60)
    if done.returncode != 0:
        raise RuntimeError(f"openssl {args[0]} failed: {done.stderr}")
