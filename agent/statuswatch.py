"""``cloudbender-agent status --watch [SECONDS]``: the status again and again, like
``nvidia-smi -l``.

On a terminal each refresh clears the screen and starts with a header naming the
interval and the time; into a pipe or a file, refreshes are blocks separated by a blank
line, so that a log of them stays readable. A daemon that stops answering is shown as
such, and the watch keeps asking: a restart of the agent is what one often watches
for. Ctrl-C ends the watch; the caller treats that as success.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TextIO

from agent.errors import DaemonUnreachable
from agent.escaping import escape

DEFAULT_INTERVAL_S = 2.0
MIN_INTERVAL_S = 0.1  # a zero interval would spin the daemon's health thread
CLEAR = "\x1b[H\x1b[2J"


def watch(
    fetch: Callable[[], dict[str, Any]],
    render: Callable[[dict[str, Any]], str],
    interval_s: float,
    out: TextIO,
    *,
    sleep: Callable[[float], None] = time.sleep,
    rounds: int | None = None,
) -> None:
    """Show ``render(fetch())`` every ``interval_s`` on ``out`` until interrupted (or
    ``rounds`` times). Returns when interrupted by ``KeyboardInterrupt``; never raises
    :class:`DaemonUnreachable` (it becomes the round's text)."""
    interval_s = max(interval_s, MIN_INTERVAL_S)
    tty = out.isatty()
    done = 0
    try:
        while rounds is None or done < rounds:
            try:
                text = render(fetch())
            except DaemonUnreachable as exc:
                text = escape(f"no daemon: {exc} (asking again every {interval_s:g} s)")
            if tty:
                stamp = time.strftime("%Y-%m-%d %H:%M:%S")
                out.write(f"{CLEAR}Every {interval_s:g} s: cloudbender-agent status  {stamp}\n\n")
                out.write(text + "\n")
            else:
                out.write(("\n" if done else "") + text + "\n")
            out.flush()
            done += 1
            if rounds is None or done < rounds:
                sleep(interval_s)
    except KeyboardInterrupt:
        if tty:
            out.write("\n")
            out.flush()
