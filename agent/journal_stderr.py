"""The CLI's own stderr lines, at the right priority when stderr is the journal.

journald records a line that does not start with ``<N>`` at priority 6 (info), so an
exit-78 "3 problems in the configuration" printed by ``cli.py`` would be missed by
``journalctl -p err``. The structlog renderer prefixes log lines already
(:func:`agent.logs.is_journal`); :class:`PriorityStream` does the same for every other
line written to stderr (the CLI's ``print``\\ s, a traceback), while passing through
lines that carry a prefix already, so that log lines are not prefixed twice.
"""

from __future__ import annotations

import re
import sys
from typing import Any, TextIO

from agent.logs import is_journal

_PREFIXED = re.compile(r"<[0-7]>")
ERR, WARNING, NOTICE = 3, 4, 5
# The CLI's own words for what is not an error (``warning: …``, ``note: …``).
_BY_WORD = (("warning:", WARNING), ("note:", NOTICE))


def priority_of(line: str) -> int:
    """The syslog priority of a line the CLI prints: an error unless it says otherwise."""
    lowered = line.lstrip().lower()
    return next((p for word, p in _BY_WORD if lowered.startswith(word)), ERR)


class PriorityStream:
    """A text stream that starts each line written through it with ``<N>``.

    Writes pass straight through (nothing is held back, so a crash loses nothing); a
    line is judged by the text of the write that starts it, which for ``print`` is the
    whole line. Everything else (``fileno``, ``isatty``, ``encoding``) is the inner
    stream's.
    """

    def __init__(self, inner: TextIO) -> None:
        self._inner = inner
        self._at_line_start = True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            if self._at_line_start and piece.strip() and not _PREFIXED.match(piece):
                piece = f"<{priority_of(piece)}>{piece}"
            out.append(piece)
            self._at_line_start = piece.endswith("\n")
        self._inner.write("".join(out))
        return len(text)

    def flush(self) -> None:
        self._inner.flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def install() -> None:
    """Route ``sys.stderr`` through :class:`PriorityStream` when it is the journal;
    otherwise leave it alone (a terminal or a file gets the plain lines)."""
    if is_journal(sys.stderr) and not isinstance(sys.stderr, PriorityStream):
        sys.stderr = PriorityStream(sys.stderr)
