"""With DATABASE_URL, PostgreSQL holds the knowledge index's documents, chunks and vectors, and each process's
index.sqlite3 (FTS5, vectors) and FAISS indexes are replicas of it.

Writes (a sync's, an upload's, a removal's) go to PostgreSQL, one transaction per document, each appending a
change that names the document. Writers take turns on an advisory lock, so change numbers grow in commit order
and a replica that has applied change N has everything before it; a document's older changes are pruned as
it is written again (a replica only ever needs a document's newest state). A replica pulls the documents
changed since the last change it applied, rows and stored vectors, never embedding anything, into its own
SQLite file in one transaction, whose triggers log the chunk changes its FAISS indexes then follow
(vectors.Indexes.catch_up). Every write NOTIFYs: a process LISTENs and pulls at once, and every
FOLLOW_SECONDS anyway.

The knowledge folders are the same for every process (one volume, as docker-compose.yml mounts them): a sync
still compares them with the index, now the shared one, so a folder missing a document removes it for all.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable, Coroutine
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, NamedTuple, TypeVar

import asyncpg
import numpy as np

from bot.history_pg import advisory_lock_id, migrate, redacted
from bot.retrieval.chunk import Chunk
from bot.retrieval.store import FileEntry, Store

T = TypeVar("T")

CHANNEL = "personabot_knowledge"  # NOTIFY channel: some document changed
WRITES = advisory_lock_id("personabot", "knowledge", "writes")  # per transaction: change numbers in commit order
TURNS = advisory_lock_id("personabot", "knowledge", "turns")  # per job (a sync, an upload): one process indexes at a time
PULL_DOCUMENTS = 500  # documents per pull transaction
SHARED_META = {"config", "model"}  # how the shared index was built; the rest of meta describes the replica
CHUNK_COLUMNS = ["id", "source", "collection", "ord", "locator", "header", "text", "tokens", "hash", "vector"]
_INSERT_CHUNK = f"INSERT INTO chunks({', '.join(CHUNK_COLUMNS)}) VALUES ({', '.join('?' * len(CHUNK_COLUMNS))})"


class Pulled(NamedTuple):
    """Documents changed after some change, up to change `latest`: their rows now, or their removal."""

    latest: int
    documents: dict[str, tuple[tuple, list[tuple]]]  # source: (files row, chunk rows in CHUNK_COLUMNS order)
    removed: list[str]
    more: bool  # the page was full: pull again


class Primary:
    """The knowledge tables in PostgreSQL, called from the retriever's threads: asyncpg runs on a private loop."""

    def __init__(self, url: str, on_change: Callable[[], None] | None = None):
        self.url = url
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="knowledge-primary", daemon=True)
        self._thread.start()
        self._db: asyncpg.Connection | None = None
        self._turns: asyncpg.Connection | None = None  # holds the job lock, so the other one stays usable
        try:
            self._run(self._connect(on_change))
        except BaseException:
            self._stop_loop()
            raise

    async def _connect(self, on_change: Callable[[], None] | None) -> None:
        self._busy = asyncio.Lock()  # one statement at a time on the connection
        self._on_change = on_change
        async with self._busy:
            await self._connection()
            await migrate(self._db)

    async def _connection(self) -> asyncpg.Connection:
        """The connection, opened again after PostgreSQL dropped it (a restart): the call that found it dead
        failed, the next one reconnects and listens again. Called under _busy."""
        if self._db is None or self._db.is_closed():
            try:
                self._db = await asyncpg.connect(self.url)
            except (OSError, asyncpg.PostgresError) as exc:
                raise RuntimeError(f"cannot reach the knowledge database at {redacted(self.url)}: {exc}") from exc
            if self._on_change is not None:
                await self._db.add_listener(CHANNEL, lambda *_: self._on_change())
                self._on_change()  # changes may have been missed while it was away
        return self._db

    def _run(self, work: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(work, self.loop).result()

    def _call(self, work: Callable[[asyncpg.Connection], Awaitable[T]], *, transaction: bool = False,
              snapshot: bool = False) -> T:
        """work(connection) on the private loop, one at a time; in a transaction (a repeatable-read, read-only
        one with `snapshot`) when asked."""
        async def call() -> T:
            async with self._busy:
                db = await self._connection()
                if not (transaction or snapshot):
                    return await work(db)
                options = {"isolation": "repeatable_read", "readonly": True} if snapshot else {}
                async with db.transaction(**options):
                    return await work(db)

        return self._run(call())

    def close(self) -> None:
        async def disconnect() -> None:
            for connection in (self._turns, self._db):
                if connection is not None:
                    await connection.close()

        try:
            self._run(disconnect())
        finally:
            self._stop_loop()

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join()
        self.loop.close()

    # -- turns ---------------------------------------------------------------------------------------

    def take_turn(self) -> None:
        """Waits until no other process runs an index-changing job (a session lock, dropped with a dead process)."""
        async def take() -> None:
            if self._turns is None or self._turns.is_closed():
                self._turns = await asyncpg.connect(self.url)
            await self._turns.execute("SELECT pg_advisory_lock($1)", TURNS)

        self._run(take())

    def end_turn(self) -> None:
        self._run(self._turns.execute("SELECT pg_advisory_unlock($1)", TURNS))

    # -- reading -------------------------------------------------------------------------------------

    def latest(self) -> int:
        return self._call(lambda db: db.fetchval("SELECT COALESCE(MAX(seq), 0) FROM knowledge_changes"))

    def changes_since(self, seq: int, most: int = PULL_DOCUMENTS) -> Pulled:
        """The next `most` documents changed after `seq`, as of one snapshot."""
        async def read(db: asyncpg.Connection) -> Pulled:
            changes = await db.fetch(
                "SELECT seq, source, present FROM knowledge_changes WHERE seq > $1 ORDER BY seq LIMIT $2", seq, most)
            if not changes:
                return Pulled(seq, {}, [], False)
            wanted = [row["source"] for row in changes if row["present"]]
            files = await db.fetch(
                "SELECT source, collection, sha256, size, mtime_ns, chunks, indexed_at FROM knowledge_files"
                " WHERE source = ANY($1::text[])", wanted)
            chunks = await db.fetch(
                f"SELECT {', '.join(CHUNK_COLUMNS)} FROM knowledge_chunks WHERE source = ANY($1::text[]) ORDER BY id",
                wanted)
            documents: dict[str, tuple[tuple, list[tuple]]] = {row["source"]: (tuple(row), []) for row in files}
            for row in chunks:
                documents[row["source"]][1].append(tuple(row))
            # removed, or present but gone from the snapshot: removed by a change the next page holds
            removed = [row["source"] for row in changes if row["source"] not in documents]
            return Pulled(changes[-1]["seq"], documents, removed, len(changes) == most)

        return self._call(read, snapshot=True)

    def given_name(self, source: str) -> str | None:
        return self._call(lambda db: db.fetchval("SELECT given FROM knowledge_names WHERE source = $1", source))

    def meta(self, key: str) -> str | None:
        return self._call(lambda db: db.fetchval("SELECT value FROM knowledge_meta WHERE key = $1", key))

    # -- writing -------------------------------------------------------------------------------------

    def replace(self, entry: FileEntry, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """One transaction: the document's old chunks out, its new ones in, and a change naming it."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")

        async def write(db: asyncpg.Connection) -> None:
            await db.execute("SELECT pg_advisory_xact_lock($1)", WRITES)
            await db.execute("DELETE FROM knowledge_chunks WHERE source = $1", entry.source)
            await db.execute(
                "INSERT INTO knowledge_files (source, collection, sha256, size, mtime_ns, chunks, indexed_at)"
                " VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (source) DO UPDATE SET"
                " collection = excluded.collection, sha256 = excluded.sha256, size = excluded.size,"
                " mtime_ns = excluded.mtime_ns, chunks = excluded.chunks, indexed_at = excluded.indexed_at",
                entry.source, entry.collection, entry.sha256, entry.size, entry.mtime_ns, len(chunks), now)
            if chunks:
                ids = await db.fetch(
                    "SELECT nextval(pg_get_serial_sequence('knowledge_chunks', 'id')) FROM generate_series(1, $1)",
                    len(chunks))
                await db.copy_records_to_table("knowledge_chunks", columns=CHUNK_COLUMNS, records=[
                    (row[0], entry.source, entry.collection, ord_, c.locator, c.header, c.text, c.tokens, c.hash,
                     np.ascontiguousarray(v, dtype=np.float32).tobytes())
                    for ord_, (row, c, v) in enumerate(zip(ids, chunks, vectors))])
            await _changed(db, entry.source, present=True)

        self._call(write, transaction=True)

    def remove(self, source: str) -> None:
        async def write(db: asyncpg.Connection) -> None:
            await db.execute("SELECT pg_advisory_xact_lock($1)", WRITES)
            await db.execute("DELETE FROM knowledge_chunks WHERE source = $1", source)
            await db.execute("DELETE FROM knowledge_files WHERE source = $1", source)
            await _changed(db, source, present=False)

        self._call(write, transaction=True)

    def touch(self, source: str, size: int, mtime_ns: int) -> None:
        """The file's stat, for the next sync's quick check; no change: its content is what it was."""
        self._execute("UPDATE knowledge_files SET size = $1, mtime_ns = $2 WHERE source = $3", size, mtime_ns, source)

    def set_given_name(self, source: str, given: str) -> None:
        self._execute("INSERT INTO knowledge_names (source, given) VALUES ($1, $2)"
                      " ON CONFLICT (source) DO UPDATE SET given = excluded.given", source, given)

    def forget_given_names(self, keep: set[str]) -> None:
        self._execute("DELETE FROM knowledge_names WHERE NOT (source = ANY($1::text[]))", sorted(keep))

    def set_meta(self, key: str, value: str) -> None:
        self._execute("INSERT INTO knowledge_meta (key, value) VALUES ($1, $2)"
                      " ON CONFLICT (key) DO UPDATE SET value = excluded.value", key, value)

    def _execute(self, sql: str, *args: Any) -> None:
        self._call(lambda db: db.execute(sql, *args))


async def _changed(db: asyncpg.Connection, source: str, *, present: bool) -> None:
    """The change naming a document written in this transaction; its earlier ones are superseded, so pruned."""
    await db.execute("DELETE FROM knowledge_changes WHERE source = $1", source)
    await db.execute("INSERT INTO knowledge_changes (source, present) VALUES ($1, $2)", source, int(present))
    await db.execute("SELECT pg_notify($1, '')", CHANNEL)  # delivered at commit


class ReplicatedStore(Store):
    """The local index as a replica of the Primary: searches read it as ever; writes go to the primary and
    come back through `pull`, which applies them here with the primary's chunk ids."""

    def __init__(self, path: Path, url: str, on_change: Callable[[], None] | None = None):
        super().__init__(path)
        try:
            self.primary = Primary(url, on_change)
        except BaseException:
            super().close()
            raise
        self.pull_lock = threading.Lock()
        origin = redacted(url)
        if self.get_meta("replica_of") != origin:  # a standalone index, or another database's replica
            self._reset(origin)

    def close(self) -> None:
        try:
            self.primary.close()
        finally:
            super().close()

    def _reset(self, origin: str) -> None:
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.execute("DELETE FROM chunks")
                self.db.execute("DELETE FROM files")
                self.db.execute("DELETE FROM given_names")
                self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('replica_of', ?)", (origin,))
                self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('replica_seq', '0')")
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def pull(self) -> int:
        """Applies the primary's changes since the last applied; returns how many documents changed here."""
        with self.pull_lock:
            seen = int(self.get_meta("replica_seq") or 0)
            latest = self.primary.latest()
            if latest == seen:
                return 0
            if latest < seen:  # the database was made again under the same URL: start over from it
                self._reset(self.get_meta("replica_of") or "")
                seen = 0
            applied = 0
            while True:
                pulled = self.primary.changes_since(seen)
                if pulled.latest != seen:
                    self._apply(pulled)
                    applied += len(pulled.documents) + len(pulled.removed)
                    seen = pulled.latest
                if not pulled.more:
                    return applied

    def _apply(self, pulled: Pulled) -> None:
        """One local transaction. A document's chunks are compared by id, so a chunk already here is neither
        removed nor added again: FAISS follows exactly what changed (ids are never reused)."""
        with self.lock:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                for source in pulled.removed:
                    self.db.execute("DELETE FROM chunks WHERE source = ?", (source,))
                    self.db.execute("DELETE FROM files WHERE source = ?", (source,))
                for source, (file_row, chunk_rows) in pulled.documents.items():
                    self.db.execute(
                        "INSERT INTO files(source, collection, sha256, size, mtime_ns, chunks, indexed_at)"
                        " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(source) DO UPDATE SET"
                        " collection = excluded.collection, sha256 = excluded.sha256, size = excluded.size,"
                        " mtime_ns = excluded.mtime_ns, chunks = excluded.chunks, indexed_at = excluded.indexed_at",
                        file_row)
                    here = {i for (i,) in self.db.execute("SELECT id FROM chunks WHERE source = ?", (source,))}
                    there = {row[0] for row in chunk_rows}
                    self.db.executemany("DELETE FROM chunks WHERE id = ?", [(i,) for i in here - there])
                    self.db.executemany(_INSERT_CHUNK, [row for row in chunk_rows if row[0] not in here])
                self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('replica_seq', ?)",
                                (str(pulled.latest),))
                self.db.execute("COMMIT")
            except BaseException:
                self.db.execute("ROLLBACK")
                raise

    def get_meta(self, key: str) -> str | None:
        return self.primary.meta(key) if key in SHARED_META else super().get_meta(key)

    def set_meta(self, key: str, value: str) -> None:
        if key in SHARED_META:
            self.primary.set_meta(key, value)
        else:
            super().set_meta(key, value)

    def replace(self, entry: FileEntry, chunks: list[Chunk], vectors: np.ndarray) -> None:
        self.primary.replace(entry, chunks, vectors)
        self.pull()

    def remove(self, source: str) -> None:
        self.primary.remove(source)
        self.pull()

    def touch(self, source: str, size: int, mtime_ns: int) -> None:
        self.primary.touch(source, size, mtime_ns)
        super().touch(source, size, mtime_ns)

    def given_name(self, source: str) -> str | None:
        return self.primary.given_name(source)

    def set_given_name(self, source: str, given: str) -> None:
        self.primary.set_given_name(source, given)

    def forget_given_names(self, keep: set[str]) -> None:
        self.primary.forget_given_names(keep)
