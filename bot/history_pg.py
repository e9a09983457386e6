"""Conversation history in PostgreSQL, shared by every process started with the same `DATABASE_URL`.

The same tables, migrations and methods as the SQLite store (bot/history.py), for a bot that runs as several
processes. Because another process may change anything at any moment, nothing is cached: every call is one
statement on a pooled connection, and budgets, personas and settings are always read fresh. What a reply
reads is read in the statement that starts its turn, and the reply's last write ends the turn, so an
uncontended message costs three round trips (start, the user's turn, the reply's). PostgreSQL's own group
commit does what the SQLite store's writer task does by hand.

A conversation's messages are answered in arrival order whichever process receives them, by tickets in the
database: that machinery is bot/pg_turns.py (`TicketTurns`); this module adds what answering a message reads.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from datetime import date, datetime, timezone
from typing import Any

import asyncpg

from bot.conversation import ConvKey, Workspace
from bot.history import MAX_TURNS, HistoryError, check_turn, fit_window
from bot.history_reports import answered_conversations, export_query, usage_rows
from bot.migrations import CREATE_TABLE, MIGRATIONS, TABLE, statements, too_new
from bot.models.base import Message
from bot.pg_turns import TicketTurns, ending_with
from bot.sql_dialect import rowcount, to_postgres
from bot.turns import Turn

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
# What answering the message reads, read only once its turn has come, in the statement of bot/pg_turns.py that
# takes or checks its ticket (which uses $1..$5): persona, freshness of the workspace's personas, spend, and
# the window's newest turns (a row each; none: one row of NULLs). $6 whether to read the spend, $7 today
# (UTC), $8 the window's most turns.
TURN_READS = (
    " SELECT h.ticket, h.served, h.latest, r.persona, r.newest, r.spent, w.role, w.content, w.tokens FROM head h"
    f" LEFT JOIN LATERAL (SELECT (SELECT persona FROM channels WHERE {KEY}) AS persona,"
    " (SELECT max(id) FROM personas WHERE platform = $1 AND workspace = $2) AS newest,"
    " CASE WHEN $6 THEN (SELECT coalesce(sum(prompt_tokens + completion_tokens), 0)::bigint FROM messages"
    f" WHERE {KEY} AND created_at >= $7 AND prompt_tokens + completion_tokens > 0) END AS spent"
    " WHERE h.served + 1 >= h.ticket) r ON true"
    " LEFT JOIN LATERAL (SELECT id, role, content, tokens FROM messages"
    f" WHERE {KEY} AND thread = $4 AND context = {CONTEXT} AND h.served + 1 >= h.ticket"
    " ORDER BY id DESC LIMIT $8) w ON true ORDER BY w.id DESC"
)
APPEND_AND_RELEASE = ending_with(INSERT_MESSAGE, 14)
NEXT_CONTEXT = (" ON CONFLICT (platform, workspace, channel, thread)"
                " DO UPDATE SET context = contexts.context + 1, reset_at = excluded.reset_at")


def advisory_lock_id(*parts: str) -> int:
    """A signed 64-bit advisory lock number for a name, public for every store on the database (replica.py too):
    a collision only makes two holders wait in turn."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


MIGRATION_LOCK = advisory_lock_id("personabot", "migrations")


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def redacted(url: str) -> str:
    """The URL with its password hidden, fit for an error message or a log."""
    return re.sub(r"(://[^:/@]*:)[^@]*@", r"\1***@", url)


async def _no_session_state(connection: asyncpg.Connection) -> None:
    """Pool connections for statements keep no session state, so returning one costs no reset round trip."""


