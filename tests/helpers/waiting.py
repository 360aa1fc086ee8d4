"""Waiting on conditions, in the tests' one scaled time (``tests.helpers.env.seconds``).

Tests never sleep to let something happen: they wait until a condition holds
(:func:`wait_until`) and, for a claim that something does *not* happen, first wait for
the state in which it could, then check that it stays away for a scaled while
(:func:`holds_for`). The polling sleeps live here and nowhere else.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from tests.helpers.env import seconds

T = TypeVar("T")
POLL_S = 0.05


def wait_until(condition: Callable[[], T], what: Callable[[], str] | str, within: float = 15) -> T:
    """The first truthy value of ``condition()``; AssertionError naming ``what`` when
    none came within ``seconds(within)``."""
    deadline = time.monotonic() + seconds(within)
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(what() if callable(what) else what)
        time.sleep(POLL_S)


def holds_for(condition: Callable[[], object], what: Callable[[], str] | str, for_s: float) -> None:
    """AssertionError naming ``what`` as soon as ``condition()`` is falsy within
    ``seconds(for_s)``; returns when it held throughout."""
    deadline = time.monotonic() + seconds(for_s)
    while time.monotonic() < deadline:
        if not condition():
            raise AssertionError(what() if callable(what) else what)
        time.sleep(POLL_S)
    if not condition():
        raise AssertionError(what() if callable(what) else what)
