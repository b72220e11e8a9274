"""asyncio helpers shared by the shells: stop a task and wait for it without eating the caller's cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[object] | asyncio.Task[None] | None]) -> None:
    """Cancel every task and wait until each has finished.

    A task's own CancelledError is expected and absorbed; if the task running *this* coroutine is itself being
    cancelled, the cancellation is re-raised once the tasks are done, so a caller of `stop()` can still be
    cancelled (suppressing CancelledError blindly would swallow it).
    """
    pending = [t for t in tasks if t is not None]
    for t in pending:
        t.cancel()
    for t in pending:
        try:
            await t
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise
        except Exception:
            pass
