"""A message's turn in its conversation: messages in one conversation are answered one at a time, in arrival
order, and what answering one reads from the store is read as its turn begins.

Inside one process, asyncio.Lock wakes its waiters first-in first-out, which is exactly arrival order: the
SQLite store uses `ArrivalOrder` alone (one process owns the file). The PostgreSQL store hands out tickets in
the database instead (bot/pg_turns.py), so the order holds across processes.
"""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from bot.models.base import Message

Counter = Callable[[Message], int]


@dataclass
class Turn:
    """Held while one message is answered; carries what the engine reads before answering it.

    The PostgreSQL store reads all of this in the same round trip that finds the turn has come, so it is as
    fresh as the turn itself and costs no round trip of its own; the SQLite store reads it from its caches.
    """

    key: Hashable
    persona: str | None  # the channel's persona; None: the default
    spent_today: int | None  # tokens the channel (all its threads) spent today, UTC; None: not asked for
    personas_version: Any  # the workspace's newest persona row, for PersonaCatalog's check; MISSING: not read
    read_window: Callable[[int, Counter | None], Awaitable[list[Message]]]
    ticket: int | None = None  # PostgreSQL: this message's place in the conversation's queue
    released: bool = False  # PostgreSQL: the reply's last write also ended the turn (`append(..., ending=turn)`)

    async def window(self, budget_tokens: int, counter: Counter | None = None) -> list[Message]:
        """The conversation's newest turns that fit `budget_tokens` (see HistoryStore.window)."""
        return await self.read_window(budget_tokens, counter)


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
