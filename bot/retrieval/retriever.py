"""The questions the engine asks of the knowledge index, and the one object the rest of the bot holds.

Every question and admin action names a workspace (None: global knowledge only), and sees or touches nothing
that workspace cannot see. Searching is here: dense and BM25 rankings (and one of passages holding the query's
identifiers verbatim) fused by search.py. Keeping the index in step with the folders, across processes, is
indexing.py's `Indexer`; what an admin's add and remove do, documents.py. A `Retriever` holds one Indexer and
runs every index-changing action through its `exclusive`, so callers (the engine, the CLI, the evaluation)
deal with one object. All blocking work runs in threads, off the event loop.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from bot.conversation import Workspace
from bot.retrieval import documents, folders
from bot.retrieval import search as ranking
from bot.retrieval.embed import Embedder
from bot.retrieval.folders import Scope, plain, visible
from bot.retrieval.indexing import Indexer, SyncReport
from bot.retrieval.search import Grounding, Hit
from bot.retrieval.store import FileRow, Store
from bot.retrieval.uploads import DEFAULT_MAX_BYTES, check, check_size, safe_collection, safe_filename
from bot.retrieval.vectors import Indexes

__all__ = ["Retriever", "SyncReport"]

_BM25 = ThreadPoolExecutor(4, thread_name_prefix="bm25")  # the lexical half of concurrent searches

GROUNDING_BUDGET = 1200  # tokens of passages in the system message
GROUNDING_CANDIDATES = 8
# "documents": rank documents, then their passages (search.fuse_by_document); "passages": RRF over passages
FUSION = "documents"


class Retriever:
    def __init__(self, knowledge_dir: Path, workspaces_dir: Path, index_dir: Path, embedder: Embedder, *,
                 max_upload_bytes: int | None = DEFAULT_MAX_BYTES, min_similarity: float = ranking.MIN_SIMILARITY,
                 budget_tokens: int = GROUNDING_BUDGET, progress: bool = False, database_url: str | None = None):
        self.knowledge_dir = knowledge_dir
        self.workspaces_dir = workspaces_dir  # <workspaces_dir>/<platform>/<id>/knowledge/<collection>/...
        self.index_dir = index_dir
        self.max_upload_bytes = max_upload_bytes
        self.min_similarity = min_similarity
        self.budget_tokens = budget_tokens
        self.fusion = FUSION
        self.reranker: ranking.Reranker | None = None  # a cross-encoder over the fused top passages, when installed
        self.indexer = Indexer(knowledge_dir, workspaces_dir, index_dir, embedder, progress=progress,
                               database_url=database_url)

    @property
    def embedder(self) -> Embedder:
        """The one model for documents and queries: setting it here sets the indexer's."""
        return self.indexer.embedder

    @embedder.setter
    def embedder(self, embedder: Embedder) -> None:
        self.indexer.embedder = embedder

    @property
    def store(self) -> Store:
        return self.indexer.store

    @property
    def indexes(self) -> Indexes:
        return self.indexer.indexes

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
            self.indexer.follow()
        return self

    async def close(self) -> None:
        await self.indexer.close()

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
        return ranking.build(kept, collections, budget_tokens, lambda texts: self.indexer.chunker().count(texts))

    def _search(self, query: str, collections: list[str] | None, k: int, mode: str,
                workspace: Workspace | None) -> list[Hit]:
        self.indexer.catch_up_for_search()
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
            leads = self._leads(wanted, vector, pool) if ranking.LEAD_WEIGHT else []
            sources = self.store.sources(list({i for r in [*rankings, leads] for i in r}))
            fused = ranking.fuse_by_document(rankings, sources, list(ranking.WEIGHTS), leads, ranking.LEAD_WEIGHT)
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

    def _leads(self, collections: list[str], vector: np.ndarray, pool: int) -> list[int]:
        """Documents' first passages, most like the query first: one matrix product over the documents (not
        the chunks) of the collections searched, whose vectors the store keeps until the index changes."""
        ids, matrix = self.store.leads(collections)
        return [ids[n] for n in np.argsort(-(matrix @ vector))[:pool]] if ids else []

    # -- keeping the index in step with the folders (indexing.py) ---------------------------------------

    async def sync(self) -> SyncReport:
        return await self.indexer.sync()

    async def watch(self, stop_event: asyncio.Event) -> None:
        """Syncs now, then after every change under the knowledge folder or a workspace's until stop_event is set."""
        await self.indexer.watch(stop_event)

    # -- admin actions (documents.py) ----------------------------------------------------------------

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
        return await self.indexer.exclusive(documents.add_upload, self.indexer, filename, name, data, collection,
                                            scope)

    async def add_files(self, paths: list[Path], collection: str, *,
                        workspace: Workspace | None = None) -> tuple[list[str], SyncReport]:
        """`knowledge add`: copies files (folders recursively) into the workspace's own collection (None: the
        global one), then syncs once."""
        collection = safe_collection(collection)
        return await self.indexer.exclusive(documents.add_files, self.indexer, paths, collection,
                                            self._scope(workspace))

    async def remove(self, source: str, *, workspace: Workspace | None = None) -> bool:
        """Moves one of the workspace's own documents (None: a global one), named `collection/file.md`, to the
        trash and out of the index; False when it has no such document."""
        return await self.indexer.exclusive(documents.remove, self.indexer, source, self._scope(workspace))

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

