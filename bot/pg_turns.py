"""Turns in PostgreSQL: a conversation's messages answered in arrival order whichever process receives them.

Each message takes the conversation's next ticket as it arrives (one row per conversation, `turns`, whose row
lock serialises the tickets) and is answered once the ticket before it is served. Waiting costs no connection:
the process that serves a ticket wakes the next holder with NOTIFY, and a waiter that hears nothing for `POLL`
seconds checks that the holders ahead of it are alive (each ticket names its process's listening connection;
a process that dies closes it) and skips the dead ones.

`TicketTurns` is the turn half of `PostgresHistoryStore` (bot/history_pg.py), as `GroupCommit` is the writer
half of the SQLite store. The store provides `url`, `_closing`, `_run` (one statement on its pool), and what
answering a message reads: `_reads(spend)`, a SELECT over the `head` these statements start with, and
`_opened(key, ticket, rows)`, the `Turn` made of its rows. Those reads ride on the ticket statements, so an
uncontended message's turn costs one round trip to start and none to end (the reply's last write ends it).
"""
from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from bot.conversation import ConvKey
from bot.history_writer import HistoryError
from bot.turns import Turn

log = logging.getLogger("bot.history_pg")  # the store's name: its turns log as they did before the split


def _conversation(a: int) -> str:
    """The condition on a conversation's key, its four parts the parameters $A..$A+3."""
    return f"platform = ${a} AND workspace = ${a + 1} AND channel = ${a + 2} AND thread = ${a + 3}"


CONVERSATION = _conversation(1)
# -- $1..$4 the conversation, $5 the ticket (taking one: this process's pid); the reads' parameters follow.
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
    f" head AS (SELECT issued AS ticket, coalesce((SELECT served FROM turns WHERE {CONVERSATION}), 0)"
    " AS served, served AS latest FROM ticket)"
)
CHECK_TURN = (f"WITH head AS (SELECT $5::bigint AS ticket, served, served AS latest FROM (SELECT coalesce((SELECT"
              f" served FROM turns WHERE {CONVERSATION}), 0) AS served) now)")
TURNS_CHANNEL = "personabot_turns"  # NOTIFY payload: "<conversation's lock id>:<ticket now served>"
NOTIFY = "SELECT pg_notify($1, $2)"


def ending_with(statement: str, first: int) -> str:
    """`statement` (one returning `id`) ending a turn in the same round trip; parameters $FIRST..$FIRST+3 are
    the conversation, $FIRST+4 the ticket. It selects the id, then what `_served` takes."""
    return "WITH message AS ({}), {} SELECT id, {} FROM message".format(statement, *_release(first))


def _release(a: int) -> tuple[str, str]:
    """Ending a turn ($A..$A+3 the conversation, $A+4 the ticket): served only if it is still the previous
    ticket (a holder taken for dead may have been skipped meanwhile). Returns the CTEs, and the columns that
    say whom to wake: the tickets issued so far, and the process holding the next one when it is written
    down. No NOTIFY in here: a notifying commit holds PostgreSQL's one notify lock through its flush to disk,
    which would serialise every conversation's commits."""
    key = _conversation(a)
    return ((f"released AS (UPDATE turns SET served = ${a + 4} WHERE {key} AND served = ${a + 4} - 1"
             f" RETURNING issued), gone AS (DELETE FROM turn_tickets WHERE {key} AND ticket = ${a + 4})"),
            (f"(SELECT issued FROM released),"
             f" (SELECT pid FROM turn_tickets WHERE {key} AND ticket = ${a + 4} + 1)"))


RELEASE = "WITH {} SELECT {}".format(*_release(1))
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
    f"WITH skipped AS (UPDATE turns SET served = $6 WHERE {CONVERSATION} AND served = $5"
    " RETURNING issued, served),"
    f" gone AS (DELETE FROM turn_tickets WHERE {CONVERSATION} AND ticket <= $6"
    " AND EXISTS (SELECT 1 FROM skipped))"
    " SELECT pg_notify($7, $8) FROM skipped WHERE issued > served"
)
POLL = 1.0  # seconds a waiting message waits for its wake-up before it checks the holders ahead are alive


