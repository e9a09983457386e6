"""Signed Slack requests already served, so a captured copy sent again is never run a second time.

Slack signs the timestamp with the body and a signature verifies for five minutes, so inside that window a
copy of a slash command or a form submission passes the signature check like the original. Each request's
(timestamp, signature) is recorded once, in a table of the bot's database rather than in memory, so every
process serving the same Slack app sees it; the insert is keyed on that pair, so when two processes race on
one request exactly one of them wins. The SQLite file gets a connection of its own here; on PostgreSQL the
history store's pool runs the same portable statements. Rows whose timestamp is past the window can never match a
request the signature check would accept, and are deleted as new ones arrive.
"""
from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

WINDOW = 5 * 60  # seconds of clock skew slack_sdk's SignatureVerifier accepts, either way
PRUNE_EVERY = 1.0  # seconds between deletes of expired rows through a shared store (one statement a request)
INSERT = "INSERT INTO slack_requests (timestamp, signature) VALUES (?, ?) ON CONFLICT DO NOTHING"
PRUNE = "DELETE FROM slack_requests WHERE timestamp < ?"


class ReplayGuard:
    """First sight of each signed request. The database must already be migrated (the engine opens it first)."""

    def __init__(self, path: Path | None = None, *, store: Any = None, window: float = WINDOW,
                 clock: Callable[[], float] = time.time):
        """On the SQLite file at `path`, or through a store's `execute()` (the PostgreSQL history store)."""
        self._path = path
        self._store = store
        self._pruned = float("-inf")
        self._window = window
        self._clock = clock
        self._db: sqlite3.Connection | None = None
        # One thread owns the connection: a write is a few hundred microseconds, kept off the event loop.
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="slack-replays")

    async def first_time(self, timestamp: int, signature: str) -> bool:
        """Record a request whose signature verified; False when it was recorded before (a replay)."""
        if self._store is not None:
            now = self._clock()
            if now - self._pruned >= PRUNE_EVERY:
                self._pruned = now
                await self._store.execute(PRUNE, (int(now - self._window),))
            return await self._store.execute(INSERT, (timestamp, signature)) == 1
        return await asyncio.get_running_loop().run_in_executor(self._thread, self._record, timestamp, signature)

    def _record(self, timestamp: int, signature: str) -> bool:
        if self._db is None:
            # IMMEDIATE: take the write lock up front, so a racing process waits (busy_timeout) instead of failing.
            self._db = sqlite3.connect(self._path, isolation_level="IMMEDIATE", check_same_thread=False)
            self._db.execute("PRAGMA busy_timeout = 5000")  # another process may be writing the same file
            self._db.execute("PRAGMA synchronous = NORMAL")  # as history.py: only a power cut can lose a row
        with self._db:  # one transaction: the prune and the insert commit together
            self._db.execute("DELETE FROM slack_requests WHERE timestamp < ?", (self._clock() - self._window,))
            inserted = self._db.execute(INSERT, (timestamp, signature)).rowcount
        return inserted == 1

    async def close(self) -> None:
        if self._db is not None:
            await asyncio.get_running_loop().run_in_executor(self._thread, self._db.close)
            self._db = None
        self._thread.shutdown()
