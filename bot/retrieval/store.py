"""The knowledge index's source of truth: one SQLite file holding the manifest, the chunks and their vectors,
with an FTS5 table over the chunks for BM25.

The FAISS indexes are derived from the vectors stored here, so a damaged or missing FAISS file is rebuilt
without embedding anything again. `sqlite3 data/knowledge/index.sqlite3` shows plain tables. Sources and
collections are stored qualified (folders.py): a workspace's carry its "@platform:id/" prefix, global ones none.

Searches and listings read through a connection of their own: with WAL they see the last committed state
while a sync writes a large document, instead of waiting for its transaction to end.

Several processes may share the file (one data dir, `personabot run` started more than once): writers wait for
each other (busy timeout, BEGIN IMMEDIATE), and the `changes` log, written by triggers in the transaction that
adds or removes a chunk, is what each process's FAISS indexes follow (vectors.Indexes.catch_up).
"""
from __future__ import annotations

import functools
import re
import sqlite3
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import numpy as np

from bot.retrieval.chunk import Chunk
from bot.sqlite_wal import use_wal

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    source TEXT PRIMARY KEY,          -- collection/name.md, or @platform:id/collection/name.md
    collection TEXT NOT NULL,
    sha256 TEXT NOT NULL,
    size INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    chunks INTEGER NOT NULL,
    indexed_at TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id INTEGER PRIMARY KEY AUTOINCREMENT,   -- never reused: it is the FAISS id too
    source TEXT NOT NULL REFERENCES files(source) ON DELETE CASCADE,
    collection TEXT NOT NULL,
    ord INTEGER NOT NULL,
    locator TEXT NOT NULL,
    header TEXT NOT NULL,
    text TEXT NOT NULL,
    tokens INTEGER NOT NULL,
    hash TEXT NOT NULL,               -- sha256 of what was embedded: equal text reuses its vector
    vector BLOB NOT NULL              -- float32, unit length
);
CREATE INDEX IF NOT EXISTS chunks_source ON chunks(source);
CREATE INDEX IF NOT EXISTS chunks_collection ON chunks(collection);
CREATE INDEX IF NOT EXISTS chunks_hash ON chunks(hash);
CREATE VIRTUAL TABLE IF NOT EXISTS chunks_fts USING fts5(
    header, text, content='chunks', content_rowid='id', tokenize='porter unicode61 remove_diacritics 2'
);
CREATE TRIGGER IF NOT EXISTS chunks_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO chunks_fts(rowid, header, text) VALUES (new.id, new.header, new.text);
END;
CREATE TRIGGER IF NOT EXISTS chunks_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO chunks_fts(chunks_fts, rowid, header, text) VALUES ('delete', old.id, old.header, old.text);
END;
-- Every chunk added or removed, in commit order, written by the triggers in the same transaction as the chunk:
-- each process's FAISS indexes follow this log (vectors.py) instead of re-reading whole collections.
CREATE TABLE IF NOT EXISTS changes (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    chunk INTEGER NOT NULL,
    collection TEXT NOT NULL,
    added INTEGER NOT NULL            -- 1 added, 0 removed
);
CREATE TRIGGER IF NOT EXISTS chunks_logged_ai AFTER INSERT ON chunks BEGIN
    INSERT INTO changes(chunk, collection, added) VALUES (new.id, new.collection, 1);
END;
CREATE TRIGGER IF NOT EXISTS chunks_logged_ad AFTER DELETE ON chunks BEGIN
    INSERT INTO changes(chunk, collection, added) VALUES (old.id, old.collection, 0);
