"""Conversation history in PostgreSQL, shared by every process started with the same `DATABASE_URL`.

The same tables, migrations and methods as the SQLite store (bot/history.py), for a bot that runs as several
processes. Because another process may change anything at any moment, nothing is cached: every call is one
statement on a pooled connection (one round trip; the turn's context number is looked up inside the same
statement), and budgets, personas and settings are always read fresh. PostgreSQL's own group commit does
what the SQLite store's writer task does by hand.

A conversation's turn is a session advisory lock on a hash of its key, so messages in one conversation are
answered in arrival order whichever process receives them: every message waiting for a conversation waits in
PostgreSQL's own first-come first-served queue for that lock (never in a queue of this process's, which other
processes could not see), and a process that dies drops its locks with its connections.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from datetime import date, datetime, timezone
from typing import Any

import asyncpg

from bot.conversation import ConvKey, Workspace
from bot.history import MAX_TURNS, HistoryError, answered_turns, check_turn, fit_window
from bot.migrations import CREATE_TABLE, MIGRATIONS, TABLE, statements, too_new
from bot.models.base import Message
from bot.sql_dialect import rowcount, to_postgres

log = logging.getLogger(__name__)

KEY = "platform = $1 AND workspace = $2 AND channel = $3"
CONTEXT = f"coalesce((SELECT context FROM contexts WHERE {KEY} AND thread = $4), 0)"
INSERT_MESSAGE = (
    "INSERT INTO messages (platform, workspace, channel, thread, context, role, author, content, persona, tokens,"
    f" prompt_tokens, completion_tokens, finish_reason, created_at) VALUES ($1, $2, $3, $4, {CONTEXT},"
    " $5, $6, $7, $8, $9, $10, $11, $12, $13) RETURNING id"
)
WINDOW = (f"SELECT role, content, tokens FROM messages WHERE {KEY} AND thread = $4 AND context = {CONTEXT}"
          " ORDER BY id DESC LIMIT $5")
# The one lock a lock connection waits for, once it waits in PostgreSQL's queue.
QUEUED = "SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = $1 AND NOT granted)"
NEXT_CONTEXT = (" ON CONFLICT (platform, workspace, channel, thread)"
                " DO UPDATE SET context = contexts.context + 1, reset_at = excluded.reset_at")


def _lock_id(*parts: str) -> int:
    """A signed 64-bit advisory lock number for a name (collisions only make two conversations wait in turn)."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


