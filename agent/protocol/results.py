"""The sending side of result streaming (docs/protocol.md §5), without I/O.

:class:`ResultSender` holds everything §5 asks the agent to keep track of for one job's
delivery: the manifest, the resume offsets, the flow-control window, the cumulative
acks of revision 1.1, the rejections and their limit, and, per file, the high-water
mark of what was ever handed to a socket (so that a resend is recorded as one before it
leaves). It is fed the control plane's messages and asked what to do next; it never
awaits, reads a file or touches a socket. The uploader (``agent.results.uploader``) is
the thin loop around it that moves bytes, after python-websockets' split of
``protocol.py`` from its asyncio connection.

One delivery may span several sessions: call :meth:`ResultSender.begin` at the start
of each, then loop on :meth:`ResultSender.next_action` until it returns
:class:`Done` (or raises :class:`TooManyRejections`).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from agent.protocol import MAX_CHUNK_PAYLOAD, messages

WINDOW = 16 * 1024 * 1024  # payload bytes sent but not acknowledged (§5 step 4)
MAX_REJECTIONS = 3

ResultMessage = (
    messages.ResultResume | messages.ResultAck | messages.ResultAccepted | messages.ResultRejected
)


@dataclass(frozen=True)
class FileEntry:
    """One file of the manifest, as far as sending it goes."""

    path: str
    size: int


@dataclass(frozen=True)
class SendMessage:
    """Send this text message."""

    message: dict[str, Any]


@dataclass(frozen=True)
class SendChunk:
    """Send ``size`` bytes of file ``file`` from ``offset``; then call
    :meth:`ResultSender.chunk_sent`. The high-water mark already counts them: bytes of a
    send that fails may have left too."""

    file: int
    offset: int
    size: int


@dataclass(frozen=True)
class RecordResends:
    """Record these ``(path, start, end, why)`` ranges as leaving again, durably, before
    anything else is sent."""

    ranges: tuple[tuple[str, int, int, str], ...]


@dataclass(frozen=True)
class AwaitMessage:
    """Nothing can be sent until the control plane says something: feed its next
    ``result.*`` message to :meth:`ResultSender.receive`."""


@dataclass(frozen=True)
class Done:
    """The control plane accepted every file. ``already``: it held them before this
    session (``result.accepted`` in place of ``result.resume``)."""

    already: bool = False


Action = SendMessage | SendChunk | RecordResends | AwaitMessage | Done


class TooManyRejections(Exception):
    """The control plane rejected the results :data:`MAX_REJECTIONS` times."""

    def __init__(self, rejections: int) -> None:
        super().__init__(f"results rejected {rejections} times")
        self.rejections = rejections


class ResultSender:
    """The §5 state of one job's delivery, across sessions.

    ``high``: per file, what an earlier run of the agent may already have sent (a file it
    recorded counts as sent whole, since how far it got is unknown).
    """

    def __init__(
        self,
        job_id: str,
        manifest: dict[str, Any],
        files: Sequence[FileEntry],
        high: Sequence[int],
        *,
        window: int = WINDOW,
        max_rejections: int = MAX_REJECTIONS,
    ) -> None:
        if len(high) != len(files):
            raise ValueError("one high-water mark per file")
        self.job_id = job_id
        self._manifest = manifest
        self._files = tuple(files)
        self._high = list(high)
        self._window = window
        self._max_rejections = max_rejections
        self.rejections = 0
        # Why bytes below the high-water mark would leave again, for the ledger.
        self._why = "agent_restarted"
        self._queue: list[Action] = []
        self._phase = "idle"
        self._sent_to = [0] * len(files)
        self._acked = [0] * len(files)
        # Files that may hold bytes sent but not acknowledged: a heap (an ack of file k
        # credits every file below k) and its members.
        self._outstanding: list[int] = []
        self._in_heap: set[int] = set()
        self._resume_offsets: list[int] = []
        self._already = False
        self._unacked = 0  # sum of sent_to - acked
        self._cursor = (0, 0)  # next (file, offset) to send while streaming
        self._last_file = len(files)  # stream files [cursor.file, last_file)
        # Diagnostics for the loop's logs, cleared when read.
        self.events: list[tuple[str, dict[str, Any]]] = []

    # -- what the loop calls -------------------------------------------------------------

    def begin(self) -> None:
        """A new session: start again at the manifest (§5, last paragraph)."""
        self._queue = [SendMessage(self._manifest)]
        self._phase = "resume"
        self._sent_to = [0] * len(self._files)
        self._acked = [0] * len(self._files)
        self._outstanding = []
        self._in_heap = set()
        self._unacked = 0
        self._already = False

    def next_action(self) -> Action:
        """What to do now. Raises :class:`TooManyRejections` when the job must fail."""
        if self._queue:
            return self._queue.pop(0)
        if self._phase == "streaming":
            chunk = self._next_chunk()
            if chunk is not None:
                return chunk
            if self._cursor[0] < self._last_file:
                return AwaitMessage()  # the window is full
            self._phase = "verdict"
            return SendMessage(messages.result_end(self.job_id))
        if self._phase == "done":
            return Done(already=self._already)
        if self._phase == "failed":
            raise TooManyRejections(self.rejections)
        return AwaitMessage()

    def chunk_sent(self, chunk: SendChunk) -> None:
        """The chunk was handed to the socket."""
        end = chunk.offset + chunk.size
        if end > self._sent_to[chunk.file]:
            if chunk.file not in self._in_heap:
                self._in_heap.add(chunk.file)
                heapq.heappush(self._outstanding, chunk.file)
            self._unacked += end - self._sent_to[chunk.file]
            self._sent_to[chunk.file] = end

    def session_lost(self) -> None:
        """The session ended; anything it said is void. Bytes below the high-water mark
        that go again next time are recorded as ``session_lost``."""
        self._why = "session_lost"
        self._phase = "idle"
        self._queue = []

    def receive(self, message: ResultMessage) -> None:
        """Feed one ``result.*`` message of this job from the current session."""
        if isinstance(message, messages.ResultAck):
            self._ack(message.file, message.offset)
        elif self._phase == "resume" and isinstance(message, messages.ResultResume):
            self._resume(list(message.offsets))
        elif self._phase in ("resume", "verdict") and isinstance(message, messages.ResultAccepted):
            self._already = self._phase == "resume"
            self._phase = "done"
        elif self._phase == "verdict" and isinstance(message, messages.ResultRejected):
            self._rejected(message.file, message.code)
        else:
            self.events.append(("result_message_ignored", {"type": message.type}))

    # -- the state machine --------------------------------------------------------------

    def _resume(self, offsets: list[int]) -> None:
        files = self._files
        if len(offsets) != len(files) or not all(
            0 <= o <= f.size for o, f in zip(offsets, files, strict=True)
        ):
            # Offsets that cannot be right for this manifest: start every file again.
            self.events.append(("result_resume_invalid", {"offsets": offsets[:8]}))
            offsets = [0] * len(files)
        for index, offset in enumerate(offsets):
            self._acked[index] = self._sent_to[index] = offset
        ranges = tuple(
            (f.path, o, min(self._high[i], f.size), self._why)
            for i, (f, o) in enumerate(zip(files, offsets, strict=True))
            if o < min(self._high[i], f.size)
        )
        if ranges:
            self._queue.append(RecordResends(ranges))
        self._resume_offsets = offsets
        self._cursor = (0, offsets[0] if offsets else 0)
        self._last_file = len(files)
        self._phase = "streaming"

    def _next_chunk(self) -> SendChunk | None:
        index, offset = self._cursor
        while index < self._last_file and offset >= self._files[index].size:
            index += 1
            offset = self._resume_offsets[index] if index < self._last_file else 0
        self._cursor = (index, offset)
        if index >= self._last_file:
            return None
        n = min(MAX_CHUNK_PAYLOAD, self._files[index].size - offset)
        if self._unacked + n > self._window and self._unacked > 0:
            return None
        self._cursor = (index, offset + n)
        self._high[index] = max(self._high[index], offset + n)
        return SendChunk(index, offset, n)

    def _ack(self, file: int, offset: int) -> None:
        """Revision 1.1: files 0 to file-1 are stored whole and ``file`` up to ``offset``."""
        count = len(self._files)
        if file > count or (file == count and offset != 0):
            self.events.append(("result_ack_invalid", {"file": file, "offset": offset}))
            return
        while self._outstanding and self._outstanding[0] < file:
            index = heapq.heappop(self._outstanding)
            self._in_heap.discard(index)
            self._credit(index, None)
        if file < count:
            self._credit(file, offset)

    def _credit(self, index: int, offset: int | None) -> None:
        sent = self._sent_to[index]
        acked = sent if offset is None else max(self._acked[index], min(offset, sent))
        self._unacked -= acked - self._acked[index]
        self._acked[index] = acked

    def _rejected(self, file: int, code: str) -> None:
        self.rejections += 1
        self.events.append(
            ("result_file_rejected", {"file": file, "code": code, "rejections": self.rejections})
        )
        if self.rejections >= self._max_rejections:
            self._phase = "failed"
            return
        if 0 <= file < len(self._files):
            self._unacked -= self._sent_to[file] - self._acked[file]
            self._acked[file] = self._sent_to[file] = 0
            if self._high[file] > 0:
                resent = (self._files[file].path, 0, self._high[file], "rejected")
                self._queue.append(RecordResends((resent,)))
            self._resume_offsets = [0] * len(self._files)
            self._cursor = (file, 0)
            self._last_file = file + 1
            self._phase = "streaming"
        else:
            self._queue.append(SendMessage(messages.result_end(self.job_id)))
