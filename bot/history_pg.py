"""Conversation history in PostgreSQL, shared by every process started with the same `DATABASE_URL`.

The same tables, migrations and methods as the SQLite store (bot/history.py), for a bot that runs as several
processes. Because another process may change anything at any moment, nothing is cached: every call is one
statement on a pooled connection, and budgets, personas and settings are always read fresh. What a reply
reads is read in the statement that starts its turn, and the reply's last write ends the turn, so an
uncontended message costs three round trips (start, the user's turn, the reply's). PostgreSQL's own group
commit does what the SQLite store's writer task does by hand.

A conversation's messages are answered in arrival order whichever process receives them: each takes the
conversation's next ticket as it arrives (one row per conversation, `turns`, whose row lock serialises the
tickets) and is answered once the ticket before it is served. Waiting costs no connection: the process that
serves a ticket wakes the next holder with NOTIFY, and a waiter that hears nothing for `POLL` seconds checks
that the holders ahead of it are alive (each ticket names its process's listening connection; a process that
dies closes it) and skips the dead ones.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from datetime import date, datetime, timezone
from typing import Any

import asyncpg

from bot.conversation import ConvKey, Workspace
from bot.history import MAX_TURNS, HistoryError, answered_turns, check_turn, fit_window
from bot.migrations import CREATE_TABLE, MIGRATIONS, TABLE, statements, too_new
from bot.models.base import Message
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
# -- turns: $1..$4 the conversation, $5 the ticket (taking one: this process's pid), $6 whether to read the
# spend, $7 today (UTC), $8 the window's most turns.
TAKE_TICKET = (
    "WITH ticket AS (INSERT INTO turns (platform, workspace, channel, thread, issued, served, pid)"
    " VALUES ($1, $2, $3, $4, 1, 0, $5) ON CONFLICT (platform, workspace, channel, thread)"
    " DO UPDATE SET issued = turns.issued + 1, pid = excluded.pid, before_pid = turns.pid"
    " RETURNING issued, served, before_pid),"
    # Only a ticket that has to wait is written down (for its wake-up and in case its process dies).
    " holder AS (INSERT INTO turn_tickets (platform, workspace, channel, thread, ticket, pid, before_pid)"
    " SELECT $1, $2, $3, $4, issued, $5, before_pid FROM ticket WHERE served + 1 < issued),"
    # `served` as of this statement's snapshot: if it says the turn has come, everything the previous holder
    # wrote is in the snapshot too (its last write and its release commit together). `latest`: as of the row
    # lock, which may be later (a release that committed while this waited for the row): then the turn has
    # come but the reads are stale, and are read again.
    f" head AS (SELECT issued AS ticket, coalesce((SELECT served FROM turns WHERE {KEY} AND thread = $4), 0)"
    " AS served, served AS latest FROM ticket)"
)
CHECK_TURN = (f"WITH head AS (SELECT $5::bigint AS ticket, served, served AS latest FROM (SELECT coalesce((SELECT"
              f" served FROM turns WHERE {KEY} AND thread = $4), 0) AS served) now)")
# What answering the message reads, read only once its turn has come: persona, freshness of the workspace's
# personas, spend, and the window's newest turns (a row each; none: one row of NULLs).
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
TURNS_CHANNEL = "personabot_turns"  # NOTIFY payload: "<conversation's lock id>:<ticket now served>"
NOTIFY = "SELECT pg_notify($1, $2)"


def _release(a: int) -> tuple[str, str]:
    """Ending a turn ($A..$A+3 the conversation, $A+4 the ticket): served only if it is still the previous
    ticket (a holder taken for dead may have been skipped meanwhile). Returns the CTEs, and the columns that
    say whom to wake: the tickets issued so far, and the process holding the next one when it is written
    down. No NOTIFY in here: a notifying commit holds PostgreSQL's one notify lock through its flush to disk,
    which would serialise every conversation's commits."""
    key = f"platform = ${a} AND workspace = ${a + 1} AND channel = ${a + 2} AND thread = ${a + 3}"
    return ((f"released AS (UPDATE turns SET served = ${a + 4} WHERE {key} AND served = ${a + 4} - 1"
             f" RETURNING issued), gone AS (DELETE FROM turn_tickets WHERE {key} AND ticket = ${a + 4})"),
            (f"(SELECT issued FROM released),"
             f" (SELECT pid FROM turn_tickets WHERE {key} AND ticket = ${a + 4} + 1)"))