MIGRATION_LOCK = _lock_id("personabot", "migrations")
LOCK_HOLDERS = 2  # connections that take and release uncontended conversation locks, side by side


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def redacted(url: str) -> str:
    """The URL with its password hidden, fit for an error message or a log."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


async def _no_session_state(connection: asyncpg.Connection) -> None:
    """Pool connections for statements keep no session state, so returning one costs no reset round trip."""


class PostgresHistoryStore:
    shared = True  # other processes write the same database: nothing they change may be cached

    def __init__(self, url: str, pool: asyncpg.Pool, lock_pool: asyncpg.Pool):
        self.url = url
        self._pool = pool
        # Connections that wait for a conversation another process is answering (pg_advisory_lock blocks one).
        self._lock_pool = lock_pool
        # Connections holding the uncontended conversation locks, many each; a lock always goes to the same one
        # (its number picks it), so its unlock runs where it was taken. One statement at a time on each.
        self._locks: list[asyncpg.Connection | None] = [None] * LOCK_HOLDERS
        self._locks_use = [asyncio.Lock() for _ in range(LOCK_HOLDERS)]
        # Conversation -> when this process's newest message for it has its lock request placed in PostgreSQL.
        self._placed: dict[ConvKey, asyncio.Future] = {}
        self._closing = False
        self._busy = 0  # statements under way: close() lets them finish, as the SQLite store commits its queue
        self._idle = asyncio.Event()

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 8, lock_connections: int = 8) -> "PostgresHistoryStore":
        """Connect, bring the schema up to date (once, however many processes start together) and pool.

        A process holds at most `pool_size + lock_connections + LOCK_HOLDERS` connections (18: five processes
        fit in PostgreSQL's default max_connections of 100). Lock connections wait for conversations that
        are busy (here or elsewhere) when a message for them arrives; past `lock_connections` such waits at
        once, the next wait queues in this process until one frees, where a later message elsewhere could
        go first.
        """
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, reset=_no_session_state)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise HistoryError(f"could not connect to DATABASE_URL {redacted(url)}: {exc}") from exc
        try:
            async with pool.acquire() as connection:
                await migrate(connection)
            # All open from the start and never closed for idleness: a wait is queued the moment its message
            # arrives, not a connection's setup later (which would let a later message elsewhere go first).
            lock_pool = await asyncpg.create_pool(url, min_size=lock_connections, max_size=lock_connections,
                                                  max_inactive_connection_lifetime=0)
        except BaseException:
            await pool.close()
            raise
        store = cls(url, pool, lock_pool)
        try:  # opened now, so that a message's first lock request is not late by a connection's setup
            store._locks = list(await asyncio.gather(*(asyncpg.connect(url) for _ in range(LOCK_HOLDERS))))
        except BaseException:
            await store.close()
            raise
        return store

    async def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self._idle.clear()
        if self._busy:
            await self._idle.wait()
        for connection in self._locks:
            if connection is not None:
                await connection.close()
        await self._lock_pool.close()
        await self._pool.close()

    # -- statements ----------------------------------------------------------------------------------

    async def _run(self, method: str, sql: str, *params: Any) -> Any:
        if self._closing:
            raise HistoryError("the history store is closed")
        self._busy += 1
        try:
            return await getattr(self._pool, method)(sql, *params)
        except asyncpg.PostgresError as exc:
            log.error("history statement failed: %s", exc)
            raise HistoryError(f"could not save to PostgreSQL: {exc}") from exc
        finally:
            self._busy -= 1
            if not self._busy:
                self._idle.set()

    # -- messages ------------------------------------------------------------------------------------

    async def append(self, key: ConvKey, role: str, content: str, *, author: str = "", persona: str = "",
                     tokens: int = 0, finish_reason: str | None = None, prompt_tokens: int = 0,
                     completion_tokens: int = 0) -> int:
        """Store one turn in the conversation's current context; returns its id once committed."""
        check_turn(role, content, tokens, prompt_tokens, completion_tokens)
        return await self._run("fetchval", INSERT_MESSAGE, *key, role, author, content, persona, tokens,
                               prompt_tokens, completion_tokens, finish_reason, _now())

    async def window(self, key: ConvKey, budget_tokens: int,
                     counter: Callable[[Message], int] | None = None) -> list[Message]:
        """The newest turns of the current context whose tokens fit `budget_tokens`, oldest first."""
        if budget_tokens <= 0:
            return []
        rows = await self._run("fetch", WINDOW, *key, MAX_TURNS)
        newest = [({"role": role, "content": content}, tokens) for role, content, tokens in rows]
        return fit_window(newest, len(rows) < MAX_TURNS, budget_tokens, counter)  # type: ignore[arg-type]

    async def reset(self, key: ConvKey) -> None:
        """Start a fresh context for this conversation; earlier turns stay stored for export and audit."""
        await self._run("execute", "INSERT INTO contexts (platform, workspace, channel, thread, context, reset_at)"
                        " VALUES ($1, $2, $3, $4, 1, $5)" + NEXT_CONTEXT, *key, _now())

    async def reset_channel(self, key: ConvKey) -> None:
        """A fresh context for the channel and every thread in it, in one statement."""
        channel = key.channel_key
        await self._run(
            "execute",
            "INSERT INTO contexts (platform, workspace, channel, thread, context, reset_at)"
            " SELECT $1, $2, $3, thread, 1, $4 FROM (SELECT '' AS thread UNION"
            f" SELECT DISTINCT thread FROM messages WHERE {KEY} AND thread != '') t" + NEXT_CONTEXT,
            *channel[:3], _now(),
        )

    @asynccontextmanager
    async def turn(self, key: ConvKey) -> AsyncIterator[None]:
        """Held while one message of the conversation is answered, by whichever process answers it."""
        lock = _lock_id(*key)
        before = self._placed.get(key)
        placed = self._placed[key] = asyncio.get_running_loop().create_future()
        try:
            if before is not None:  # this process's previous message for it asks PostgreSQL first
                await asyncio.wait({before})
            # The common case, nobody else busy with the conversation: take the lock on a shared connection.
            if before is None and await self._try_lock(lock):
                placed.set_result(None)
                try:
                    yield
                finally:
                    await asyncio.shield(self._unlock(lock))
                return
            # Someone is (here or in another process): queue for the lock in PostgreSQL on a connection of our
            # own. Returning it to its pool resets it, which releases the lock even when the wait or the reply
            # was cancelled.
            async with self._lock_pool.acquire() as connection:
                waiting = asyncio.ensure_future(connection.execute(f"SELECT pg_advisory_lock({lock})"))
                try:
                    try:
                        await self._queued(connection, waiting)
                    finally:
                        placed.set_result(None)  # the next message here may ask now: it queues behind this one
                    await waiting
                except BaseException:  # the wait is cancelled with us, before the connection goes back
                    waiting.cancel()
                    await asyncio.wait({waiting})
                    raise
                yield
        finally:
            if not placed.done():
                placed.set_result(None)
            if self._placed.get(key) is placed:
                del self._placed[key]

    async def _queued(self, connection: asyncpg.Connection, waiting: asyncio.Future) -> None:
        """Returns once the lock request on `connection` is granted or waiting in PostgreSQL's queue."""
        pid = connection.get_server_pid()
        while not waiting.done():
            if await self._pool.fetchval(QUEUED, pid):
                return
            await asyncio.sleep(0.0005)

    @property
    def conversations_in_turn(self) -> int:
        """Conversations with a message being answered or waiting here (0 when idle: nothing is left behind)."""
        return len(self._placed)

    async def _try_lock(self, lock: int) -> bool:
        attempt = asyncio.ensure_future(self._on_locks("SELECT pg_try_advisory_lock($1)", lock))
        try:
            return await asyncio.shield(attempt)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future) -> None:  # the lock may be ours by the time the answer comes
                if not done.cancelled() and done.exception() is None and done.result():
                    asyncio.ensure_future(self._unlock(lock))
            attempt.add_done_callback(give_back)
            raise

    async def _unlock(self, lock: int) -> None:
        try:
            await self._on_locks("SELECT pg_advisory_unlock($1)", lock)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # The reply is done; a connection that failed took its locks with it.
            log.warning("could not release a conversation lock: %s", exc)

    async def _on_locks(self, sql: str, lock: int) -> Any:
        holder = lock % LOCK_HOLDERS
        async with self._locks_use[holder]:
            connection = self._locks[holder]
            if connection is None or connection.is_closed():
                # A lost connection lost its locks with it; the turns that held them finish unprotected.
                connection = self._locks[holder] = await asyncpg.connect(self.url)
            return await connection.fetchval(sql, lock)

    # -- channels ------------------------------------------------------------------------------------

    async def get_persona(self, key: ConvKey) -> str | None:
        return await self._run("fetchval", f"SELECT persona FROM channels WHERE {KEY}", *key.channel_key[:3])

    async def set_persona(self, key: ConvKey, name: str) -> None:
        await self._run(
            "execute", "INSERT INTO channels (platform, workspace, channel, persona, updated_at)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (platform, workspace, channel)"
            " DO UPDATE SET persona = excluded.persona, updated_at = excluded.updated_at",
            *key.channel_key[:3], name, _now())

    async def get_setting(self, key: ConvKey, name: str) -> str | None:
        return await self._run("fetchval", f"SELECT value FROM channel_settings WHERE {KEY} AND name = $4",
                               *key[:3], name)

    async def set_setting(self, key: ConvKey, name: str, value: str | None) -> None:
        """Set a per-channel flag; `None` removes it."""
        if value is None:
            await self._run("execute", f"DELETE FROM channel_settings WHERE {KEY} AND name = $4", *key[:3], name)
            return
        await self._run(
            "execute", "INSERT INTO channel_settings (platform, workspace, channel, name, value)"
            " VALUES ($1, $2, $3, $4, $5) ON CONFLICT (platform, workspace, channel, name)"
            " DO UPDATE SET value = excluded.value", *key[:3], name, str(value))

    # -- workspace personas --------------------------------------------------------------------------

    async def workspace_personas(self, workspace: Workspace) -> dict[str, tuple[str, bool]]:
        """The workspace's chat-made personas: name -> (YAML, saved by an owner), newest version of each."""
        rows = await self._run(
            "fetch", "SELECT DISTINCT ON (name) name, yaml, by_owner FROM personas"
            " WHERE platform = $1 AND workspace = $2 ORDER BY name, id DESC", *workspace)
        return {name: (text, bool(by_owner)) for name, text, by_owner in rows if text is not None}

    async def save_workspace_persona(self, workspace: Workspace, name: str, text: str | None, *,
                                     saved_by: str, by_owner: bool) -> None:
        await self._run(
            "execute", "INSERT INTO personas (platform, workspace, name, yaml, saved_by, by_owner, saved_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7)", *workspace, name, text, saved_by, int(by_owner), _now())

    async def audit(self, key: ConvKey, user_id: str, action: str, detail: str = "") -> None:
        await self._run(
            "execute", "INSERT INTO audit (time, platform, workspace, channel, thread, user_id, action, detail)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8)", _now(), *key, user_id, action, detail)

    # -- other tables in the same database -----------------------------------------------------------

    async def execute(self, sql: str, params: tuple = ()) -> int:
        """Commit one portable statement (`?` placeholders); returns its rowcount."""
        return rowcount(await self._run("execute", to_postgres(sql), *params))

    async def fetch(self, sql: str, params: tuple = ()) -> list[tuple]:
        return [tuple(row) for row in await self._run("fetch", to_postgres(sql), *params)]

    # -- reporting -----------------------------------------------------------------------------------

    async def tokens_today(self, key: ConvKey) -> int:
        """Prompt plus completion tokens the channel (all its threads) has spent since midnight UTC, counted
        across every process (always read: another process may have spent some a moment ago)."""
        return await self._run(
            "fetchval", "SELECT coalesce(sum(prompt_tokens + completion_tokens), 0)::bigint FROM messages"
            f" WHERE {KEY} AND created_at >= $4 AND prompt_tokens + completion_tokens > 0",
            *key.channel_key[:3], _now()[:10])

    async def usage(self, since: date | None = None, workspace: Workspace | None = None) -> list[dict]:
        """Tokens by platform, channel, persona and UTC day, oldest day first; one workspace's when given."""
        where, params = "", [(since or date.min).isoformat()]
        if workspace is not None:
            where, params = " AND platform = $2 AND workspace = $3", [*params, *workspace]
        rows = await self._run(
            "fetch",
            "SELECT platform, workspace, channel, persona, substr(created_at, 1, 10) AS day,"
            " sum(prompt_tokens)::bigint, sum(completion_tokens)::bigint FROM messages"
            f" WHERE prompt_tokens + completion_tokens > 0 AND created_at >= $1{where}"
            " GROUP BY platform, workspace, channel, persona, day ORDER BY day, platform, workspace, channel, persona",
            *params,
        )
        return [
            {"platform": p, "workspace": w, "channel": c, "persona": persona, "day": day,
             "prompt_tokens": prompt, "completion_tokens": completion, "total": prompt + completion}
            for p, w, c, persona, day, prompt, completion in rows
        ]

    async def export(self, platform: str | None = None, channel: str | None = None,
                     persona: str | None = None) -> AsyncIterator[dict]:
        """Each stored conversation the bot answered, as `{"messages": [...]}` (see HistoryStore.export)."""
        filters = {"platform": platform, "channel": channel, "persona": persona}
        params = [value for value in filters.values() if value is not None]
        where = [f"{column} = ${n}" for n, column in
                 enumerate((c for c, v in filters.items() if v is not None), start=1)]
        sql = (
            "SELECT platform, workspace, channel, thread, context, role, content FROM messages"
            + (" WHERE " + " AND ".join(where) if where else "")
            + " ORDER BY platform, workspace, channel, thread, context, id"
        )
        async with self._pool.acquire() as connection, connection.transaction():
            conversation: tuple | None = None
            turns: list[Message] = []
            async for *conv, role, content in connection.cursor(sql, *params, prefetch=1000):
                if tuple(conv) != conversation:
                    if answered := answered_turns(turns):
                        yield {"messages": answered}
                    conversation, turns = tuple(conv), []
                turns.append({"role": role, "content": content})
            if answered := answered_turns(turns):
                yield {"messages": answered}


async def migrate(connection: asyncpg.Connection) -> int:
    """Apply the steps this database lacks, all in one transaction, under a lock every starting process takes:
    processes that start together apply each step exactly once, and the later ones find nothing to do."""
    async with connection.transaction():
        await connection.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
        await connection.execute(CREATE_TABLE)
        applied = {name for (name,) in await connection.fetch(f"SELECT name FROM {TABLE}")}
        if refusal := too_new(applied):
            raise refusal
        for step in MIGRATIONS:
            if step.__name__ in applied:
                continue
            for sql, params in statements(step):
                await connection.execute(to_postgres(sql), *params)
            await connection.execute(f"INSERT INTO {TABLE} (name, applied_at) VALUES ($1, $2)",
                                     step.__name__, datetime.now(timezone.utc).isoformat(timespec="seconds"))
            applied.add(step.__name__)
    return len(applied)
