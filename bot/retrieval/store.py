"""The knowledge index's source of truth: one SQLite file holding the manifest, the chunks and their vectors,
with an FTS5 table over the chunks for BM25.

The FAISS indexes are derived from the vectors stored here, so a damaged or missing FAISS file is rebuilt
without embedding anything again. `sqlite3 data/knowledge/index.sqlite3` shows plain tables. Sources and
collections are stored qualified (folders.py): a workspace's carry its "@platform:id/" prefix, global ones none.

Searches and listings read through a connection of their own: with WAL they see the last committed state
while a sync writes a large document, instead of waiting for its transaction to end.
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
CREATE TABLE IF NOT EXISTS given_names (    -- what an uploader called a file saved under its safe name
    source TEXT PRIMARY KEY,
    given TEXT NOT NULL
);
"""
LEXICAL_ROWS = 4000  # passages BM25 may rank per query; see Store._rarest
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


class Store:
    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self.db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.db.execute("PRAGMA journal_mode=WAL")
        self.db.execute("PRAGMA foreign_keys=ON")
        self.db.executescript(SCHEMA)
        self.lock = threading.RLock()
        self.reader = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self.read_lock = threading.Lock()
        self._frequency: dict[str, int] = {}  # term: passages holding it, for `_rarest`
        self._frequency_of: int | None = None  # the reader's data_version those counts were taken at

    def close(self) -> None:
        with self.lock, self.read_lock:
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
        self.db.execute("BEGIN")
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
        self.db.execute("BEGIN")
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

    @_reading
    def collections(self) -> list[str]:
        return [r[0] for r in self.reader.execute("SELECT DISTINCT collection FROM files ORDER BY collection")]

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
        sql += " ORDER BY bm25(chunks_fts, 0.5, 1.0) LIMIT ?"
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
