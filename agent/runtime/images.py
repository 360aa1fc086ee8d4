"""Image references, digests and pull progress: pure helpers for ``agent.runtime.docker``.

No Docker import, no I/O. A reference is ``[registry[:port]/]path[:tag][@sha256:…]``;
a digest pins the image's manifest, so comparing digests is an integrity check
whatever repository name the image was pulled under.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from agent.errors import ImageDigestMismatch, ImageRefInvalid

_DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
# The first component is a registry only if it looks like a host (a dot, a port, or
# localhost), as Docker decides; otherwise it is part of the lowercase path.
_HOST = r"(?:(?:localhost|[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)+)(?::[0-9]+)?|[A-Za-z0-9-]+:[0-9]+)"
_REPO = re.compile(rf"(?:{_HOST}/)?{_COMPONENT}(?:/{_COMPONENT})*")
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


@dataclass(frozen=True)
class ImageRef:
    """A parsed reference. ``tag`` and ``digest`` are ``None`` when not written."""

    repo: str
    tag: str | None
    digest: str | None

    @property
    def by_tag(self) -> str:
        return f"{self.repo}:{self.tag or 'latest'}"


def parse_ref(ref: str) -> ImageRef:
    """Split ``ref``; raises :class:`~agent.errors.ImageRefInvalid` saying what is wrong."""
    name, at, digest = ref.partition("@")
    if at and not _DIGEST.fullmatch(digest):
        raise ImageRefInvalid(f"image {ref!r}: {digest!r} is not a sha256 digest")
    repo, tag = name, None
    colon = name.rfind(":")
    if colon > name.rfind("/"):
        repo, tag = name[:colon], name[colon + 1 :]
        if not _TAG.fullmatch(tag):
            raise ImageRefInvalid(f"image {ref!r}: {tag!r} is not a valid tag")
    if not _REPO.fullmatch(repo):
        raise ImageRefInvalid(f"image {ref!r}: {repo!r} is not a valid repository name")
    return ImageRef(repo=repo, tag=tag, digest=digest or None)


def pinned_digest(ref: ImageRef, digest: str | None) -> str | None:
    """The digest a job pins: the assignment's ``image.digest`` and/or the one in its ref.

    Raises :class:`~agent.errors.ImageRefInvalid` for a malformed digest and
    :class:`~agent.errors.ImageDigestMismatch` when the two disagree.
    """
    if digest is not None and not _DIGEST.fullmatch(digest):
        raise ImageRefInvalid(f"image digest {digest!r} is not sha256:<64 hex digits>")
    if digest and ref.digest and digest != ref.digest:
        raise ImageDigestMismatch(
            f"image {ref.repo}: the reference pins {ref.digest} but the job pins {digest}"
        )
    return digest or ref.digest


def repo_digests(image_attrs: Mapping[str, Any]) -> set[str]:
    """The manifest digests an image was pulled by (``RepoDigests``, without names)."""
    return {d.rpartition("@")[2] for d in image_attrs.get("RepoDigests") or []}


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret replaced; for messages built from registry answers."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return text