RELEASE = "WITH {} SELECT {}".format(*_release(1))
APPEND_AND_RELEASE = "WITH message AS ({}), {} SELECT id, {} FROM message".format(INSERT_MESSAGE, *_release(14))
# The unserved tickets that had to wait, up to the asker's own, oldest first, with whether the process holding
# each (and the one before it) is still connected.
HOLDERS = (
    "SELECT t.served, k.ticket, EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = k.pid) AS alive,"
    " EXISTS (SELECT 1 FROM pg_stat_activity a WHERE a.pid = k.before_pid) AS before_alive"
    " FROM turns t JOIN turn_tickets k ON (k.platform, k.workspace, k.channel, k.thread)"
    " = (t.platform, t.workspace, t.channel, t.thread) AND k.ticket > t.served"
    f" WHERE t.platform = $1 AND t.workspace = $2 AND t.channel = $3 AND t.thread = $4 AND k.ticket <= $5"
    " ORDER BY k.ticket"
)
SKIP = (  # $5 served as read, $6 the last dead ticket; $7, $8 the notification
    f"WITH skipped AS (UPDATE turns SET served = $6 WHERE {KEY} AND thread = $4 AND served = $5"
    " RETURNING issued, served),"
    f" gone AS (DELETE FROM turn_tickets WHERE {KEY} AND thread = $4 AND ticket <= $6"
    " AND EXISTS (SELECT 1 FROM skipped))"
    " SELECT pg_notify($7, $8) FROM skipped WHERE issued > served"
)
POLL = 1.0  # seconds a waiting message waits for its wake-up before it checks the holders ahead are alive
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


class _Waiter:
    """One message waiting here for its turn: `served` is the newest served ticket it has heard of."""

    def __init__(self, ticket: int | None = None):
        self.ticket = ticket  # None until its ticket is taken: then it hears of every ticket served
        self.served = -1
        self.woken = asyncio.Event()

    def heard(self, served: int) -> None:
        self.served = max(self.served, served)
        self.woken.set()