END;
CREATE TABLE IF NOT EXISTS given_names (    -- what an uploader called a file saved under its safe name
    source TEXT PRIMARY KEY,
    given TEXT NOT NULL
);
"""
BUSY_SECONDS = 30.0  # how long a writer waits for another process's transaction (one document's) to end
CHANGES_KEPT = 50_000  # log rows kept; a process further behind than that reconciles each collection instead
LEXICAL_ROWS = 4000  # passages BM25 may rank per query; see Store._rarest
# of chunks_fts's columns, header (document title and heading path) and text: 0 to 10 for the header won
# nothing in hybrid search on the benchmark's reporting halves (README, Knowledge)
BM25_WEIGHTS = (0.5, 1.0)
_WORD = re.compile(r"[^\W_](?:[\w.\-/:]*[^\W_])?", re.UNICODE)


@dataclass(frozen=True)
class FileEntry:
    source: str
    collection: str
    sha256: str
    size: int
    mtime_ns: int
    chunks: int


class FileRow(NamedTuple):
    """One line of a document listing, as the workspace asking sees it."""

    source: str  # collection/file.md, never qualified
    chunks: int
    size: int
    indexed_at: str
    own: bool  # the workspace's own document rather than global knowledge


@dataclass(frozen=True)
class StoredChunk:
    id: int
    source: str
    collection: str
    locator: str
    text: str
    tokens: int
    vector: np.ndarray


def _locked(method):
    """The write connection serves one index job at a time (sync, upload, removal), whose transactions are its own."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.lock:
            return method(self, *args, **kwargs)

    return wrapper


def _reading(method):
    """Search threads share the read connection, one query at a time."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.read_lock:
            return method(self, *args, **kwargs)

    return wrapper


def _following(method):
    """The follower connection reads the change log for one catch-up at a time."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with self.follow_lock:
            return method(self, *args, **kwargs)

    return wrapper


def _array(ids: set[int]) -> np.ndarray:
    return np.array(sorted(ids), dtype=np.int64)


