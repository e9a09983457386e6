"""The knowledge folder kept in step with its index, and the questions the engine asks of it.

knowledge/<collection>/... is the source of truth. `sync` compares it with a manifest of content hashes:
an unchanged file costs one stat, a changed one is re-chunked and only chunks whose text is new are
embedded, a removed one leaves the index. All blocking work runs in threads, off the event loop.
"""
from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
from tqdm import tqdm

from bot.retrieval import chunk as chunking
from bot.retrieval import search as ranking
from bot.retrieval.chunk import Chunk, Chunker
from bot.retrieval.embed import Embedder
from bot.retrieval.parse import FORMATS, UnsupportedDocument, parse
from bot.retrieval.search import Grounding, Hit
from bot.retrieval.store import FileEntry, Store
from bot.retrieval.uploads import DEFAULT_MAX_BYTES, UploadRefused, check, check_size, safe_collection, safe_filename
from bot.retrieval.vectors import VectorIndex

T = TypeVar("T")

log = logging.getLogger(__name__)

CHUNK_TOKENS = 200
OVERLAP_TOKENS = 32
GROUNDING_BUDGET = 1200  # tokens of passages in the system message
GROUNDING_CANDIDATES = 8
CHUNKS_PER_COMMIT = 2048  # an interrupted ingest keeps what it finished; big enough to batch well


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
    def __init__(self, knowledge_dir: Path, index_dir: Path, embedder: Embedder, *,
                 max_upload_bytes: int | None = DEFAULT_MAX_BYTES, min_similarity: float = ranking.MIN_SIMILARITY,
                 budget_tokens: int = GROUNDING_BUDGET, progress: bool = False):
        self.knowledge_dir = knowledge_dir
        self.index_dir = index_dir
        self.embedder = embedder
        self.max_upload_bytes = max_upload_bytes
        self.min_similarity = min_similarity
        self.budget_tokens = budget_tokens
        self.progress = progress
        self.store = Store(index_dir / "index.sqlite3")
        self._chunker: Chunker | None = None
        self._indexes: dict[str, VectorIndex] = {}
        self._index_lock = threading.Lock()  # FAISS indexes are not safe to search while they change
        self._sync_lock = asyncio.Lock()
        self._config = f"{embedder.name}|{CHUNK_TOKENS}|{OVERLAP_TOKENS}|{chunking.VERSION}"

    @classmethod
    async def open(cls, settings, *, embedder: Embedder | None = None, progress: bool = False) -> "Retriever":
        """Async: opens the store and loads (or repairs) the FAISS indexes in a thread. The model loads later,
        on the first query or ingest, so a bot whose knowledge is unchanged starts without it."""
        self = await asyncio.to_thread(
            cls, Path(settings.knowledge_dir), Path(settings.data_dir) / "knowledge",
            embedder or Embedder.shared(settings.embed_model),
            max_upload_bytes=int(settings.knowledge_max_upload_mb * 1024 * 1024), progress=progress,
        )
        await asyncio.to_thread(self._load_indexes)
        return self

    async def close(self) -> None:
        async with self._sync_lock:
            self.store.close()

    def collections(self) -> list[str]:
        """Collections with indexed documents, plus folders not yet synced."""
        names = set(self.store.collections())
        if self.knowledge_dir.is_dir():
            names.update(p.name for p in self.knowledge_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
        return sorted(names)

    # -- querying ------------------------------------------------------------------------------------

    async def search(self, query: str, collections: list[str] | None = None, k: int = 5,
                     mode: str = "hybrid") -> list[Hit]:
        """Best passages first. `mode` "dense" or "lexical" ranks by one side alone (for comparison)."""
        return await asyncio.to_thread(self._search, query, collections, k, mode)

    async def ground(self, query: str, collections: list[str], budget_tokens: int | None = None) -> Grounding | None:
        """Passages for the system message, or an instruction to admit having no source; None without collections."""
        if not collections:
            return None
        return await asyncio.to_thread(self._ground, query, collections, budget_tokens or self.budget_tokens)

    def _ground(self, query: str, collections: list[str], budget_tokens: int) -> Grounding:
        hits = self._search(query, collections, GROUNDING_CANDIDATES)
        kept = [hit for hit in hits if ranking.relevant(hit, self.min_similarity)]
        return ranking.build(kept, collections, budget_tokens, lambda texts: self._chunker_for().count(texts))

    def _search(self, query: str, collections: list[str] | None, k: int, mode: str = "hybrid") -> list[Hit]:
        with self._index_lock:  # a sync thread may be adding or dropping collections
            wanted = [c for c in (list(self._indexes) if collections is None else collections) if c in self._indexes]
        if not wanted or not query.strip():
            return []
        pool = max(4 * k, 40)
        vector = self.embedder.encode([query])[0]
        dense: list[tuple[int, float]] = []
        if mode != "lexical":
            with self._index_lock:
                for index in filter(None, map(self._indexes.get, wanted)):
                    dense.extend(index.search(vector, pool))
            dense.sort(key=lambda pair: -pair[1])
            dense = dense[:pool]
        lexical = self.store.lexical(query, wanted, pool) if mode != "dense" else []
        codes = ranking.identifiers(query)
        # Identifiers (error codes, names in code) are what embeddings blur: passages holding all of them
        # verbatim form a third ranking, so one exact match outweighs many loose ones.
        exact = self.store.lexical(" ".join(codes), wanted, pool, every=True) if codes and mode == "hybrid" else []
        fused = ranking.fuse([[i for i, _ in dense], lexical, exact])[:k]
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
            hits.append(Hit(row.source, row.locator, row.text, score, cosine, row.collection, row.tokens,
                            any(code in lowered for code in codes)))
        return hits

    # -- keeping the index in step with the folder ---------------------------------------------------

    async def sync(self) -> SyncReport:
        return await self._exclusive(self._sync)

    async def _exclusive(self, fn: Callable[..., T], *args: Any) -> T:
        """Run an index-changing job in a thread, one at a time. A thread cannot be stopped, so a cancelled
        caller still holds the lock until the job ends: `close()` then never pulls the store from under it."""
        async with self._sync_lock:
            job = asyncio.ensure_future(asyncio.to_thread(fn, *args))
            try:
                return await asyncio.shield(job)
            except asyncio.CancelledError:
                await asyncio.wait([job])
                raise

    async def watch(self, stop_event: asyncio.Event) -> None:
        """Syncs now, then after every change under the knowledge folder until stop_event is set."""
        from watchfiles import awatch

        self.knowledge_dir.mkdir(parents=True, exist_ok=True)
        await self._logged_sync()
        async for _ in awatch(self.knowledge_dir, stop_event=stop_event, watch_filter=_visible, debounce=1000):
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
            with self._index_lock:
                self._indexes.clear()
            self.store.set_meta("dim", str(self.embedder.dim))
        manifest = self.store.files()
        on_disk = self._scan(report)
        work: list[tuple[FileEntry, bytes, bool]] = []
        for source, (collection, path) in on_disk.items():
            try:
                stat = path.stat()
                known = manifest.get(source)
                if fresh and known and known.size == stat.st_size and known.mtime_ns == stat.st_mtime_ns:
                    report.unchanged += 1
                    continue
                data = path.read_bytes()
            except OSError as exc:  # vanished or unreadable mid-scan: the next sync sees the truth
                report.skipped.append((source, str(exc)))
                continue
            digest = hashlib.sha256(data).hexdigest()
            if fresh and known and known.sha256 == digest and known.collection == collection:
                self.store.touch(source, stat.st_size, stat.st_mtime_ns)
                report.unchanged += 1
                continue
            entry = FileEntry(source, collection, digest, stat.st_size, stat.st_mtime_ns, 0)
            work.append((entry, data, known is not None))
        for source in manifest.keys() - on_disk.keys():
            self.store.remove(source)
            report.removed.append(source)
            touched.add(manifest[source].collection)
        parsed: list[tuple[FileEntry, list[Chunk], bool]] = []
        for entry, data, existed in work:
            try:
                parsed.append((entry, self._chunker_for().split(parse(entry.source, data)), existed))
            except UnsupportedDocument as exc:
                report.skipped.append((entry.source, str(exc)))
        total = sum(len(chunks) for _, chunks, _ in parsed)
        with tqdm(total=total, unit="chunk", desc="indexing", disable=not (self.progress and total > 1)) as bar:
            group: list[tuple[FileEntry, list[Chunk], bool]] = []
            for item in parsed:
                group.append(item)
                if sum(len(chunks) for _, chunks, _ in group) >= CHUNKS_PER_COMMIT or item is parsed[-1]:
                    touched.update(self._ingest(group, report, bar))
                    group = []
        for source in {entry.source for entry, _, _ in work} - set(report.added) - set(report.updated):
            if source in manifest:  # it no longer parses: its old chunks would be stale
                self.store.remove(source)
                report.removed.append(source)
                touched.add(manifest[source].collection)
        for collection in touched:
            self._reconcile(collection)
        self.store.set_meta("config", self._config)
        self.store.set_meta("model", self.embedder.name)
        return report

    def _scan(self, report: SyncReport) -> dict[str, tuple[str, Path]]:
        found: dict[str, tuple[str, Path]] = {}
        if not self.knowledge_dir.is_dir():
            return found
        for folder in sorted(self.knowledge_dir.iterdir()):
            if not folder.is_dir() or folder.name.startswith("."):
                continue  # loose files (the folder's README) belong to no collection
            try:
                collection = safe_collection(folder.name)
            except UploadRefused:
                report.skipped.append((folder.name + "/", "collection names use a-z, 0-9, '-' and '_'"))
                continue
            if collection != folder.name:
                report.skipped.append((folder.name + "/", f"rename the folder to {collection}"))
                continue
            for root, dirs, files in os.walk(folder):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    path = Path(root) / name
                    source = path.relative_to(self.knowledge_dir).as_posix()
                    if name.startswith("."):
                        continue
                    if path.suffix.lower() not in FORMATS:
                        report.skipped.append((source, f"unsupported type {path.suffix or '(none)'}"))
                        continue
                    found[source] = (collection, path)
        return found

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

    # -- FAISS, derived from the store ---------------------------------------------------------------

    def _index_path(self, collection: str) -> Path:
        return self.index_dir / "faiss" / f"{collection}.faiss"

    def _load_indexes(self) -> None:
        for collection in self.store.collections():
            self._reconcile(collection)

    def _reconcile(self, collection: str) -> None:
        with self._index_lock:
            self._reconcile_locked(collection)

    def _reconcile_locked(self, collection: str) -> None:
        """Brings a collection's FAISS index to exactly the store's chunks: loads it, adds what is missing,
        drops what is gone, and rebuilds it when the file is damaged or the index kind no longer fits."""
        ids = self.store.ids(collection)
        path = self._index_path(collection)
        if not len(ids):
            self._indexes.pop(collection, None)
            path.unlink(missing_ok=True)
            return
        dim = int(self.store.get_meta("dim") or 0) or self.embedder.dim
        self.store.set_meta("dim", str(dim))
        index = self._indexes.get(collection)
        if index is None and path.exists():
            try:
                index = VectorIndex.load(path, dim)
            except (RuntimeError, ValueError) as exc:
                log.warning("FAISS index for %s is damaged (%s); rebuilding it from the store", collection, exc)
        changed = False
        if index is not None:
            present = index.ids()
            live = np.setdiff1d(present, np.fromiter(index.dead, np.int64, len(index.dead)))
            extra = np.setdiff1d(live, ids)
            missing = np.setdiff1d(ids, present)
            index.remove(extra)
            index.add(missing, self.store.vectors(missing, dim))
            changed = bool(len(extra) or len(missing))
            if not index.fits():
                index = None
        if index is None:
            index = VectorIndex.for_size(dim, len(ids))
            index.add(ids, self.store.vectors(ids, dim))
            changed = True
        self._indexes[collection] = index
        if changed or not path.exists():
            index.save(path)

    # -- admin actions -------------------------------------------------------------------------------

    def check_upload_size(self, filename: str, size: int) -> None:
        """Raises UploadRefused for a file over the upload limit, so it is refused before anyone downloads it."""
        check_size(safe_filename(filename), size, self.max_upload_bytes)

    async def add_upload(self, filename: str, data: bytes, collection: str, *, limit: bool = True) -> str:
        """Saves and indexes one upload; returns what happened, for the uploader. Raises UploadRefused.

        Checking parses the whole file (a PDF can take seconds), so it runs in a thread like the rest."""
        collection = safe_collection(collection)
        name = await asyncio.to_thread(check, filename, data, self.max_upload_bytes if limit else None)
        return await self._exclusive(self._add_upload, name, data, collection)

    def _add_upload(self, name: str, data: bytes, collection: str) -> str:
        digest = hashlib.sha256(data).hexdigest()
        source = f"{collection}/{name}"
        self._sync()
        same = [f.source for f in self.store.files().values() if f.sha256 == digest]
        if same:
            raise UploadRefused(f"That file is already in the knowledge base as {same[0]}. Nothing was saved.")
        target = self._inside(source)
        replaced = target.exists()
        _write_atomically(target, data)
        try:
            report = self._sync()
        except BaseException:
            if not replaced:
                target.unlink(missing_ok=True)
            raise
        entry = self.store.files().get(source)
        if entry is None:
            reason = dict(report.skipped).get(source, "it could not be indexed")
            if replaced:
                raise UploadRefused(f"{name} was saved but not indexed: {reason}.")
            target.unlink(missing_ok=True)
            raise UploadRefused(f"{name} was not indexed: {reason}. Nothing was saved.")
        verb = "Replaced" if replaced else "Added"
        return (f"{verb} {name} in collection '{collection}': {entry.chunks} chunk{'s' * (entry.chunks != 1)} "
                f"indexed ({report.embedded} newly embedded).")

    async def add_files(self, paths: list[Path], collection: str) -> tuple[list[str], SyncReport]:
        """`knowledge add`: copies files (folders recursively) into the collection, then syncs once."""
        collection = safe_collection(collection)
        return await self._exclusive(self._add_files, paths, collection)

    def _add_files(self, paths: list[Path], collection: str) -> tuple[list[str], SyncReport]:
        notes: list[str] = []
        hashes = {f.sha256: f.source for f in self.store.files().values()}
        for path in _expand(paths):
            try:
                data = path.read_bytes()
                name = check(path.name, data, None)
            except (UploadRefused, OSError) as exc:
                notes.append(f"refused {path}: {exc}")
                continue
            digest = hashlib.sha256(data).hexdigest()
            if digest in hashes:
                notes.append(f"skipped {path}: already in the knowledge base as {hashes[digest]}")
                continue
            target = self._inside(f"{collection}/{name}")
            if path.resolve() != target.resolve():
                _write_atomically(target, data)
            hashes[digest] = f"{collection}/{name}"
        return notes, self._sync()

    async def remove(self, source: str) -> bool:
        """Deletes the document from the folder and the index; False when no such source exists."""
        return await self._exclusive(self._remove, source)

    def _remove(self, source: str) -> bool:
        path = self._inside(source)
        if not (source in self.store.files() or path.is_file()):
            return False
        path.unlink(missing_ok=True)
        self._sync()
        return True

    def _inside(self, source: str) -> Path:
        root = self.knowledge_dir.resolve()
        target = (root / source).resolve()
        if root not in target.parents:
            raise UploadRefused(f"{source!r} is outside the knowledge folder. Nothing was changed.")
        return target

    def files(self, collection: str | None = None) -> list[tuple[str, int, int, str]]:
        return self.store.file_rows(collection)

    def stats(self) -> list[tuple[str, int, int, int]]:
        return self.store.stats()


def _write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")  # hidden: neither sync nor the watcher picks it up
    tmp.write_bytes(data)
    os.replace(tmp, target)


def _expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return files


def _visible(change, path: str) -> bool:
    return not any(part.startswith(".") for part in Path(path).parts[-2:])

