"""One image pull over the engine's HTTP API, with a deadline and progress logging.

``agent.runtime.docker`` hands in the SDK's session (a ``requests.Session``) and the
endpoint URL; this module does not import ``docker``. The SDK's own ``pull`` cannot be
used: it reads its progress stream with no timeout at all, so a stalled registry
would hold the job (and a worker thread) for ever.

Deadline: a read waits at most ``timeout_s``, and a timer shuts the connection's
socket down when ``timeout_s`` has passed, which wakes a read that is blocked and
makes the engine abandon the pull (it cancels a pull whose client went away).

Credentials travel only in the ``X-Registry-Auth`` header of this one request; they
are never logged, and the caller scrubs them from any message it passes on.
"""

from __future__ import annotations

import base64
import json
import socket
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import requests
import structlog
from urllib3.exceptions import ReadTimeoutError

from agent.errors import ImagePullFailed, RuntimeUnavailable

log = structlog.get_logger(__name__)
_MIB = 1024 * 1024


def encode_auth(creds: Mapping[str, str]) -> str:
    """The ``X-Registry-Auth`` header value: URL-safe base64 of the JSON credentials."""
    return base64.urlsafe_b64encode(json.dumps(dict(creds)).encode()).decode("ascii")


def json_objects(chunks: Iterable[bytes]) -> Iterator[dict[str, Any]]:
    """The JSON objects in a stream of chunks, however the chunks split them."""
    decoder = json.JSONDecoder()
    buffer = ""
    for chunk in chunks:
        buffer += chunk.decode("utf-8", errors="replace")
        while True:
            buffer = buffer.lstrip()
            if not buffer:
                break
            try:
                obj, end = decoder.raw_decode(buffer)
            except ValueError:
                break  # incomplete: wait for the next chunk
            buffer = buffer[end:]
            if isinstance(obj, dict):
                yield obj
    if buffer.strip():
        raise ValueError(f"the engine's answer ends in the middle of a message: {buffer[:80]!r}")


@dataclass
class PullProgress:
    """Folds the engine's pull events into numbers worth a log line now and then."""

    every_s: float = 5.0
    layers: dict[str, tuple[int, int]] = field(default_factory=dict)
    done: set[str] = field(default_factory=set)
    _last: float = field(default_factory=time.monotonic)

    def feed(self, event: Mapping[str, Any]) -> dict[str, Any] | None:
        """Take one event; return log fields when a progress line is due, else ``None``."""
        layer, status = event.get("id"), str(event.get("status") or "")
        detail = event.get("progressDetail") or {}
        if layer and status == "Downloading" and detail.get("total"):
            self.layers[layer] = (int(detail.get("current") or 0), int(detail["total"]))
        elif layer and status in ("Download complete", "Pull complete", "Already exists"):
            self.done.add(layer)
        now = time.monotonic()
        if now - self._last < self.every_s:
            return None
        self._last = now
        return {
            "downloaded_mib": round(sum(c for c, _ in self.layers.values()) / _MIB, 1),
            "known_mib": round(sum(t for _, t in self.layers.values()) / _MIB, 1),
            "layers_done": len(self.done),
        }


def is_read_timeout(exc: BaseException) -> bool:
    """Whether a requests error is a read that timed out: over the engine's unix socket
    requests reports that as a ``ConnectionError`` wrapping urllib3's error."""
    if isinstance(exc, requests.exceptions.Timeout):
        return True
    return any(isinstance(arg, ReadTimeoutError) for arg in getattr(exc, "args", ()))


def _answer_text(response: requests.Response) -> str:
    try:
        return str(response.json().get("message") or response.text)
    except ValueError:
        return response.text.strip() or f"HTTP {response.status_code}"


def stream_pull(
    session: requests.Session,
    url: str,
    repo: str,
    tag: str,
    creds: Mapping[str, str],
    timeout_s: float,
) -> None:
    """POST ``url`` (the engine's ``/images/create``) for ``repo:tag`` (``tag`` may be a
    digest) and follow the progress until the engine says it is done.

    Raises :class:`~agent.errors.ImagePullFailed` with the engine's or registry's
    words, or "did not finish within …", and
    :class:`~agent.errors.RuntimeUnavailable` when the engine does not answer.
    """
    expired = threading.Event()
    responses: list[requests.Response] = []

    def expire() -> None:
        expired.set()
        for response in list(responses):
            sock = getattr(getattr(response.raw, "connection", None), "sock", None)
            try:
                if sock is not None:
                    sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed: the read has ended anyway

    headers = {"X-Registry-Auth": encode_auth(creds)} if creds else {}
    timer = threading.Timer(timeout_s, expire)
    timer.daemon = True
    timer.start()
    progress = PullProgress()
    try:
        response = session.post(
            url,
            params={"fromImage": repo, "tag": tag},
            headers=headers,
            stream=True,
            timeout=(min(timeout_s, 10.0), timeout_s),
        )
        responses.append(response)
        if response.status_code >= 400:
            raise ImagePullFailed(_answer_text(response))
        for event in json_objects(response.iter_content(chunk_size=None)):
            if event.get("error"):
                raise ImagePullFailed(str(event["error"]))
            due = progress.feed(event)
            if due is not None:
                log.info("image_pull_progress", image=f"{repo}:{tag}", **due)
        if expired.is_set():
            raise ImagePullFailed(f"did not finish within {timeout_s:g} s")
    except (requests.exceptions.RequestException, OSError, ValueError) as exc:
        # A read that timed out is the same deadline seen from the other side.
        if expired.is_set() or is_read_timeout(exc):
            raise ImagePullFailed(f"did not finish within {timeout_s:g} s") from exc
        if isinstance(exc, requests.exceptions.ConnectionError):
            raise RuntimeUnavailable(f"the Docker engine does not answer: {exc}") from exc
        raise ImagePullFailed(str(exc)) from exc
    finally:
        timer.cancel()
        for response in responses:
            response.close()
