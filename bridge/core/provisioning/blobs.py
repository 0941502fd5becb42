"""Content blobs on disk: `<data_dir>/content/<sha256>`, content-addressed, so entities with the
same bytes share one file. An upload is streamed into a temporary file in that folder (hashed as
it arrives, never held whole in memory, refused as soon as it passes the configured bound), made
durable, renamed into place and only then referenced by a committed row. A blob is removed after
the commit that dropped its last reference, by `release`, which every such path calls.

Placing a blob and releasing one are serialised by one lock (held only for a rename, a short
write and a lookup, never while a body streams in): otherwise a release that found no reference
could unlink a file that an upload of the same bytes had just renamed into place and is about to
reference."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import tempfile
from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from bridge.core.errors import TooLarge
from bridge.store import Store


@dataclass(frozen=True)
class Received:
    """A body written to a temporary file, durable, not yet in place."""

    temp: Path
    sha256: str
    size: int


class Blobs:
    def __init__(self, folder: Path, store: Store, max_size: int) -> None:
        self.folder = folder
        self.store = store
        self.max_size = max_size
        self._lock = asyncio.Lock()

    def path(self, sha256: str) -> Path:
        return self.folder / sha256

    async def receive(self, chunks: AsyncIterable[bytes]) -> Received:
        """Write the body to a temporary file as it arrives. TooLarge as soon as it passes
        `max_size` (no further chunk is read); the temporary file is removed on any failure."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=self.folder, prefix=".upload-", suffix=".tmp")
        digest, size = hashlib.sha256(), 0
        try:
            # Unbuffered: each chunk goes to the file when it arrives, nothing accumulates here.
            with os.fdopen(fd, "wb", buffering=0) as out:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > self.max_size:
                        raise TooLarge(f"content is limited to {self.max_size} bytes")
                    digest.update(chunk)
                    out.write(chunk)
                # durable before a committed row may name it
                await asyncio.to_thread(os.fsync, out.fileno())
        except BaseException:
            os.unlink(name)
            raise
        return Received(Path(name), digest.hexdigest(), size)

    async def place(self, received: Received, write: Callable[[sqlite3.Connection], str | None]) -> None:
        """Rename the blob into place, then run `write`, which references it and returns the blob
        it replaced (released once committed). If `write` fails, the new blob is released instead."""
        async with self._lock:
            await asyncio.to_thread(self._rename, received)
            try:
                replaced = await self.store.write(write)
            except BaseException:
                await self._sweep([received.sha256])
                raise
            await self._sweep([replaced])

    async def release(self, shas: Iterable[str | None]) -> None:
        """Remove those of these blobs that no content entity references any more: call it after
        the commit that dropped the references."""
        async with self._lock:
            await self._sweep(shas)

    def _rename(self, received: Received) -> None:
        # The same name means the same bytes: replacing an existing blob changes nothing it serves
        # (an open download keeps reading its own inode).
        os.replace(received.temp, self.path(received.sha256))
        directory = os.open(self.folder, os.O_RDONLY)
        try:
            os.fsync(directory)  # the rename survives a crash as the row naming it does
        finally:
            os.close(directory)

    async def _sweep(self, shas: Iterable[str | None]) -> None:
        candidates = sorted({sha for sha in shas if sha})
        if not candidates:
            return
        marks = ",".join("?" * len(candidates))
        referenced = await self.store.read(
            lambda c: {
                r[0]
                for r in c.execute(
                    f"SELECT DISTINCT sha256 FROM prov_content WHERE sha256 IN ({marks})", candidates
                )
            }
        )
        for sha in candidates:
            if sha not in referenced:
                self.path(sha).unlink(missing_ok=True)
