"""The knowledge folders kept in step with their index, and the questions the engine asks of it.

The folders are the source of truth: knowledge/<collection>/... for global knowledge and each workspace's
own (see folders.py). `sync` compares them with a manifest of content hashes: an unchanged file costs one
stat, a changed one is re-chunked and only chunks whose text is new are embedded, a removed one leaves the
index. Every question and admin action names a workspace (None: global knowledge only), and sees or touches
nothing that workspace cannot see. All blocking work runs in threads, off the event loop.

Several processes may share one data dir, or with DATABASE_URL one PostgreSQL database whose knowledge tables
each process's index replicates (replica.py). Their index-changing jobs take turns (a lock file beside the
index; an advisory lock in PostgreSQL), so that a document is embedded once, by whichever process got to it
first; every process's FAISS indexes follow the store's change log, before each search and every
FOLLOW_SECONDS, from the stored vectors.
"""
from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from bot.conversation import Workspace
from bot.retrieval import chunk as chunking
from bot.retrieval import folders
from bot.retrieval import search as ranking
from bot.retrieval.chunk import Chunk, Chunker
from bot.retrieval.embed import Embedder
from bot.retrieval.folders import Scope, plain, visible
from bot.retrieval.parse import MAX_FILE_BYTES, UnsupportedDocument, parse
from bot.retrieval.search import Grounding, Hit
from bot.retrieval.store import FileEntry, FileRow, Store
from bot.retrieval.uploads import (DEFAULT_MAX_BYTES, UploadRefused, check, check_same_name, check_size,
                                   safe_collection, safe_filename)
from bot.retrieval.vectors import Indexes

try:
    import fcntl
except ImportError:  # Windows: one process per data dir
    fcntl = None

T = TypeVar("T")
_BM25 = ThreadPoolExecutor(4, thread_name_prefix="bm25")  # the lexical half of concurrent searches

log = logging.getLogger(__name__)

CHUNK_TOKENS = 200
OVERLAP_TOKENS = 32
GROUNDING_BUDGET = 1200  # tokens of passages in the system message
GROUNDING_CANDIDATES = 8
# "documents": rank documents, then their passages (search.fuse_by_document); "passages": RRF over passages
FUSION = "documents"
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