class PostgresHistoryStore:
    shared = True  # other processes write the same database: nothing they change may be cached

    def __init__(self, url: str, pool: asyncpg.Pool):
        self.url = url
        self._pool = pool
        # Open as long as the process: its server pid names this process's tickets, and NOTIFY wakes arrive on it.
        self._listener: asyncpg.Connection
        # (conversation's lock id, ticket) -> woken when the ticket before it is served.
        self._waiting: dict[int, list[_Waiter]] = {}  # conversation's lock id -> its messages waiting here
        # Conversation -> when this process's newest message for it has its ticket (the next one asks after).
        self._issuing: dict[ConvKey, asyncio.Future] = {}
        self._in_turn: dict[ConvKey, int] = {}  # messages being answered or waiting here, per conversation
        self._abandoned: set[asyncio.Task] = set()  # tickets given up or not yet served: see _background
        self._notifying: set[asyncio.Task] = set()
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
            store._listener = await _listening(url, store._woken)
        except BaseException:
            await pool.close()
            raise
        return store

    async def close(self) -> None:
        if self._closing:
            return
        for task in self._abandoned:
            task.cancel()
        await asyncio.gather(*self._abandoned, *self._notifying, return_exceptions=True)
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
        lock = advisory_lock_id(*ending.key)
        message_id, issued, next_pid = await self._run("fetchrow", APPEND_AND_RELEASE, *params, *ending.key,
                                                       ending.ticket)
        ending.released = True  # only once committed: a failed write leaves the turn to end with its `async with`
        self._served(lock, ending.ticket, issued, next_pid)
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

    @asynccontextmanager
    async def turn(self, key: ConvKey, *, spend: bool = False) -> AsyncIterator[Turn]:
        """Held while one message of the conversation is answered, by whichever process answers it.

        The message takes its ticket on entry; the statement that finds its turn has come also reads what
        answering it needs (the channel's persona, the workspace personas' newest row, today's spend when
        `spend`, the window), yielded as a `Turn`. `append(..., ending=turn)` ends the turn with the reply's
        last write; otherwise it ends when the `async with` does.
        """
        lock = advisory_lock_id(*key)
        before = self._issuing.get(key)
        issued = self._issuing[key] = asyncio.get_running_loop().create_future()
        self._in_turn[key] = self._in_turn.get(key, 0) + 1
        # Listening before the ticket is taken: a ticket served in between still wakes this one.
        waiter = _Waiter()
        self._waiting.setdefault(lock, []).append(waiter)
        try:
            try:
                if before is not None:  # this process's previous message for it takes its ticket first
                    await asyncio.wait({before})
                rows = await self._take_ticket(key, lock, spend)
            finally:
                if not issued.done():
                    issued.set_result(None)
            ticket = waiter.ticket = rows[0]["ticket"]
            try:
                if rows[0]["served"] + 1 < ticket:  # someone (here or elsewhere) is answering an earlier one
                    waiter.heard(rows[0]["latest"])
                    rows = await self._await_turn(key, waiter, spend)
            except BaseException:  # gave up waiting: the ticket is served, doing nothing, when it comes up
                self._abandon(key, lock, ticket)
                raise
            finally:
                self._stop_waiting(lock, waiter)
            turn = self._opened(key, ticket, rows)
            try:
                yield turn
            finally:
                if not turn.released:
                    await asyncio.shield(self._end(key, lock, ticket))
        finally:
            self._stop_waiting(lock, waiter)
            if self._issuing.get(key) is issued:
                del self._issuing[key]
            self._in_turn[key] -= 1
            if not self._in_turn[key]:
                del self._in_turn[key]

    @property
    def conversations_in_turn(self) -> int:
        """Conversations with a message being answered or waiting here (0 when idle: nothing is left behind)."""
        return len(self._in_turn)

    def _reads(self, spend: bool) -> tuple:
        return (spend, _now()[:10], MAX_TURNS)

    async def _take_ticket(self, key: ConvKey, lock: int, spend: bool) -> list[asyncpg.Record]:
        pid = await self._listening_pid()
        taking = asyncio.ensure_future(self._run("fetch", TAKE_TICKET + TURN_READS, *key, pid, *self._reads(spend)))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future) -> None:  # the ticket may be ours by the time the answer comes
                if not done.cancelled() and done.exception() is None:
                    self._abandon(key, lock, done.result()[0]["ticket"])
            taking.add_done_callback(give_back)
            raise

    async def _await_turn(self, key: ConvKey, waiter: "_Waiter", spend: bool) -> list[asyncpg.Record]:
        """Waits, holding no connection, until the ticket before the waiter's is served; returns the turn's
        reads. Woken by the process that served it (NOTIFY, or directly when that is this process)."""
        ticket = waiter.ticket
        assert ticket is not None
        while True:
            if waiter.served + 1 < ticket:
                waiter.woken.clear()
                try:
                    await asyncio.wait_for(waiter.woken.wait(), POLL)
                except asyncio.TimeoutError:
                    served = await self._skip_dead(key, advisory_lock_id(*key), ticket)
                    if served is not None and served + 1 < ticket:
                        continue  # a live process is still answering an earlier message: wait on
            rows = await self._run("fetch", CHECK_TURN + TURN_READS, *key, ticket, *self._reads(spend))
            if rows[0]["served"] + 1 >= ticket:
                return rows
            waiter.heard(rows[0]["served"])

    def _woken(self, connection: asyncpg.Connection, pid: int, channel: str, payload: str) -> None:
        lock, served = payload.split(":")
        self._wake(int(lock), int(served))

    def _wake(self, lock: int, served: int) -> bool:
        """Wakes this process's messages that `served` concerns; True if the next ticket's holder is here."""
        here = False
        for waiter in self._waiting.get(lock, ()):
            if waiter.ticket is None or waiter.ticket <= served + 1:
                waiter.heard(served)
                here = here or waiter.ticket == served + 1
        return here

    def _stop_waiting(self, lock: int, waiter: "_Waiter") -> None:
        waiters = self._waiting.get(lock, [])
        if waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._waiting[lock]

    async def _skip_dead(self, key: ConvKey, lock: int, ticket: int) -> int | None:
        """Serves the tickets ahead of `ticket` whose processes are gone, up to the first live one; returns the
        newest served ticket (None: unknown)."""
        rows = await self._run("fetch", HOLDERS, *key, ticket)
        if not rows:
            return None
        written = {row["ticket"]: row for row in rows}
        dead = None
        for ahead in range(rows[0]["served"] + 1, ticket):
            # A ticket that did not wait is named only by the one after it (which did).
            alive = written[ahead]["alive"] if ahead in written else (
                written[ahead + 1]["before_alive"] if ahead + 1 in written else True)
            if alive:
                break
            dead = ahead
        if dead is not None:
            log.warning("skipping turns of a process that is gone", extra={"key": str(key)})
            await self._run("execute", SKIP, *key, rows[0]["served"], dead, TURNS_CHANNEL, f"{lock}:{dead}")
            return dead
        return rows[0]["served"]

    def _opened(self, key: ConvKey, ticket: int, rows: list[asyncpg.Record]) -> Turn:
        first = rows[0]
        newest = [({"role": row["role"], "content": row["content"]}, row["tokens"])
                  for row in rows if row["role"] is not None]

        async def window(budget_tokens: int, counter: Callable[[Message], int] | None = None) -> list[Message]:
            if budget_tokens <= 0:
                return []
            return fit_window(newest, len(newest) < MAX_TURNS, budget_tokens, counter)  # type: ignore[arg-type]

        return Turn(key, first["persona"], first["spent"], first["newest"], window, ticket)

    async def _end(self, key: ConvKey, lock: int, ticket: int, *, again: bool = True) -> None:
        """Serves `ticket`. While that fails (the server restarting, say) it is tried again every POLL seconds
        in the background: the others take this process for dead only once it is, and wait for it till then."""
        try:
            self._served(lock, ticket, *await self._run("fetchrow", RELEASE, *key, ticket))
            return
        except (OSError, HistoryError, asyncpg.InterfaceError) as exc:
            if self._closing:  # its listening connection closes with it: the others skip the ticket
                return
            if not again:
                raise
            log.error("could not end a conversation's turn (trying again): %s", exc)

        async def retry() -> None:
            while True:
                await asyncio.sleep(POLL)
                with contextlib.suppress(OSError, HistoryError, asyncpg.InterfaceError):
                    return await self._end(key, lock, ticket, again=False)

        self._background(retry())

    def _served(self, lock: int, ticket: int, issued: int | None, next_pid: int | None) -> None:
        """After `ticket` was served: wake the next ticket's holder, here directly, in another process by a
        NOTIFY to that process alone (sent in a transaction of its own, without waiting for it); to every
        process when the next ticket was taken too late for the release to see whose it is."""
        if issued is None or issued <= ticket:
            return
        if next_pid == self._listener.get_server_pid() and not self._listener.is_closed():
            self._wake(lock, ticket)
            return
        channel = _own_channel(next_pid) if next_pid is not None else TURNS_CHANNEL
        task = asyncio.ensure_future(self._run("execute", NOTIFY, channel, f"{lock}:{ticket}"))
        self._notifying.add(task)
        task.add_done_callback(self._notified)

    def _notified(self, task: asyncio.Task) -> None:
        self._notifying.discard(task)
        if not task.cancelled() and task.exception() is not None:  # the waiter finds out within POLL anyway
            log.warning("could not wake the next message's holder: %s", task.exception())

    def _abandon(self, key: ConvKey, lock: int, ticket: int) -> None:
        """A ticket given up while waiting is served once its turn comes, so the messages after it go on."""
        async def serve() -> None:
            waiter = _Waiter(ticket)
            self._waiting.setdefault(lock, []).append(waiter)
            try:
                await self._await_turn(key, waiter, False)
            finally:
                self._stop_waiting(lock, waiter)
            await self._end(key, lock, ticket)

        if not self._closing:  # closing the listening connection makes every ticket left here read as dead
            self._background(serve())

    def _background(self, work: Awaitable[None]) -> None:
        """Turn keeping that must outlive the message it was for; cancelled when the store closes."""
        task = asyncio.ensure_future(work)
        self._abandoned.add(task)
        task.add_done_callback(self._abandoned.discard)

    async def _listening_pid(self) -> int:
        """The server pid of the connection this process listens on; reopened if it was lost (tickets taken
        under the old one then read as dead to the others, who skip them)."""
        if self._listener.is_closed():
            self._listener = await _listening(self.url, self._woken)
        return self._listener.get_server_pid()

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


def _own_channel(pid: int) -> str:
    """The channel only the process whose listening connection has server pid `pid` listens on."""
    return f"{TURNS_CHANNEL}_{pid}"


async def _listening(url: str, woken: Callable) -> asyncpg.Connection:
    """A connection listening for wake-ups: those for every process, and those for this one alone."""
    connection = await asyncpg.connect(url)
    for channel in (TURNS_CHANNEL, _own_channel(connection.get_server_pid())):
        await connection.add_listener(channel, woken)
    return connection


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
