"""The SQLite store's writes: its connections, and one writer that group-commits everything queued.

Callers enqueue a statement and await its future; one task takes everything pending and commits it in a single
transaction on a thread of its own (plain sqlite3: a whole batch costs one hop off the event loop), then
settles each caller in arrival order. A batch that fails is retried one by one, so a bad write fails alone.
`GroupCommit` is the writer half of `HistoryStore` (bot/history.py), which provides the connection
(`_db`, `_db_thread`), the queue (`_pending`, `_wake`, `_closing`, `_admitting`), the `_sync` lock it shares
with cache fills, and `_remember`, called for each committed message while that lock is held.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any

import aiosqlite

from bot.conversation import ConvKey

log = logging.getLogger("bot.history")  # the store's name: its write failures log as they did before the split


class HistoryError(RuntimeError):
    pass


@dataclass
class QueuedWrite:
    sql: str
    params: tuple
    done: asyncio.Future
    key: ConvKey | None = None  # set for messages: the turn joins the cached window once committed
    rowcount: bool = False  # the caller wants the statement's rowcount back


class GroupCommit:
    path: Path
    _db: sqlite3.Connection
    _db_thread: ThreadPoolExecutor
    _pending: list[QueuedWrite]
    _wake: asyncio.Event
    _closing: bool
    _admitting: int
    _sync: asyncio.Lock

    @contextmanager
    def _admitted(self) -> Iterator[None]:
        """Writes that began before `close()` are still committed, even if they were awaiting a read."""
        if self._closing:
            raise HistoryError("the history store is closed")
        self._admitting += 1
        try:
            yield
        finally:
            self._admitting -= 1
            self._wake.set()

    def _enqueue(self, sql: str, params: tuple, key: ConvKey | None = None, *, rowcount: bool = False) -> asyncio.Future:
        done = asyncio.get_running_loop().create_future()
        self._pending.append(QueuedWrite(sql, params, done, key, rowcount))
        self._wake.set()
        return done

    async def _write(self, sql: str, params: tuple) -> Any:
        with self._admitted():
            done = self._enqueue(sql, params)
        return await done

    async def _write_loop(self) -> None:
        while True:
            if not self._pending:
                if self._closing and not self._admitting:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            batch, self._pending = self._pending, []
            await self._commit(batch)

    async def _commit(self, batch: list[QueuedWrite]) -> None:
        """Commit a batch in one transaction; if it fails, retry one by one so a bad write fails alone."""
        results: list[Any] = [None] * len(batch)
        try:
            async with self._sync:
                await self._in_writer(self._commit_in_one, batch, results)
                for write, result in zip(batch, results):
                    if write.key is not None:
                        self._remember(write.key, result, write.params)
        except sqlite3.Error as exc:
            if len(batch) > 1:
                for write in batch:
                    await self._commit([write])
                return
            log.error("history write failed: %s", exc)
            _settle(batch[0].done, exc=HistoryError(f"could not save to {self.path}: {exc}"))
            return
        except Exception as exc:  # a bug or a closed connection: every waiter must hear about it
            log.exception("history writer failed")
            for write in batch:
                _settle(write.done, exc=exc)
            return
        for write, result in zip(batch, results):
            _settle(write.done, result)

    def _in_writer(self, fn: Callable[..., Any], *args: Any) -> "asyncio.Future[Any]":
        return asyncio.get_running_loop().run_in_executor(self._db_thread, fn, *args)

    def _commit_in_one(self, batch: list[QueuedWrite], results: list[Any]) -> None:
        """Runs on the writer thread."""
        db = self._db
        db.execute("BEGIN IMMEDIATE")
        try:
            for sql, group in groupby(enumerate(batch), key=lambda item: (item[1].sql, item[1].rowcount)):
                sql, rowcount = sql
                group = list(group)
                if rowcount:  # each statement's own count, so they run one by one
                    for i, write in group:
                        results[i] = db.execute(sql, write.params).rowcount
                    continue
                db.executemany(sql, [write.params for _, write in group])
                if group[0][1].key is not None:  # messages: the caller gets each row's id
                    # We hold the write lock, so the rows just inserted took consecutive rowids.
                    (last,) = db.execute("SELECT last_insert_rowid()").fetchone()
                    for n, (i, _) in enumerate(group):
                        results[i] = last - len(group) + 1 + n
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.execute("ROLLBACK")
            raise

    def _remember(self, key: ConvKey, message_id: int, params: tuple) -> None:
        raise NotImplementedError


def _settle(done: asyncio.Future, result: Any = None, exc: BaseException | None = None) -> None:
    if done.done():  # the caller gave up waiting; the write stands
        return
    if exc is not None:
        done.set_exception(exc)
    else:
        done.set_result(result)


PRAGMAS = (
    # NORMAL in WAL mode loses no committed transaction on a process crash, only on power loss.
    "PRAGMA synchronous = NORMAL",
    "PRAGMA foreign_keys = ON",
    "PRAGMA busy_timeout = 5000",
)


async def connect_reader(path: Path) -> aiosqlite.Connection:
    db = await aiosqlite.connect(path, isolation_level=None)
    for pragma in PRAGMAS:
        await db.execute(pragma)
    return db


def connect_writer(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    for pragma in PRAGMAS:
        db.execute(pragma)
    return db


def close_writer(db: sqlite3.Connection) -> None:
    db.execute("PRAGMA optimize")
    db.close()