class Retriever:
    def __init__(self, knowledge_dir: Path, workspaces_dir: Path, index_dir: Path, embedder: Embedder, *,
                 max_upload_bytes: int | None = DEFAULT_MAX_BYTES, min_similarity: float = ranking.MIN_SIMILARITY,
                 budget_tokens: int = GROUNDING_BUDGET, progress: bool = False, database_url: str | None = None):
        self.knowledge_dir = knowledge_dir
        self.workspaces_dir = workspaces_dir  # <workspaces_dir>/<platform>/<id>/knowledge/<collection>/...
        self.index_dir = index_dir
        self.embedder = embedder
        self.max_upload_bytes = max_upload_bytes
        self.min_similarity = min_similarity
        self.budget_tokens = budget_tokens
        self.progress = progress
        self.fusion = FUSION
        self.reranker: ranking.Reranker | None = None  # a cross-encoder over the fused top passages, when installed
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

    @classmethod
    async def open(cls, settings, *, embedder: Embedder | None = None, progress: bool = False,
                   follow: bool = True) -> "Retriever":
        """Async: opens the store and loads (or repairs) the FAISS indexes in a thread, then follows other
        processes' changes (`follow`). The model loads later, on the first query or ingest, so a bot whose
        knowledge is unchanged starts without it."""
        self = await asyncio.to_thread(
            cls, Path(settings.knowledge_dir), Path(settings.data_dir) / "workspaces",
            Path(settings.data_dir) / "knowledge",
            embedder or Embedder.shared(settings.embed_model),
            max_upload_bytes=int(settings.knowledge_max_upload_mb * 1024 * 1024), progress=progress,
            database_url=settings.database_url,
        )
        await asyncio.to_thread(self.store.pull)
        await asyncio.to_thread(self.indexes.load)
        if getattr(settings, "rerank_model", None):
            self.reranker = ranking.Reranker(settings.rerank_model)
        if follow:
            self.follow()
        return self

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

    async def close(self) -> None:
        async with self._sync_lock:
            self._stop_following.set()
            self._wake.set()
            if self._follower is not None:
                await asyncio.to_thread(self._follower.join)
            self.store.close()
            self._lock_file.close()

    def _scope(self, workspace: Workspace | None) -> Scope:
        if workspace is None:
            return Scope(None, self.knowledge_dir)
        return Scope(workspace, folders.workspace_root(self.workspaces_dir, workspace))

    def _visible(self, names: list[str], collections: list[str] | None, workspace: Workspace | None) -> list[str]:
        """The qualified collections among `names` that the workspace sees and `collections` (plain names,
        None for all) asks for: a name it holds itself and globally means both."""
        return [c for c in names if visible(c, workspace) and (collections is None or plain(c) in collections)]

    def collections(self, workspace: Workspace | None = None) -> list[str]:
        """Collections the workspace sees with indexed documents, plus its folders not yet synced."""
        names = {plain(c) for c in self._visible(self.store.collections(), None, workspace)}
        roots = [self.knowledge_dir] if workspace is None else [self.knowledge_dir, self._scope(workspace).root]
        for root in filter(Path.is_dir, roots):
            names.update(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
        return sorted(names)

    # -- querying ------------------------------------------------------------------------------------

    async def search(self, query: str, collections: list[str] | None = None, k: int = 5, mode: str = "hybrid",
                     *, workspace: Workspace | None = None) -> list[Hit]:
        """Best passages first, from what the workspace sees (`collections` None: all of it). `mode` "dense" or
        "lexical" ranks by one side alone (for comparison)."""
        return await asyncio.to_thread(self._search, query, collections, k, mode, workspace)

    async def ground(self, query: str, collections: list[str], budget_tokens: int | None = None, *,
                     workspace: Workspace | None = None) -> Grounding | None:
        """Passages for the system message, or an instruction to admit having no source; None without collections."""
        if not collections:
            return None
        budget = budget_tokens or self.budget_tokens
        return await asyncio.to_thread(self._ground, query, collections, budget, workspace)

    def _ground(self, query: str, collections: list[str], budget_tokens: int, workspace: Workspace | None) -> Grounding:
        hits = self._search(query, collections, GROUNDING_CANDIDATES, "hybrid", workspace)
        kept = [hit for hit in hits if ranking.relevant(hit, self.min_similarity)]
        return ranking.build(kept, collections, budget_tokens, lambda texts: self._chunker_for().count(texts))

    def _search(self, query: str, collections: list[str] | None, k: int, mode: str,
                workspace: Workspace | None) -> list[Hit]:
        try:
            # microseconds when nothing changed (bench/replicas.py); a large batch is left to the follower thread
            if not self._indexing.is_set():
                self.indexes.catch_up(SEARCH_WAIT_SECONDS, most=SEARCH_CATCH_UP if self._follower else None)
        except Exception:  # searching what this process already holds beats failing the question
            log.exception("cannot catch up with the knowledge index")
        wanted = self._visible(self.indexes.names(), collections, workspace)
        if not wanted or not query.strip():
            return []
        # documents are ranked from deeper lists than the k passages asked for (measured: 160 beats 40)
        pool = max(10 * k, 160) if mode == "hybrid" and self.fusion == "documents" else max(4 * k, 40)
        # BM25 runs in SQLite while the model encodes the query (both release the GIL): the query waits for the
        # slower of the two, not their sum (bench/retrieval.py --sizes 100000)
        bm25 = _BM25.submit(self.store.lexical, query, wanted, pool) if mode != "dense" else None
        vector = self.embedder.encode([query])[0]
        dense: list[tuple[int, float]] = []
        if mode != "lexical":
            dense = self.indexes.search(wanted, vector, pool)
        lexical = bm25.result() if bm25 is not None else []
        codes = ranking.identifiers(query)
        # Identifiers (error codes, names in code) are what embeddings blur: passages holding all of them
        # verbatim form a third ranking, so one exact match outweighs many loose ones.
        exact = self.store.lexical(" ".join(codes), wanted, pool, every=True) if codes and mode == "hybrid" else []
        rankings = [[i for i, _ in dense], lexical, exact]
        if mode == "hybrid" and self.fusion == "documents":
            sources = self.store.sources(list({i for r in rankings for i in r}))
            fused = ranking.fuse_by_document(rankings, sources, list(ranking.WEIGHTS))
            if self.reranker is not None:
                text_of = lambda ids: {i: row.text for i, row in self.store.chunks(ids).items()}  # noqa: E731
                fused = self.reranker.rerank(query, fused, sources, text_of)
            fused = fused[:k]
        else:
            fused = ranking.fuse(rankings)[:k]
        rows = self.store.chunks([i for i, _ in fused])
        similarity = dict(dense)
        codes = [code.lower() for code in codes]
        hits = []
        for chunk_id, score in fused:
            row = rows.get(chunk_id)
            if row is None:  # removed between the two lookups
                continue
            cosine = similarity.get(chunk_id, float(np.dot(vector, row.vector)))
            lowered = row.text.lower()
            collection = plain(row.collection)
            hits.append(Hit(plain(row.source), row.locator, row.text, score, cosine, collection, row.tokens,
                            any(code in lowered for code in codes), own=collection != row.collection))
        return hits

    # -- keeping the index in step with the folder ---------------------------------------------------

    async def sync(self) -> SyncReport:
        return await self._exclusive(self._sync)

    async def _exclusive(self, fn: Callable[..., T], *args: Any) -> T:
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

    def _sync(self) -> SyncReport:
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
                parsed.append((entry, self._chunker_for().split(parse(plain(entry.source), data)), existed))
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

    def _chunker_for(self) -> Chunker:
        if self._chunker is None:
            self._chunker = Chunker(self.embedder.tokenizer, self.embedder.max_tokens, CHUNK_TOKENS, OVERLAP_TOKENS)
        return self._chunker

    # -- admin actions -------------------------------------------------------------------------------

    def check_upload_size(self, filename: str, size: int) -> None:
        """Raises UploadRefused for a file over the upload limit, so it is refused before anyone downloads it."""
        check_size(safe_filename(filename), size, self.max_upload_bytes)

    async def add_upload(self, filename: str, data: bytes, collection: str, *, workspace: Workspace | None = None,
                         limit: bool = True) -> str:
        """Saves and indexes one upload in the workspace's own collection (None: the global one); returns what
        happened, for the uploader. Raises UploadRefused.

        Checking parses the whole file (a PDF can take seconds), so it runs in a thread like the rest."""
        collection = safe_collection(collection)
        scope = self._scope(workspace)
        name = await asyncio.to_thread(check, filename, data, self.max_upload_bytes if limit else None)
        return await self._exclusive(self._add_upload, filename, name, data, collection, scope)

    def _visible_files(self, workspace: Workspace | None) -> list[FileEntry]:
        return [f for f in self.store.files().values() if visible(f.source, workspace)]

    def _given_name(self, scope: Scope, source: str) -> str:
        """What the document at `source` was called when added; a file put in the folder by hand, its own name."""
        return self.store.given_name(scope.qualify(source)) or source.rsplit("/", 1)[-1]

    def _add_upload(self, given: str, name: str, data: bytes, collection: str, scope: Scope) -> str:
        digest = hashlib.sha256(data).hexdigest()
        source = f"{collection}/{name}"
        self._sync()
        same = [plain(f.source) for f in self._visible_files(scope.workspace) if f.sha256 == digest]
        if same:
            raise UploadRefused(f"That file is already in the knowledge base as {same[0]}. Nothing was saved.")
        target = scope.inside(source)
        if target.exists():
            check_same_name(given, source, self._given_name(scope, source))
        kept = folders.trash(scope.root, source) if target.exists() else None
        folders.write_atomically(target, data)
        self.store.set_given_name(scope.qualify(source), given)
        try:
            report = self._sync()
        except BaseException:
            _undo(scope, source, kept)
            raise
        entry = self.store.files().get(scope.qualify(source))
        if entry is None:
            reason = dict(report.skipped).get(scope.qualify(source), "it could not be indexed")
            _undo(scope, source, kept)
            self._sync()
            raise UploadRefused(f"{name} was not indexed: {reason}. Nothing was saved.")
        indexed = f"{entry.chunks} chunk{'s' * (entry.chunks != 1)} indexed ({report.embedded} newly embedded)."
        if kept:
            return f"Replaced {name} in collection '{collection}'; the previous version is kept as {kept}. {indexed}"
        return f"Added {name} in collection '{collection}': {indexed}"

    async def add_files(self, paths: list[Path], collection: str, *,
                        workspace: Workspace | None = None) -> tuple[list[str], SyncReport]:
        """`knowledge add`: copies files (folders recursively) into the workspace's own collection (None: the
        global one), then syncs once."""
        collection = safe_collection(collection)
        return await self._exclusive(self._add_files, paths, collection, self._scope(workspace))

    def _add_files(self, paths: list[Path], collection: str, scope: Scope) -> tuple[list[str], SyncReport]:
        notes: list[str] = []
        hashes = {f.sha256: plain(f.source) for f in self._visible_files(scope.workspace)}
        for path in folders.expand(paths):
            try:
                check_size(path.name, path.stat().st_size, MAX_FILE_BYTES)
                data = path.read_bytes()
                name = check(path.name, data, None)
                digest = hashlib.sha256(data).hexdigest()
                if digest in hashes:
                    notes.append(f"skipped {path}: already in the knowledge base as {hashes[digest]}")
                    continue
                source = f"{collection}/{name}"
                target = scope.inside(source)
                if path.resolve() != target and target.exists():
                    check_same_name(path.name, source, self._given_name(scope, source))
            except (UploadRefused, OSError) as exc:
                notes.append(f"refused {path}: {exc}")
                continue
            if path.resolve() != target:
                if target.exists():
                    notes.append(f"replaced {source}; the previous version is kept as "
                                 f"{folders.trash(scope.root, source)}")
                folders.write_atomically(target, data)
                self.store.set_given_name(scope.qualify(source), path.name)
            hashes[digest] = source
        return notes, self._sync()

    async def remove(self, source: str, *, workspace: Workspace | None = None) -> bool:
        """Moves one of the workspace's own documents (None: a global one), named `collection/file.md`, to the
        trash and out of the index; False when it has no such document."""
        return await self._exclusive(self._remove, source, self._scope(workspace))

    def _remove(self, source: str, scope: Scope) -> bool:
        path = scope.inside(source)
        if not (scope.qualify(source) in self.store.files() or path.is_file()):
            return False
        if path.is_file():
            folders.trash(scope.root, path.relative_to(scope.root.resolve()).as_posix())
        self._sync()
        return True

    def files(self, collection: str | None = None, *, workspace: Workspace | None = None) -> list[FileRow]:
        """Documents the workspace sees, by source as it sees them; `own` tells its uploads from global ones."""
        wanted = self._visible(self.store.collections(), None if collection is None else [collection], workspace)
        rows = [FileRow(plain(source), *rest, plain(source) != source)
                for source, *rest in self.store.file_rows(wanted)]
        return sorted(rows, key=lambda row: (row.source, row.own))

    def stats(self, workspace: Workspace | None = None) -> list[tuple[str, int, int, int]]:
        """(collection, files, chunks, bytes) per collection the workspace sees, its own and global counted together."""
        totals: dict[str, list[int]] = {}
        for collection, *counts in self.store.stats():
            if visible(collection, workspace):
                total = totals.setdefault(plain(collection), [0, 0, 0])
                total[:] = [a + b for a, b in zip(total, counts)]
        return [(name, *total) for name, total in sorted(totals.items())]


def _holds_anything(root: Path) -> bool:
    """False for a knowledge folder that is missing or empty (hidden entries aside), as an unmounted volume or
    a process started in another directory sees it: its documents are then not taken for removed, since every
    process sharing the index would lose them."""
    try:
        return any(not entry.name.startswith(".") for entry in root.iterdir())
    except OSError:
        return False


def _undo(scope: Scope, source: str, kept: str | None) -> None:
    """Puts the folder back as it was before a failed upload: the new file gone, the one it replaced restored,
    and a collection folder left empty removed, so that no collection appears with nothing in it."""
    target = scope.root / source
    if kept:
        (scope.root / kept).replace(target)
    else:
        target.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: the collection has other documents
            target.parent.rmdir()
