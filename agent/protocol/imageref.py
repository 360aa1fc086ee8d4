"""Is a string a Docker image reference? The grammar of distribution/reference, pure.

docs/protocol.md 1.1 makes admission parse ``image.ref`` as a reference: a ref is shown in
logs, ``/status`` and the audit ledger, and one that is any string at all could carry
terminal escapes, newlines or bidi overrides into all three. The grammar below is that
of ``github.com/distribution/reference`` (``reference.go`` / ``regexp.go``), which
the Docker engine itself parses refs with::

    reference        := name [ ":" tag ] [ "@" digest ]
    name             := [domain "/"] remote-name          (255 characters at most)
    domain           := host [":" port-number]
    host             := domain-name | "[" IPv6address "]"
    domain-name      := domain-component ["." domain-component]*
    domain-component := /[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]/
    port-number      := /[0-9]+/
    remote-name      := path-component ["/" path-component]*
    path-component   := alpha-numeric [separator alpha-numeric]*
    alpha-numeric    := /[a-z0-9]+/                       (lowercase only)
    separator        := /[_.]|__|[-]+/
    tag              := /[\\w][\\w.-]{0,127}/
    digest           := algorithm ":" hex

One deliberate narrowing: the digest must be one the engine can verify, ``sha256``,
``sha384`` or ``sha512`` with exactly as many lowercase hex digits as that algorithm
gives (go-digest refuses the rest too when it pulls). ``\\w`` is spelled out as
ASCII: Python's ``\\w`` would admit any Unicode letter.
"""

from __future__ import annotations

import re

MAX_NAME = 255  # distribution/reference: NameTotalLengthMax

_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_DOMAIN_NAME = rf"{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})*"
_IPV6 = r"\[[a-fA-F0-9:]+\]"
_DOMAIN = rf"(?:{_DOMAIN_NAME}|{_IPV6})(?::[0-9]+)?"
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[_.]|__|-+)[a-z0-9]+)*"
_REMOTE_NAME = rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
_NAME = rf"(?:{_DOMAIN}/)?{_REMOTE_NAME}"
_TAG = r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
_DIGEST = r"sha256:[0-9a-f]{64}|sha384:[0-9a-f]{96}|sha512:[0-9a-f]{128}"
# re.ASCII: no Unicode digits or letters sneak in through a character class.
_REFERENCE = re.compile(rf"(?P<name>{_NAME})(?::{_TAG})?(?:@(?:{_DIGEST}))?", re.ASCII)

GRAMMAR = "[host[:port]/]path[:tag][@digest], lowercase path components, name of 255 at most"


def is_image_ref(text: str) -> bool:
    """Whether ``text`` is a reference by the grammar above. Never raises.

    The tag and digest are matched after the name, as the engine does: ``a:b:c`` and
    ``UPPER/case`` are not references, ``localhost:5000/x:1`` and
    ``registry.example/p/m:2@sha256:<64 hex>`` are.
    """
    match = _REFERENCE.fullmatch(text)
    return match is not None and len(match.group("name")) <= MAX_NAME
