"""A task the serving process runs beside the flows: started after the broker, stopped before it
(the command line never starts one)."""

from __future__ import annotations

import asyncio
import contextlib


class Background:
    _task: asyncio.Task[None] | None = None

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
