"""Waiting out a hypervisor's transient refusals: the one retry helper both drivers share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_out"]

T = TypeVar("T")


def wait_out(
    call: Callable[[], T],
    busy: Callable[[BaseException], bool],
    *,
    seconds: float,
    first: float = 0.05,
    most: float = 1.0,
) -> T:
    """Run ``call``, retrying it while what it raises is a transient ``busy`` answer, for ``seconds`` at most.

    The wait between tries starts at ``first`` and doubles up to ``most``. Any
    other exception, or a busy answer once ``seconds`` are spent, is raised
    as it came. Only for calls that are safe to repeat after such an answer
    (the hypervisor refused them without acting).
    """
    delay, deadline = first, time.monotonic() + seconds
    while True:
        try:
            return call()
        except Exception as exc:
            if not busy(exc) or time.monotonic() + delay > deadline:
                raise
        time.sleep(delay)
        delay = min(delay * 2, most)
