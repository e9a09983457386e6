"""Messages in one conversation are answered one at a time, in arrival order, inside one process.

asyncio.Lock wakes its waiters first-in first-out, which is exactly arrival order. The SQLite store uses this
alone (one process owns the file); the PostgreSQL store queues here first, so a process holds at most one
database lock per conversation, and takes that across processes (bot/history_pg.py).
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager


class ArrivalOrder:
    def __init__(self) -> None:
        self._locks: dict[Hashable, tuple[asyncio.Lock, int]] = {}  # key -> (its lock, tasks holding or waiting)

    @asynccontextmanager
    async def turn(self, key: Hashable) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        lock = lock or asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users == 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)
