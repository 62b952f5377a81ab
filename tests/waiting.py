"""The one way tests wait: poll a condition until it holds, and fail saying what never happened.

A test that sleeps a fixed time proves nothing on a slow machine and wastes
time on a fast one; a test waits for something it can observe instead.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


async def eventually(
    check: Callable[[], Awaitable[T] | T],
    what: str,
    *,
    timeout: float = 60.0,
    interval: float = 0.25,
    accept: Callable[[T], Any] = bool,
    context: Callable[[], str] | None = None,
    give_up: Callable[[], str | None] | None = None,
) -> T:
    """Call ``check`` (sync or async) until ``accept`` holds for its result (by default: truthy); return it.

    ``what`` names the awaited condition in the failure message, with the last
    result; ``context`` adds diagnostics to it (a process log), and ``give_up``
    stops the wait early with its reason (a process that exited cannot get there).
    """
    deadline = time.monotonic() + timeout
    last: Any = None
    while True:
        if give_up is not None and (reason := give_up()):
            raise AssertionError(f"gave up waiting for {what}: {reason}")
        result = check()
        last = await result if inspect.isawaitable(result) else result
        if accept(last):
            return last
        if time.monotonic() >= deadline:
            break
        await asyncio.sleep(interval)
    extra = f"\n{context()}" if context is not None else ""
    raise AssertionError(f"timed out after {timeout:g}s waiting for {what}; last result: {last!r}{extra}")
