"""The knowledge folders kept in step with their index, one index-changing job at a time across processes.

The folders are the source of truth: knowledge/<collection>/... for global knowledge and each workspace's
own (see folders.py). `sync` compares them with a manifest of content hashes: an unchanged file costs one
stat, a changed one is re-chunked and only chunks whose text is new are embedded, a removed one leaves the
index. All blocking work runs in threads, off the event loop.

Several processes may share one data dir, or with DATABASE_URL one PostgreSQL database whose knowledge tables
each process's index replicates (replica.py). Their index-changing jobs take turns (a lock file beside the
index; an advisory lock in PostgreSQL), so that a document is embedded once, by whichever process got to it
first; every process's FAISS indexes follow the store's change log, before each search and every
FOLLOW_SECONDS, from the stored vectors. Searching lives in retriever.py, admin actions in documents.py: both
change the index only through `Indexer.exclusive`.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from bot.retrieval import chunk as chunking
from bot.retrieval import folders
from bot.retrieval.chunk import Chunk, Chunker
from bot.retrieval.embed import Embedder
from bot.retrieval.folders import plain
from bot.retrieval.parse import MAX_FILE_BYTES, UnsupportedDocument, parse
from bot.retrieval.store import FileEntry, Store
from bot.retrieval.vectors import Indexes

try:
    import fcntl
except ImportError:  # Windows: one process per data dir
    fcntl = None

T = TypeVar("T")

log = logging.getLogger(__name__)

CHUNK_TOKENS = 200
OVERLAP_TOKENS = 32
CHUNKS_PER_COMMIT = 2048  # an interrupted ingest keeps what it finished; big enough to batch well
FOLLOW_SECONDS = 0.25  # how often an idle process catches up with other processes' changes (4 µs when none)
SEARCH_CATCH_UP = 256  # changes a search applies itself before it runs; more are the follower thread's
SEARCH_WAIT_SECONDS = 0.1  # how long a search waits for another thread applying changes (a build takes longer)


@dataclass
class SyncReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)
    unchanged: int = 0
    chunks: int = 0  # chunks written
    embedded: int = 0  # of which were new text and had to be embedded

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)

    def summary(self) -> str:
        parts = [f"{len(self.added)} added", f"{len(self.updated)} updated", f"{len(self.removed)} removed",
                 f"{self.unchanged} unchanged"]
        text = ", ".join(parts) + f"; {self.chunks} chunks written, {self.embedded} embedded"
        return text + "".join(f"\nskipped {path}: {reason}" for path, reason in self.skipped)


class Indexer:
    """One data dir's index (the store and the FAISS indexes that follow it) and the folders it mirrors."""

    def __init__(self, knowledge_dir: Path, workspaces_dir: Path, index_dir: Path, embedder: Embedder, *,
                 progress: bool = False, database_url: str | None = None):
        self.knowledge_dir = knowledge_dir
        self.workspaces_dir = workspaces_dir  # <workspaces_dir>/<platform>/<id>/knowledge/<collection>/...
        self.embedder = embedder
        self.progress = progress
        self._stop_following = threading.Event()
        self._wake = threading.Event()  # set by the primary's NOTIFY: another process changed the index
        self._follower: threading.Thread | None = None
        # set while this process runs an index-changing job: it holds the turn, so every change meanwhile is its
        # own, and its reconcile applies them; following them one by one as well would copy big indexes for nothing
        self._indexing = threading.Event()
        if database_url:  # PostgreSQL is the source of truth; index.sqlite3 its replica (replica.py)
            from bot.retrieval.replica import ReplicatedStore

            self.store: Store = ReplicatedStore(index_dir / "index.sqlite3", database_url, self._wake.set)
        else:
            self.store = Store(index_dir / "index.sqlite3")
            # a former replica is standalone from now on; should it be one again, it starts over from PostgreSQL
            if self.store.get_meta("replica_of"):
                self.store.set_meta("replica_of", "")
        self._chunker: Chunker | None = None
        self.indexes = Indexes(index_dir / "faiss", self.store, lambda: self.embedder.dim)
        self._sync_lock = asyncio.Lock()
        # source: (size, mtime_ns, reason) of files that could not be indexed, so that a file left in the folder
        # is not parsed again, up to its limits, by every later sync until it changes
        self._refused: dict[str, tuple[int, int, str]] = {}
        self._config = f"{embedder.name}|{CHUNK_TOKENS}|{OVERLAP_TOKENS}|{chunking.VERSION}"
        self._lock_file = open(index_dir / "sync.lock", "a+b")  # locked by the process changing the index

    def follow(self, every: float = FOLLOW_SECONDS) -> None:
        """Catches up with the index from a thread until `close()`: every `every` seconds, and at once when
        PostgreSQL says it changed. What other processes add or remove is then searchable here before the next
        search looks (with PostgreSQL, searches look at the local replica only)."""
        def run() -> None:
            while True:
                self._wake.wait(every)
                self._wake.clear()
                if self._stop_following.is_set():
                    return
                if self._indexing.is_set():
                    continue
                try:
                    self.store.pull()
                    self.indexes.catch_up()
                except Exception:  # the next round retries; a search meanwhile uses the indexes as they are
                    log.exception("cannot catch up with the knowledge index")

        self._follower = threading.Thread(target=run, name="knowledge-follower", daemon=True)
        self._follower.start()

    def catch_up_for_search(self) -> None:
        """Applies what other processes changed before a search reads the indexes: microseconds when nothing
        changed (bench/replicas.py); a large batch is left to the follower thread. Never while this process
        runs a job of its own, whose reconciles apply its changes."""
        try:
            if not self._indexing.is_set():
                self.indexes.catch_up(SEARCH_WAIT_SECONDS, most=SEARCH_CATCH_UP if self._follower else None)
        except Exception:  # searching what this process already holds beats failing the question
            log.exception("cannot catch up with the knowledge index")

    async def close(self) -> None:
        async with self._sync_lock:
            self._stop_following.set()
            self._wake.set()
            if self._follower is not None:
                await asyncio.to_thread(self._follower.join)
            self.store.close()
            self._lock_file.close()

    async def exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an index-changing job in a thread, one at a time. A thread cannot be stopped, so a cancelled
        caller still holds the lock until the job ends: `close()` then never pulls the store from under it."""
        async with self._sync_lock:
            job = asyncio.ensure_future(asyncio.to_thread(self._in_turn, fn, *args))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                await asyncio.wait([job])
                raise

    def _in_turn(self, fn: Callable[..., T], *args: Any) -> T:
        """Runs fn once no other process (or other Retriever on this index) is changing the index, and after
        pulling what they changed: the second of two processes syncing the same new file then finds it indexed
        instead of embedding it again. The lock file serves one machine; PostgreSQL's advisory lock, all."""
        with contextlib.ExitStack() as turn:
            if fcntl is not None:
                fcntl.flock(self._lock_file.fileno(), fcntl.LOCK_EX)
                turn.callback(fcntl.flock, self._lock_file.fileno(), fcntl.LOCK_UN)
            primary = getattr(self.store, "primary", None)
            if primary is not None:
                primary.take_turn()
                turn.callback(primary.end_turn)
            self.store.pull()
            self._indexing.set()
            turn.callback(self._indexing.clear)
            result = fn(*args)
            self.indexes.catch_up()  # what the job's reconciles left: collections it did not touch
            return result

    async def sync(self) -> SyncReport:
        return await self.exclusive(self.sync_in_turn)

    async def watch(self, stop_event: asyncio.Event) -> None:
        """Syncs now, then after every change under the knowledge folder or a workspace's until stop_event is set."""
        from watchfiles import awatch

        roots = []
        for root in (self.knowledge_dir, self.workspaces_dir):
            root.mkdir(parents=True, exist_ok=True)  # watching needs both to exist; no workspace may have any yet
            roots.append(root.resolve())
        await self._logged_sync()
        relevant = lambda _change, path: folders.watched(*roots, path)  # noqa: E731
        async for _ in awatch(*roots, stop_event=stop_event, watch_filter=relevant, debounce=1000):
            await self._logged_sync()

    async def _logged_sync(self) -> None:
        try:
            report = await self.sync()
        except Exception:  # the watcher outlives one bad sync; the next change retries
            log.exception("knowledge sync failed")
            return
        if report.changed or report.skipped:
            log.info("knowledge sync: %s", report.summary())

    def sync_in_turn(self) -> SyncReport:
        """The sync itself, for a job already holding the turn (`exclusive`): an upload syncs before and after
        writing its file within one turn."""
        report = SyncReport()
        fresh = self.store.get_meta("config") == self._config
        touched: set[str] = set()
        if not fresh and self.store.get_meta("model") not in (None, self.embedder.name):
            log.warning("embedding model changed to %s: re-embedding all knowledge", self.embedder.name)
            touched.update(self.store.collections())
            for source in self.store.files():
                self.store.remove(source)
            # The new model's vectors may have another width: indexes of the old one cannot take them.
            self.indexes.clear()
            self.store.set_meta("dim", str(self.embedder.dim))
        manifest = self.store.files()

        def refuse(source: str, size: int, mtime_ns: int, reason: str) -> None:
            self._refused[source] = (size, mtime_ns, reason)
            report.skipped.append((source, reason))

        on_disk: dict[str, tuple[str, Path]] = {}
        for scope in folders.scopes(self.knowledge_dir, self.workspaces_dir):
            on_disk.update(folders.scan(scope, report.skipped))
        work: list[tuple[FileEntry, bytes, bool]] = []
        for source, (collection, path) in on_disk.items():
            try:
                stat = path.stat()
                known = manifest.get(source)
                if fresh and known and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
                    report.unchanged += 1
                    continue
                refused = self._refused.get(source)
                if refused and refused[:2] == (stat.st_size, stat.st_mtime_ns):
                    report.skipped.append((source, refused[2]))
                    continue
                if stat.st_size > MAX_FILE_BYTES:
                    refuse(source, stat.st_size, stat.st_mtime_ns, f"{stat.st_size / 2**20:.0f} MB; a document may "
                                                                   f"have at most {MAX_FILE_BYTES // 2**20} MB")
                    continue
                data = path.read_bytes()
            except OSError as exc:  # vanished or unreadable mid-scan
                report.skipped.append((source, str(exc)))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if fresh and known and known.sha256 == digest and known.collection == collection:
                self.store.touch(source, stat.st_size, stat.st_mtime_ns)
                report.unchanged += 1
                continue
            entry = FileEntry(source, collection, digest, stat.st_size, stat.st_mtime_ns, 0)
            work.append((entry, data, known is not None))
        missing = [root for root in (self.knowledge_dir, self.workspaces_dir) if not _holds_anything(root)]
        kept = 0
        for source in manifest.keys() - on_disk.keys():
            if (self.workspaces_dir if folders.owner(source) else self.knowledge_dir) in missing:
                kept += 1
                continue
            self.store.remove(source)
            report.removed.append(source)
            touched.add(manifest[source].collection)
        if kept:
            log.warning("kept %d document(s) in the knowledge index that are not on disk here, since this "
                        "process finds nothing in %s (not the folders the others sharing the index use?); "
                        "`knowledge remove` removes a document", kept, " or ".join(map(str, missing)))
        parsed: list[tuple[FileEntry, list[Chunk], bool]] = []
        for entry, data, existed in work:
            try:
                parsed.append((entry, self.chunker().split(parse(plain(entry.source), data)), existed))
            except UnsupportedDocument as exc:
                refuse(entry.source, entry.size, entry.mtime_ns, str(exc))
            except Exception as exc:  # a chunking bug on a hostile file costs that file, never the sync
                log.exception("cannot chunk %s", entry.source)
                refuse(entry.source, entry.size, entry.mtime_ns, f"cannot be chunked ({type(exc).__name__}: {exc})")
        total = sum(len(chunks) for _, chunks, _ in parsed)
        with tqdm(total=total, unit="chunk", desc="indexing", disable=not (self.progress and total > 1)) as bar:
            group: list[tuple[FileEntry, list[Chunk], bool]] = []
            for item in parsed:
                group.append(item)
                if sum(len(chunks) for _, chunks, _ in group) >= CHUNKS_PER_COMMIT or item is parsed[-1]:
                    touched.update(self._ingest(group, report, bar))
                    group = []
        failed = {source for source, _ in report.skipped if source in on_disk}
        for source in failed & manifest.keys():  # it no longer indexes: its old chunks would be stale
            self.store.remove(source)
            report.removed.append(source)
            touched.add(manifest[source].collection)
        self._refused = {source: refusal for source, refusal in self._refused.items() if source in failed}
        self.store.forget_given_names(set(on_disk))
        for collection in touched:
            self.indexes.reconcile(collection)
        self.store.set_meta("config", self._config)
        self.store.set_meta("model", self.embedder.name)
        self.store.prune_changes()
        return report

    def _ingest(self, parsed: list[tuple[FileEntry, list[Chunk], bool]], report: SyncReport, bar: tqdm) -> set[str]:
        """Embeds only text never seen before (sorted by length inside Embedder.encode), then writes each file."""
        hashes = list(dict.fromkeys(c.hash for _, chunks, _ in parsed for c in chunks))
        known = self.store.vectors_for(hashes)
        new = [h for h in hashes if h not in known]
        text_of = {c.hash: c.embed_text for _, chunks, _ in parsed for c in chunks}
        bar.update(sum(len(chunks) for _, chunks, _ in parsed) - len(new))
        known.update(zip(new, self.embedder.encode([text_of[h] for h in new], progress=bar.update)))
        for entry, chunks, existed in parsed:
            matrix = np.stack([known[c.hash] for c in chunks]) if chunks else np.zeros((0, 0), np.float32)
            self.store.replace(entry, chunks, matrix)
            (report.updated if existed else report.added).append(entry.source)
            report.chunks += len(chunks)
        report.embedded += len(new)
        return {entry.collection for entry, _, _ in parsed}

    def chunker(self) -> Chunker:
        """Built on first use: the embedding model's tokenizer loads with the model, which a bot whose
        knowledge is unchanged never needs at start."""
        if self._chunker is None:
            self._chunker = Chunker(self.embedder.tokenizer, self.embedder.max_tokens, CHUNK_TOKENS, OVERLAP_TOKENS)
        return self._chunker


def _holds_anything(root: Path) -> bool:
    """False for a knowledge folder that is missing or empty (hidden entries aside), as an unmounted volume or
    a process started in another directory sees it: its documents are then not taken for removed, since every
    process sharing the index would lose them."""
    try:
        return any(not entry.name.startswith(".") for entry in root.iterdir())
    except OSError:
        return False