class Changes(NamedTuple):
    """What the change log holds after some point: {collection: (ids added, ids removed)}, up to change `latest`."""

    latest: int
    by_collection: dict[str, tuple[np.ndarray, np.ndarray]]


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, timeout=BUSY_SECONDS, check_same_thread=False, isolation_level=None)
        use_wal(self.db, BUSY_SECONDS)
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()
        self.reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.read_lock = threading.Lock()
        # The change log is read through a third connection, so that catching up with a large ingest in another
        # process never holds up this one's searches.
        self.follower = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.follow_lock = threading.Lock()
        self._frequency: dict[str, int] = {}  # term: passages holding it, for `_rarest`
        self._frequency_of: int | None = None  # the reader's data_version those counts were taken at
        self._leads: dict[str, tuple[list[int], np.ndarray]] = {}  # collection: its documents' first passages
        self._leads_of: int | None = None  # the reader's data_version those were read at

    def close(self) -> None:
        with self.lock, self.read_lock, self.follow_lock:
            self.follower.close()
            self.reader.close()
            self.db.close()

    @_locked
    def get_meta(self, key: str) -> str | None:
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    @_locked
    def set_meta(self, key: str, value: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))

    @_locked
    def files(self) -> dict[str, FileEntry]:
        rows = self.db.execute("SELECT source, collection, sha256, size, mtime_ns, chunks FROM files")
        return {row[0]: FileEntry(*row) for row in rows}

    @_locked
    def touch(self, source: str, size: int, mtime_ns: int) -> None:
        self.db.execute("UPDATE files SET size = ?, mtime_ns = ? WHERE source = ?", (size, mtime_ns, source))

    @_locked
    def vectors_for(self, hashes: list[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for first in range(0, len(hashes), 500):
            part = hashes[first : first + 500]
            marks = ",".join("?" * len(part))
            for digest, blob in self.db.execute(f"SELECT hash, vector FROM chunks WHERE hash IN ({marks})", part):
                found[digest] = np.frombuffer(blob, dtype=np.float32)
        return found

    @_locked
    def replace(self, entry: FileEntry, chunks: list[Chunk], vectors: np.ndarray) -> None:
        """One transaction: readers see the old chunks or the new ones, never half of each."""
        now = datetime.now(timezone.utc).isoformat(timespec="seconds")
        self.db.execute("BEGIN IMMEDIATE")  # take the write lock now: a deferred one could fail to upgrade
        try:
            self.db.execute("DELETE FROM chunks WHERE source = ?", (entry.source,))
            self.db.execute(
                "INSERT OR REPLACE INTO files(source, collection, sha256, size, mtime_ns, chunks, indexed_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (entry.source, entry.collection, entry.sha256, entry.size, entry.mtime_ns, len(chunks), now),
            )
            self.db.executemany(
                "INSERT INTO chunks(source, collection, ord, locator, header, text, tokens, hash, vector)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (entry.source, entry.collection, ord_, c.locator, c.header, c.text, c.tokens, c.hash,
                     np.ascontiguousarray(v, dtype=np.float32).tobytes())
                    for ord_, (c, v) in enumerate(zip(chunks, vectors))
                ],
            )
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    @_locked
    def remove(self, source: str) -> None:
        self.db.execute("BEGIN IMMEDIATE")
        try:
            self.db.execute("DELETE FROM chunks WHERE source = ?", (source,))
            self.db.execute("DELETE FROM files WHERE source = ?", (source,))
            self.db.execute("COMMIT")
        except BaseException:  # an open transaction would make every later BEGIN on this connection fail
            self.db.execute("ROLLBACK")
            raise

    @_locked
    def given_name(self, source: str) -> str | None:
        row = self.db.execute("SELECT given FROM given_names WHERE source = ?", (source,)).fetchone()
        return row[0] if row else None

    @_locked
    def set_given_name(self, source: str, given: str) -> None:
        self.db.execute("INSERT OR REPLACE INTO given_names(source, given) VALUES (?, ?)", (source, given))

    @_locked
    def forget_given_names(self, keep: set[str]) -> None:
        """Names of files no longer in the folders go; a file that stays keeps its name while it fails to index."""
        gone = [(source,) for (source,) in self.db.execute("SELECT source FROM given_names") if source not in keep]
        self.db.executemany("DELETE FROM given_names WHERE source = ?", gone)

    @_locked
    def ids(self, collection: str) -> np.ndarray:
        rows = self.db.execute("SELECT id FROM chunks WHERE collection = ?", (collection,)).fetchall()
        return np.fromiter((r[0] for r in rows), dtype=np.int64, count=len(rows))

    @_locked
    def vectors(self, ids: np.ndarray, dim: int) -> np.ndarray:
        out = np.empty((len(ids), dim), dtype=np.float32)
        position = {int(i): n for n, i in enumerate(ids)}
        for first in range(0, len(ids), 500):
            part = [int(i) for i in ids[first : first + 500]]
            marks = ",".join("?" * len(part))
            for chunk_id, blob in self.db.execute(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", part):
                out[position[chunk_id]] = np.frombuffer(blob, dtype=np.float32)
        return out

    # -- following the change log (another process's writes, or this one's) -------------------------

    def pull(self) -> int:
        """Nothing to fetch: this file is the source of truth (a ReplicatedStore pulls from PostgreSQL)."""
        return 0

    @_following
    def latest_change(self) -> int:
        """The number of the newest change (0: none yet); one row of SQLite's own sequence table, microseconds."""
        row = self.follower.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        return row[0] if row else 0

    @_following
    def changes_since(self, seq: int) -> Changes | None:
        """The chunks added and removed after change `seq`, per collection, as of one snapshot; None when the log
        was pruned past it (the caller then compares whole collections)."""
        self.follower.execute("BEGIN")
        try:
            floor = self.follower.execute("SELECT value FROM meta WHERE key = 'changes_floor'").fetchone()
            if floor and int(floor[0]) > seq:
                return None
            rows = self.follower.execute(
                "SELECT seq, chunk, collection, added FROM changes WHERE seq > ? ORDER BY seq", (seq,)).fetchall()
        finally:
            self.follower.execute("COMMIT")
        added: dict[str, set[int]] = {}
        removed: dict[str, set[int]] = {}
        for _, chunk_id, collection, was_added in rows:
            (added if was_added else removed).setdefault(collection, set()).add(chunk_id)
        by_collection = {}
        for collection in added.keys() | removed.keys():
            gone = removed.get(collection, set())
            new = added.get(collection, set()) - gone  # ids are never reused: added then removed is just gone
            by_collection[collection] = (_array(new), _array(gone))
        return Changes(rows[-1][0] if rows else seq, by_collection)

    @_following
    def stored_vectors(self, ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(ids, vectors) of those of the chunks that still exist, in the order asked; one removed since its
        addition was logged is left out (its removal is logged after it)."""
        found: dict[int, bytes] = {}
        for first in range(0, len(ids), 500):
            part = [int(i) for i in ids[first : first + 500]]
            marks = ",".join("?" * len(part))
            found.update(self.follower.execute(f"SELECT id, vector FROM chunks WHERE id IN ({marks})", part))
        kept = np.fromiter((i for i in ids if int(i) in found), dtype=np.int64)
        if not len(kept):
            return kept, np.zeros((0, 0), dtype=np.float32)
        return kept, np.stack([np.frombuffer(found[int(i)], dtype=np.float32) for i in kept])

    @_locked
    def prune_changes(self, keep: int | None = None) -> None:
        """Drops all but the newest `keep` log rows (CHANGES_KEPT), recording how far the log was cut (meta
        changes_floor): a process that had not read that far compares whole collections instead."""
        keep = CHANGES_KEPT if keep is None else keep
        if not self._prunable(keep):  # most syncs: no write transaction at all
            return
        self.db.execute("BEGIN IMMEDIATE")
        try:
            if floor := self._prunable(keep):  # again, inside the transaction: another process may have pruned
                self.db.execute("DELETE FROM changes WHERE seq <= ?", (floor,))
                self.db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('changes_floor', ?)", (str(floor),))
            self.db.execute("COMMIT")
        except BaseException:
            self.db.execute("ROLLBACK")
            raise

    def _prunable(self, keep: int) -> int:
        """The newest change that all but `keep` newer ones follow, when the log still holds it; else 0."""
        row = self.db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'changes'").fetchone()
        floor = (row[0] if row else 0) - keep
        if floor > 0 and self.db.execute("SELECT 1 FROM changes WHERE seq <= ? LIMIT 1", (floor,)).fetchone():
            return floor
        return 0

    @_reading
    def vector_width(self) -> int:
        """The width of the stored vectors (0: none stored)."""
        row = self.reader.execute("SELECT length(vector) FROM chunks LIMIT 1").fetchone()
        return row[0] // 4 if row else 0

    @_reading
    def collections(self) -> list[str]:
        return [r[0] for r in self.reader.execute("SELECT DISTINCT collection FROM files ORDER BY collection")]

    @_reading
    def leads(self, collections: list[str]) -> tuple[list[int], np.ndarray]:
        """(ids, vectors) of every document's first passage in these collections: a manual page's NAME line
        ("git-stash - Stash the changes in a dirty working directory away"), a chapter's title, where a document
        says in a line what it is about. Read once per collection and kept until the index changes."""
        generation = self.reader.execute("PRAGMA data_version").fetchone()[0]
        if self._leads_of != generation:
            self._leads, self._leads_of = {}, generation
        for collection in collections:
            if collection not in self._leads:
                rows = self.reader.execute(
                    "SELECT id, vector FROM chunks WHERE collection = ? AND ord = 0", (collection,)).fetchall()
                self._leads[collection] = ([r[0] for r in rows], np.array(
                    [np.frombuffer(r[1], dtype=np.float32) for r in rows], dtype=np.float32).reshape(len(rows), -1))
        parts = [self._leads[c] for c in collections if self._leads[c][0]]
        if not parts:
            return [], np.zeros((0, 0), np.float32)
        return [i for ids, _ in parts for i in ids], np.concatenate([m for _, m in parts])

    @_reading
    def sources(self, ids: list[int]) -> dict[int, str]:
        """The document each chunk belongs to, for ranking documents before passages."""
        out: dict[int, str] = {}
        for first in range(0, len(ids), 500):
            part = ids[first : first + 500]
            marks = ",".join("?" * len(part))
            out.update(self.reader.execute(f"SELECT id, source FROM chunks WHERE id IN ({marks})", part).fetchall())
        return out

    @_reading
    def chunks(self, ids: list[int]) -> dict[int, StoredChunk]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self.reader.execute(
            f"SELECT id, source, collection, locator, text, tokens, vector FROM chunks WHERE id IN ({marks})", ids
        )
        return {
            r[0]: StoredChunk(r[0], r[1], r[2], r[3], r[4], r[5], np.frombuffer(r[6], dtype=np.float32))
            for r in rows
        }

    @_reading
    def lexical(self, query: str, collections: list[str] | None, limit: int, *, every: bool = False) -> list[int]:
        """BM25 over FTS5, best first. Every word of the query is a quoted term, OR-ed with the rest (AND-ed
        with `every`), so punctuation in identifiers (PB-7731, ERR_TIMEOUT) makes a phrase, not FTS5 syntax."""
        terms = sorted({w.lower() for w in _WORD.findall(query)})
        if not terms:
            return []
        if not every:
            terms = self._rarest(terms)
        match = (" AND " if every else " OR ").join('"' + t.replace('"', '""') + '"' for t in terms)
        sql = ("SELECT c.id FROM chunks_fts JOIN chunks c ON c.id = chunks_fts.rowid WHERE chunks_fts MATCH ?")
        params: list = [match]
        if collections is not None:
            sql += f" AND c.collection IN ({','.join('?' * len(collections))})"
            params += collections
        sql += f" ORDER BY bm25(chunks_fts, {', '.join(map(str, BM25_WEIGHTS))}) LIMIT ?"
        return [r[0] for r in self.reader.execute(sql, [*params, limit])]

    def _rarest(self, terms: list[str]) -> list[str]:
        """The rarest terms whose passages add up to LEXICAL_ROWS (at least two terms): BM25 ranks every
        passage holding any query word, and common words cost most while deciding least (low IDF). Document
        frequencies are counted once per term and forgotten when the index changes. Called under the read lock."""
        if len(terms) <= 2:
            return terms
        generation = self.reader.execute("PRAGMA data_version").fetchone()[0]  # changes with every other commit
        if self._frequency_of != generation:
            self._frequency, self._frequency_of = {}, generation
        for term in terms:
            if term not in self._frequency:
                self._frequency[term] = self.reader.execute(
                    "SELECT COUNT(*) FROM chunks_fts WHERE chunks_fts MATCH ?", ['"' + term.replace('"', '""') + '"']
                ).fetchone()[0]
        kept, rows = [], 0
        for term in sorted(terms, key=lambda t: self._frequency[t]):
            if len(kept) >= 2 and rows + self._frequency[term] > LEXICAL_ROWS:
                break
            kept.append(term)
            rows += self._frequency[term]
        return sorted(kept)

    @_reading
    def stats(self) -> list[tuple[str, int, int, int]]:
        """(collection, files, chunks, bytes) for `knowledge list`."""
        return self.reader.execute(
            "SELECT collection, COUNT(*), SUM(chunks), SUM(size) FROM files GROUP BY collection ORDER BY collection"
        ).fetchall()

    @_reading
    def file_rows(self, collections: list[str]) -> list[tuple[str, int, int, str]]:
        """(source, chunks, size, indexed_at) of the files in these (qualified) collections."""
        marks = ",".join("?" * len(collections))
        sql = f"SELECT source, chunks, size, indexed_at FROM files WHERE collection IN ({marks}) ORDER BY source"
        return self.reader.execute(sql, collections).fetchall()
