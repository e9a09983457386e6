"""Conversation history in one plain SQLite file a user can open with `sqlite3` and read.

Every message the bot answers costs a handful of store calls, so the hot path is shaped for throughput:
- appends are group-committed: callers enqueue, one writer task commits everything pending in a single
  transaction on a thread of its own (bot/history_writer.py), and each caller returns only once its row is
  committed (durable, and in arrival order);
- reads run on a second connection (WAL lets them proceed while the writer commits);
- a channel's persona and settings, each conversation's context number and its newest turns are cached
  write-through, so a conversation costs one backwards range scan of an index when first seen and no read
  after that.
The caches assume this process is the only writer, which is how the bot runs on one machine; the CLI only
reads. Several processes share a PostgreSQL database instead (`DATABASE_URL`, bot/history_pg.py), which has
the same methods; `open_history(settings)` picks one.
"""
from __future__ import annotations

import asyncio
import logging
import sqlite3
from bisect import bisect_right
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from datetime import date, datetime, timezone
from functools import partial
from itertools import accumulate
from pathlib import Path
from typing import TYPE_CHECKING

import aiosqlite

from bot.conversation import ConvKey, Workspace
from bot.history_cache import MISSING, Conversation, Recent, RecentTurns
from bot.history_reports import answered_conversations, export_query, usage_rows
from bot.history_writer import GroupCommit, HistoryError, QueuedWrite, close_writer, connect_reader, connect_writer
from bot.migrations import migrate
from bot.models.base import Message
from bot.sqlite_wal import use_wal
from bot.turns import ArrivalOrder, Turn

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.history_pg import PostgresHistoryStore

log = logging.getLogger(__name__)

ROLES = ("system", "user", "assistant")
# A window never reaches back further than this many turns, so one message's read is bounded however long
# a channel has been talking; at typical turn sizes the token budget runs out well before it.
MAX_TURNS = 200
# Recent turns kept in memory for the window, across all conversations (a few tens of MB at most).
CACHED_CHARS = 16_000_000