class PostgresHistoryStore(TicketTurns):
    shared = True  # other processes write the same database: nothing they change may be cached

    def __init__(self, url: str, pool: asyncpg.Pool):
        super().__init__()
        self.url = url
        self._pool = pool
        self._closing = False
        self._busy = 0  # statements under way: close() lets them finish, as the SQLite store commits its queue
        self._idle = asyncio.Event()

    @classmethod
    async def open(cls, url: str, *, pool_size: int = 8) -> "PostgresHistoryStore":
        """Connect, bring the schema up to date (once, however many processes start together) and pool.

        A process holds at most `pool_size + 1` connections (9: eleven processes fit in PostgreSQL's default
        max_connections of 100), however many conversations are waiting: a wait holds no connection.
        """
        try:
            pool = await asyncpg.create_pool(url, min_size=1, max_size=pool_size, reset=_no_session_state)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise HistoryError(f"could not connect to DATABASE_URL {redacted(url)}: {exc}") from exc
        try:
            async with pool.acquire() as connection:
                await migrate(connection)
            store = cls(url, pool)
            await store._listen()
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        if self._closing:
            return
        await self._stop_turns()
        self._closing = True
        self._idle.clear()
        if self._busy:
            await self._idle.wait()
        await self._listener.close()  # this process's tickets left behind now read as dead to the others
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
                     completion_tokens: int = 0, ending: Turn | None = None) -> int:
        """Store one turn in the conversation's current context; returns its id once committed.

        `ending`: the reply's last write also ends that turn, in the same statement (and wakes the next
        message's holder), saving the turn's own round trip at the end.
        """
        check_turn(role, content, tokens, prompt_tokens, completion_tokens)
        params = (*key, role, author, content, persona, tokens, prompt_tokens, completion_tokens, finish_reason,
                  _now())
        if ending is None or ending.released or ending.ticket is None:
            return await self._run("fetchval", INSERT_MESSAGE, *params)
        message_id, issued, next_pid = await self._run("fetchrow", APPEND_AND_RELEASE, *params, *ending.key,
                                                       ending.ticket)
        ending.released = True  # only once committed: a failed write leaves the turn to end with its `async with`
        self._served(advisory_lock_id(*ending.key), ending.ticket, issued, next_pid)
        return message_id

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

    def turn(self, key: ConvKey, *, spend: bool = False) -> AbstractAsyncContextManager[Turn]:
        """Held while one message of the conversation is answered, by whichever process answers it.

        The message takes its ticket on entry; the statement that finds its turn has come also reads what
        answering it needs (the channel's persona, the workspace personas' newest row, today's spend when
        `spend`, the window), yielded as a `Turn`. `append(..., ending=turn)` ends the turn with the reply's
        last write; otherwise it ends when the `async with` does.
        """
        return self._ticketed(key, advisory_lock_id(*key), spend)

    def _reads(self, spend: bool) -> tuple[str, tuple]:
        return TURN_READS, (spend, _now()[:10], MAX_TURNS)

    def _opened(self, key: ConvKey, ticket: int, rows: list[asyncpg.Record]) -> Turn:
        first = rows[0]
        newest = [({"role": row["role"], "content": row["content"]}, row["tokens"])
                  for row in rows if row["role"] is not None]

        async def window(budget_tokens: int, counter: Callable[[Message], int] | None = None) -> list[Message]:
            if budget_tokens <= 0:
                return []
            return fit_window(newest, len(newest) < MAX_TURNS, budget_tokens, counter)  # type: ignore[arg-type]

        return Turn(key, first["persona"], first["spent"], first["newest"], window, ticket)

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
        return usage_rows(rows)

    async def export(self, platform: str | None = None, channel: str | None = None,
                     persona: str | None = None) -> AsyncIterator[dict]:
        """Each stored conversation the bot answered, as `{"messages": [...]}` (see `answered_conversations`),
        read through a cursor in one transaction."""
        sql, params = export_query(platform, channel, persona)
        async with self._pool.acquire() as connection, connection.transaction():
            async for conversation in answered_conversations(connection.cursor(to_postgres(sql), *params,
                                                                                prefetch=1000)):
                yield conversation


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
