"""One rule for a peer- or job-supplied string that reaches a terminal or a log line.

A job id, an image ref, a result file's name, a failure reason or a control plane's
close reason is chosen by someone else. Printed raw, ``ESC [1A ESC [2K`` moves the
cursor up and erases the line above, so a file name can overwrite the egress line a
person is reading with a forged one; ``\\n`` starts a forged log line; a bidi override
(U+202E) shows ``txt.exe`` as ``exe.txt``. :func:`escape` makes every such character
visible instead, keeping the information (``\\x1b``, not ``?``): the person sees what
the peer sent, and nothing the peer sent can move the cursor.

What is escaped is exactly what ``str.isprintable`` refuses: C0 and C1 controls, DEL,
format characters (bidi overrides and isolates, zero-width joiners, the BOM), line and
paragraph separators, spaces other than U+0020, surrogates, private-use and unassigned
code points. The backslash is doubled so that the escaped form is unambiguous: a name
that *contains* the four characters ``\\x1b`` is shown as ``\\\\x1b``.

:func:`agent.protocol.messages.printable` (``?`` for the same characters, and clipped)
is the older form, used where a peer's text is also bounded in length.
"""

from __future__ import annotations


def escape(text: str, *, keep: str = "") -> str:
    """``text`` with each non-printable character written as ``\\n``, ``\\r``, ``\\t``,
    ``\\xNN``, ``\\uNNNN`` or ``\\UNNNNNNNN``, and each backslash as ``\\\\``.
    Characters in ``keep`` (only ``"\\n"`` makes sense, for a traceback) are left as
    they are.

    Pure and total: any ``str`` in, a printable ``str`` out (plus ``keep``). The result
    of escaping is never escaped again by this function's callers: escape once, at the
    sink (the line printed or logged).
    """
    if text.isprintable() and "\\" not in text:
        return text
    return "".join(_one(ch) if ch not in keep else ch for ch in text)


_SHORT = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _one(ch: str) -> str:
    if short := _SHORT.get(ch):
        return short
    if ch.isprintable():
        return ch
    code = ord(ch)
    if code <= 0xFF:
        return f"\\x{code:02x}"
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"