INSERT_MESSAGE = (
    "INSERT INTO messages (platform, workspace, channel, thread, context, role, author, content, persona, tokens,"
    " prompt_tokens, completion_tokens, finish_reason, created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
KEY = "platform = ? AND workspace = ? AND channel = ?"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _channel(key: ConvKey) -> tuple[str, str, str]:
    """The key's (platform, workspace, channel): a ConvKey is a tuple, so it binds as SQL parameters itself."""
    return key[:3]


class HistoryStore(GroupCommit):
    # True on a store whose database other processes write too (PostgreSQL): callers that cache what is in it
    # (workspace personas, replayed Slack requests) must check or record through the database. This one is
    # the only writer of its file.
    shared = False

    def __init__(self, path: Path, writer: sqlite3.Connection, reader: aiosqlite.Connection):
        self.path = path
        # The writer is plain sqlite3 on a thread of its own, so a whole batch costs one hop off the event loop.
        self._db = writer
        self._db_thread = ThreadPoolExecutor(1, thread_name_prefix="history-writer")
        self._read = reader
        self._pending: list[QueuedWrite] = []
        self._wake = asyncio.Event()
        self._closing = False
        self._admitting = 0
        self._contexts = Recent()
        self._personas = Recent()
        self._settings = Recent()
        self._spent = Recent()  # channel -> (UTC day, tokens spent that day)
        self._turns = RecentTurns(MAX_TURNS, CACHED_CHARS)
        self._order = ArrivalOrder()
        # Held while a batch commits and updates the caches, and while a cache is filled from disk, so a fill
        # never misses a turn committed during its read.
        self._sync = asyncio.Lock()
        self._writer = asyncio.create_task(self._write_loop(), name="history-writer")

    @classmethod
    async def open(cls, path: str | Path) -> "HistoryStore":
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(_prepare, path)
        writer = await asyncio.to_thread(connect_writer, path)
        reader = await connect_reader(path)
        await reader.execute("PRAGMA query_only = ON")
        return cls(path, writer, reader)

    async def close(self) -> None:
        """Commit whatever is still queued, then close; appends after this raise `HistoryError`."""
        if self._closing:
            return
        self._closing = True
        self._wake.set()
        await self._writer
        await self._in_writer(close_writer, self._db)
        self._db_thread.shutdown()
        await self._read.close()

    # -- messages ------------------------------------------------------------------------------------

    async def append(
        self,
        key: ConvKey,
        role: str,
        content: str,
        *,
        author: str = "",
        persona: str = "",
        tokens: int = 0,
        finish_reason: str | None = None,
        prompt_tokens: int = 0,
        completion_tokens: int = 0,
        ending: Turn | None = None,
    ) -> int:
        """Store one turn in the conversation's current context; returns its id once committed.

        `ending`: the reply's last write, which may end that turn in the same statement (the PostgreSQL store
        does; here the turn simply ends when its `async with` does).
        """
        check_turn(role, content, tokens, prompt_tokens, completion_tokens)
        with self._admitted():
            context = await self._context(key)
            now = _now()
            params = (*key, context, role, author, content, persona, tokens, prompt_tokens, completion_tokens,
                      finish_reason, now)
            done = self._enqueue(INSERT_MESSAGE, params, key)
        return await done

    async def window(self, key: ConvKey, budget_tokens: int, counter: Callable[[Message], int] | None = None) -> list[Message]:
        """The newest turns of the current context whose tokens fit `budget_tokens`, oldest first.

        Stored token counts are used as-is; `counter` only prices turns stored without one.
        """
        if budget_tokens <= 0:
            return []
        context = await self._context(key)
        conversation = self._turns.get(key, context) or await self._load_turns(key, context)
        newest = [(message, tokens) for _, message, tokens in reversed(conversation.turns)]
        return fit_window(newest, conversation.whole, budget_tokens, counter)

    @asynccontextmanager
    async def turn(self, key: ConvKey, *, spend: bool = False) -> AsyncIterator[Turn]:
        """Held while one message of the conversation is answered; later messages wait, in arrival order.

        Yields what answering it reads (the channel's persona, today's spend when `spend`, the window), here
        from the caches."""
        async with self._order.turn(key):
            yield Turn(key, await self.get_persona(key), await self.tokens_today(key) if spend else None,
                       MISSING, partial(self.window, key))

    @property
    def conversations_in_turn(self) -> int:
        """Conversations with a message being answered or waiting (0 when idle: nothing is left behind)."""
        return len(self._order)

    async def reset(self, key: ConvKey) -> None:
        """Start a fresh context for this conversation; earlier turns stay on disk for export and audit."""
        with self._admitted():
            context = await self._context(key) + 1
            self._contexts.put(key, context)
            done = self._enqueue(
                "INSERT INTO contexts (platform, workspace, channel, thread, context, reset_at) VALUES (?, ?, ?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET context = excluded.context, reset_at = excluded.reset_at",
                (*key, context, _now()),
            )
        try:
            await done
        except BaseException:
            self._contexts.forget(key)
            raise

    async def reset_channel(self, key: ConvKey) -> None:
        """A fresh context for the channel and every thread in it (on Slack every conversation is a thread)."""
        channel = key.channel_key
        await self.reset(channel)
        with self._admitted():
            done = self._enqueue(
                "INSERT INTO contexts (platform, workspace, channel, thread, context, reset_at)"
                " SELECT t.platform, t.workspace, t.channel, t.thread, coalesce(c.context, 0) + 1, ?"
                " FROM (SELECT DISTINCT platform, workspace, channel, thread FROM messages"
                f"       WHERE {KEY} AND thread != '') t"
                " LEFT JOIN contexts c USING (platform, workspace, channel, thread) WHERE true"
                " ON CONFLICT DO UPDATE SET context = excluded.context, reset_at = excluded.reset_at",
                (_now(), *_channel(channel)),
            )
        try:
            await done
        finally:
            # Threads' cached context numbers are stale now; the next message of each reads its new one.
            self._contexts.forget_where(lambda cached: cached[:3] == channel[:3] and cached[3])

    async def _load_turns(self, key: ConvKey, context: int) -> Conversation:
        async with self._sync:
            if (conversation := self._turns.get(key, context)) is not None:
                return conversation
            rows = await self._read.execute_fetchall(
                f"SELECT id, role, content, tokens FROM messages WHERE {KEY} AND thread = ? AND context = ?"
                " ORDER BY id DESC LIMIT ?",
                (*key, context, MAX_TURNS),
            )
            return self._turns.put(key, context, [(id_, {"role": role, "content": content}, tokens)  # type: ignore[misc]
                                                  for id_, role, content, tokens in reversed(rows)])

    async def _context(self, key: ConvKey) -> int:
        context = self._contexts.get(key)
        if context is MISSING:
            rows = await self._read.execute_fetchall(f"SELECT context FROM contexts WHERE {KEY} AND thread = ?", key)
            context = self._contexts.fill(key, rows[0][0] if rows else 0)
        return context

    # -- channels ------------------------------------------------------------------------------------

    async def get_persona(self, key: ConvKey) -> str | None:
        channel = key.channel_key
        persona = self._personas.get(channel)
        if persona is MISSING:
            rows = await self._read.execute_fetchall(f"SELECT persona FROM channels WHERE {KEY}", _channel(channel))
            persona = self._personas.fill(channel, rows[0][0] if rows else None)
        return persona

    async def set_persona(self, key: ConvKey, name: str) -> None:
        channel = key.channel_key
        self._personas.put(channel, name)
        try:
            await self._write(
                "INSERT INTO channels (platform, workspace, channel, persona, updated_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT DO UPDATE SET persona = excluded.persona, updated_at = excluded.updated_at",
                (*_channel(channel), name, _now()),
            )
        except BaseException:
            self._personas.forget(channel)
            raise

    async def get_setting(self, key: ConvKey, name: str) -> str | None:
        cache_key = (key.channel_key, name)
        value = self._settings.get(cache_key)
        if value is MISSING:
            rows = await self._read.execute_fetchall(
                f"SELECT value FROM channel_settings WHERE {KEY} AND name = ?", (*_channel(key), name)
            )
            value = self._settings.fill(cache_key, rows[0][0] if rows else None)
        return value

    async def set_setting(self, key: ConvKey, name: str, value: str | None) -> None:
        """Set a per-channel flag; `None` removes it."""
        cache_key = (key.channel_key, name)
        self._settings.put(cache_key, value)
        try:
            if value is None:
                await self._write(f"DELETE FROM channel_settings WHERE {KEY} AND name = ?", (*_channel(key), name))
            else:
                await self._write(
                    "INSERT INTO channel_settings (platform, workspace, channel, name, value) VALUES (?, ?, ?, ?, ?)"
                    " ON CONFLICT DO UPDATE SET value = excluded.value",
                    (*_channel(key), name, str(value)),
                )
        except BaseException:
            self._settings.forget(cache_key)
            raise

    # -- workspace personas --------------------------------------------------------------------------

    async def workspace_personas(self, workspace: Workspace) -> dict[str, tuple[str, bool]]:
        """The workspace's chat-made personas: name -> (YAML, saved by an owner), newest version of each."""
        rows = await self._read.execute_fetchall(
            "SELECT name, yaml, by_owner FROM personas p WHERE platform = ? AND workspace = ? AND id ="
            " (SELECT max(id) FROM personas q WHERE q.platform = p.platform AND q.workspace = p.workspace"
            " AND q.name = p.name) ORDER BY name",
            tuple(workspace),
        )
        return {name: (text, bool(by_owner)) for name, text, by_owner in rows if text is not None}

    async def save_workspace_persona(self, workspace: Workspace, name: str, text: str | None, *,
                                     saved_by: str, by_owner: bool) -> None:
        """A new version of one workspace persona; `text=None` deletes it (older versions stay on disk)."""
        await self._write(
            "INSERT INTO personas (platform, workspace, name, yaml, saved_by, by_owner, saved_at)"
            " VALUES (?, ?, ?, ?, ?, ?, ?)",
            (*workspace, name, text, saved_by, int(by_owner), _now()),
        )

    async def audit(self, key: ConvKey, user_id: str, action: str, detail: str = "") -> None:
        await self._write(
            "INSERT INTO audit (time, platform, workspace, channel, thread, user_id, action, detail)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (_now(), *key, user_id, action, detail),
        )

    # -- other tables in the same database -----------------------------------------------------------

    async def execute(self, sql: str, params: tuple = ()) -> int:
        """Commit one statement through the writer (after everything queued before it); returns its rowcount.

        For stores that keep their own tables in this database (Slack installs, knowledge) without a
        connection of their own. SQL uses `?` placeholders; the PostgreSQL store translates them.
        """
        with self._admitted():
            done = self._enqueue(sql, params, rowcount=True)
        return await done

    async def fetch(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Rows of one read on the reader connection (it sees every committed write)."""
        return list(await self._read.execute_fetchall(sql, params))

    # -- reporting -----------------------------------------------------------------------------------

    async def tokens_today(self, key: ConvKey) -> int:
        """Prompt plus completion tokens the channel (all its threads) has spent since midnight UTC."""
        channel, today = key.channel_key, _now()[:10]
        cached = self._spent.get(channel)
        if cached is not MISSING and cached[0] == today:
            return cached[1]
        async with self._sync:
            rows = await self._read.execute_fetchall(
                f"SELECT coalesce(sum(prompt_tokens + completion_tokens), 0) FROM messages WHERE {KEY}"
                " AND created_at >= ? AND prompt_tokens + completion_tokens > 0",
                (*_channel(channel), today),
            )
            self._spent.put(channel, (today, rows[0][0]))
            return rows[0][0]

    async def usage(self, since: date | None = None, workspace: Workspace | None = None) -> list[dict]:
        """Tokens by platform, channel, persona and UTC day, oldest day first; one workspace's when given."""
        where, params = "", [(since or date.min).isoformat()]
        if workspace is not None:
            where, params = " AND platform = ? AND workspace = ?", [*params, *workspace]
        rows = await self._read.execute_fetchall(
            "SELECT platform, workspace, channel, persona, substr(created_at, 1, 10) AS day,"
            " sum(prompt_tokens), sum(completion_tokens) FROM messages"
            f" WHERE prompt_tokens + completion_tokens > 0 AND created_at >= ?{where}"
            " GROUP BY platform, workspace, channel, persona, day ORDER BY day, platform, workspace, channel, persona",
            params,
        )
        return usage_rows(rows)

    async def export(self, platform: str | None = None, channel: str | None = None,
                     persona: str | None = None) -> AsyncIterator[dict]:
        """Each stored conversation (one context of one key) that the bot answered, as `{"messages": [...]}`
        (see `answered_conversations`)."""
        async with self._read.execute(*export_query(platform, channel, persona)) as cursor:
            cursor.arraysize = 1000
            async for conversation in answered_conversations(cursor):
                yield conversation

    def _remember(self, key: ConvKey, message_id: int, params: tuple) -> None:
        """A committed turn updates the cached window and the channel's spend for today."""
        context, role, content, tokens, prompt_tokens, completion_tokens, created_at = (
            params[4], params[5], params[7], params[9], params[10], params[11], params[13])
        self._turns.add(key, context, (message_id, {"role": role, "content": content}, tokens))  # type: ignore[typeddict-item]
        spent = self._spent.get(key.channel_key)
        if prompt_tokens + completion_tokens and spent is not MISSING and spent[0] == created_at[:10]:
            self._spent.put(key.channel_key, (spent[0], spent[1] + prompt_tokens + completion_tokens))


def check_turn(role: str, content: str, *counts: int) -> None:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, not {role!r}")
    if not isinstance(content, str):
        raise TypeError(f"content must be text, not {type(content).__name__}")
    if min(counts) < 0:
        raise ValueError("token counts cannot be negative")


def fit_window(newest: list[tuple[Message, int]], whole: bool, budget_tokens: int,
               counter: Callable[[Message], int] | None) -> list[Message]:
    """The window from a context's newest (turn, tokens) first; `whole` when they are all the context has."""
    costs = [tokens for _, tokens in newest]
    if counter is not None and 0 in costs:
        costs = [tokens or counter(message) for message, tokens in newest]
    fits = bisect_right(list(accumulate(costs)), budget_tokens)
    turns = [message for message, _ in reversed(newest[:fits])]
    cut = fits < len(newest) or not whole
    # A reply whose question fell outside the window reads as the bot talking to itself.
    while cut and turns and turns[0]["role"] == "assistant":
        turns.pop(0)
    return turns


async def open_history(settings: "Settings") -> "HistoryStore | PostgresHistoryStore":
    """The store this deployment uses: PostgreSQL when `DATABASE_URL` is set, else the SQLite file."""
    if settings.database_url:
        from bot.history_pg import PostgresHistoryStore

        return await PostgresHistoryStore.open(settings.database_url)
    return await HistoryStore.open(settings.db_path)


def _prepare(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    try:
        use_wal(db, 5)  # as long as sqlite3.connect's default busy timeout
        migrate(db)
    except sqlite3.DatabaseError as exc:
        raise HistoryError(f"{path} is not a usable personabot database: {exc}") from exc
    finally:
        db.close()
