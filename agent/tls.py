"""The TLS client context for ``wss://``: system trust store, ``ca_file``, client cert/key.

Built by the config validation (so that ``check-config`` names a bad file by its key)
and again at every dial (so that renewed files are picked up). Nothing here prompts: an
encrypted private key is refused, where OpenSSL would otherwise ask for its passphrase
on the terminal and block the agent. No ``websockets`` here.

``client_cert`` alone is allowed (a PEM holding the certificate and its key);
``client_key`` alone is not.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from agent.errors import AgentError


class TlsSettingError(AgentError):
    """A TLS file of ``control_plane`` cannot be used.

    ``key`` is the config key to blame (``ca_file``, ``client_cert``, ``client_key``);
    ``words`` says what is wrong, naming the file.
    """

    def __init__(self, key: str, words: str) -> None:
        super().__init__(f"control_plane.{key}: {words}")
        self.key, self.words = key, words


class _PassphraseRequired(Exception):
    pass


def _refuse_passphrase() -> bytes:
    raise _PassphraseRequired


def client_context(
    *, ca_file: Path | None, client_cert: Path | None, client_key: Path | None
) -> ssl.SSLContext:
    """A verifying client context. Raises :class:`TlsSettingError`."""
    context = ssl.create_default_context()  # the system trust store
    if ca_file is not None:
        _load_ca(context, ca_file)
    if client_cert is not None:
        check_client_cert(client_cert)
        _load_chain(context, client_cert, client_key)
    elif client_key is not None:
        raise TlsSettingError("client_key", "is set without client_cert")
    return context


def check_ca_file(path: Path) -> None:
    """Raise :class:`TlsSettingError` unless ``path`` holds at least one PEM certificate."""
    _load_ca(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), path)


def check_client_cert(path: Path) -> None:
    """Raise :class:`TlsSettingError` unless ``path`` holds a PEM certificate."""
    # Loaded as a CA bundle, the file's certificates are parsed and any key in it is
    # skipped: this says whether the certificate is usable, apart from the key.
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise TlsSettingError("client_cert", f"{path} holds no PEM certificate") from None
    except OSError as exc:
        raise TlsSettingError("client_cert", f"{path} cannot be read: {exc.strerror}") from None


def check_key_pair(cert: Path, key: Path | None) -> None:
    """Raise :class:`TlsSettingError` unless ``key`` (or, without it, ``cert``) holds an
    unencrypted private key that matches the certificate in ``cert``."""
    _load_chain(ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT), cert, key)


def _load_ca(context: ssl.SSLContext, path: Path) -> None:
    try:
        context.load_verify_locations(cafile=str(path))
    except ssl.SSLError:
        raise TlsSettingError("ca_file", f"{path} holds no PEM certificate") from None
    except OSError as exc:
        raise TlsSettingError("ca_file", f"{path} cannot be read: {exc.strerror}") from None


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path | None) -> None:
    blame, holder = ("client_key", key) if key is not None else ("client_cert", cert)
    try:
        context.load_cert_chain(str(cert), None if key is None else str(key), _refuse_passphrase)
    except _PassphraseRequired:
        raise TlsSettingError(
            blame,
            f"the private key in {holder} is encrypted; the agent cannot ask for a "
            "passphrase: store the key unencrypted, readable by its owner only",
        ) from None
    except ssl.SSLError as exc:
        if exc.reason == "KEY_VALUES_MISMATCH":
            raise TlsSettingError(
                blame, f"the private key in {holder} does not match the certificate in {cert}"
            ) from None
        if key is None:
            raise TlsSettingError(
                "client_key", f"is not set, and {cert} holds no usable PEM private key"
            ) from None
        raise TlsSettingError(blame, f"{holder} holds no usable PEM private key") from None
    except OSError as exc:
        raise TlsSettingError(blame, f"{holder} cannot be read: {exc.strerror}") from None
