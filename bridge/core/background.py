"""A task the serving process runs beside the flows: started after the broker, stopped before it
(the command line never starts one)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from bridge.store import Unavailable

log = logging.getLogger(__name__)

REPEAT_EVERY = 60.0  # seconds between two logs of the same failure


class Background:
    _task: asyncio.Task[None] | None = None
    # What the task does, for its log lines ("outbox drain", "rollout timer step").
    step = "background step"
    _down = False  # the last step met an unavailable database
    _last_failure = ("", 0.0)  # (message, monotonic time it was logged)
    _repeats = 0

    def start(self) -> None:
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        raise NotImplementedError

    def succeeded(self) -> None:
        if self._down:
            self._down = False
            log.warning("%s resumed: the database is back", self.step)

    def failed(self, exc: Exception) -> None:
        """A step failed and is tried again later. A lost database is one line when it goes (and
        one when it is back, `succeeded`), not a traceback per try; any other failure is logged with
        its traceback, the same one again at most every REPEAT_EVERY seconds, with a count."""
        if isinstance(exc, Unavailable):
            if not self._down:
                self._down = True
                log.warning("%s paused: the database is unavailable (%s); trying again", self.step, exc)
            return
        now, message = time.monotonic(), f"{type(exc).__name__}: {exc}"
        last, when = self._last_failure
        if message == last and now - when < REPEAT_EVERY:
            self._repeats += 1
            return
        more = f" (and {self._repeats} more like it)" if message == last and self._repeats else ""
        log.error("%s failed%s", self.step, more, exc_info=exc)
        self._last_failure, self._repeats = (message, now), 0