class _Waiter:
    """One message waiting here for its turn: `served` is the newest served ticket it has heard of."""

    def __init__(self, ticket: int | None = None):
        self.ticket = ticket  # None until its ticket is taken: then it hears of every ticket served
        self.served = -1
        self.woken = asyncio.Event()

    def heard(self, served: int) -> None:
        self.served = max(self.served, served)
        self.woken.set()


class TicketTurns:
    url: str
    _closing: bool

    def __init__(self) -> None:
        # Open as long as the process: its server pid names this process's tickets, and NOTIFY wakes arrive on it.
        self._listener: asyncpg.Connection
        self._waiting: dict[int, list[_Waiter]] = {}  # conversation's lock id -> its messages waiting here
        # Conversation -> when this process's newest message for it has its ticket (the next one asks after).
        self._issuing: dict[ConvKey, asyncio.Future] = {}
        self._in_turn: dict[ConvKey, int] = {}  # messages being answered or waiting here, per conversation
        self._abandoned: set[asyncio.Task] = set()  # tickets given up or not yet served: see _background
        self._notifying: set[asyncio.Task] = set()

    async def _run(self, method: str, sql: str, *params: Any) -> Any:
        raise NotImplementedError

    def _reads(self, spend: bool) -> tuple[str, tuple]:
        raise NotImplementedError

    def _opened(self, key: ConvKey, ticket: int, rows: list[asyncpg.Record]) -> Turn:
        raise NotImplementedError

    async def _listen(self) -> None:
        """Opens the connection listening for wake-ups: those for every process, and those for this one alone."""
        connection = await asyncpg.connect(self.url)
        for channel in (TURNS_CHANNEL, _own_channel(connection.get_server_pid())):
            await connection.add_listener(channel, self._woken)
        self._listener = connection

    async def _stop_turns(self) -> None:
        """Before the store closes: the turn keeping in the background stops (the tickets it was still to serve
        read as dead to the others once the listening connection closes), and the wake-ups under way are sent."""
        for task in self._abandoned:
            task.cancel()
        await asyncio.gather(*self._abandoned, *self._notifying, return_exceptions=True)

    @asynccontextmanager
    async def _ticketed(self, key: ConvKey, lock: int, spend: bool) -> AsyncIterator[Turn]:
        """The turn of `PostgresHistoryStore.turn`; `lock`: the conversation's number, which wake-ups name."""
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
                    rows = await self._await_turn(key, lock, waiter, spend)
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

    async def _take_ticket(self, key: ConvKey, lock: int, spend: bool) -> list[asyncpg.Record]:
        pid = await self._listening_pid()
        reads, params = self._reads(spend)
        taking = asyncio.ensure_future(self._run("fetch", TAKE_TICKET + reads, *key, pid, *params))
        try:
            return await asyncio.shield(taking)
        except asyncio.CancelledError:
            def give_back(done: asyncio.Future) -> None:  # the ticket may be ours by the time the answer comes
                if not done.cancelled() and done.exception() is None:
                    self._abandon(key, lock, done.result()[0]["ticket"])
            taking.add_done_callback(give_back)
            raise

    async def _await_turn(self, key: ConvKey, lock: int, waiter: _Waiter, spend: bool) -> list[asyncpg.Record]:
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
                    served = await self._skip_dead(key, lock, ticket)
                    if served is not None and served + 1 < ticket:
                        continue  # a live process is still answering an earlier message: wait on
            reads, params = self._reads(spend)
            rows = await self._run("fetch", CHECK_TURN + reads, *key, ticket, *params)
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

    def _stop_waiting(self, lock: int, waiter: _Waiter) -> None:
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
                await self._await_turn(key, lock, waiter, False)
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
            await self._listen()
        return self._listener.get_server_pid()


def _own_channel(pid: int) -> str:
    """The channel only the process whose listening connection has server pid `pid` listens on."""
    return f"{TURNS_CHANNEL}_{pid}"
