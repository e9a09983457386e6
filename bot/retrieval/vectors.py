"""FAISS indexes, one per (qualified) collection, kept in step with the vectors in the SQLite store.

Inner product on unit vectors is cosine similarity. Below HNSW_THRESHOLD vectors a collection is searched
exactly (IndexFlatIP): scanning 25k × 384 floats takes about as long as encoding the query with MiniLM
(a few ms on one core), so an approximate index there would only cost recall and build time. Above it the
scan grows linearly while HNSW stays near-constant (bench/retrieval.py prints both at 10k and 100k).
HNSW cannot delete, so removed ids are tombstoned and filtered, and the index is rebuilt once a tenth of it
is dead.

An index being searched is never changed: reconciling works on a copy (or a new build, which for HNSW takes
seconds) and swaps it in, so a search during a sync never waits for one to be built.

Each process follows the store's change log (`catch_up`): chunks another process added are read back with their
stored vectors and added, removed ones dropped, so an upload anywhere is searchable everywhere without
embedding it again. A few changes are made in place, under the search lock (microseconds for a flat index); a
large batch goes onto a copy that is swapped in, like a reconcile.
"""
from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

import faiss
import numpy as np

from bot.retrieval.folders import index_file
from bot.retrieval.store import Store

log = logging.getLogger(__name__)

HNSW_THRESHOLD = 25_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96
# Up to this many followed changes are made to the searched index itself, under the search lock: a flat add is a
# copy (1000 vectors: 9 ms), an HNSW insert about a millisecond each at 20k. More go onto a copy, swapped in.
IN_PLACE_CHANGES = {False: 1024, True: 16}


class VectorIndex:
    def __init__(self, dim: int, hnsw: bool):
        self.dim = dim
        self.hnsw = hnsw
        if hnsw:
            inner = faiss.IndexHNSWFlat(dim, HNSW_M, faiss.METRIC_INNER_PRODUCT)
            inner.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        else:
            inner = faiss.IndexFlatIP(dim)
        self.index = faiss.IndexIDMap2(inner)
        self.dead: set[int] = set()

    @classmethod
    def for_size(cls, dim: int, size: int) -> "VectorIndex":
        return cls(dim, size >= HNSW_THRESHOLD)

    @classmethod
    def load(cls, path: Path, dim: int) -> "VectorIndex":
        """Raises on a missing, truncated or foreign file; the caller rebuilds from the store."""
        index = faiss.read_index(str(path))
        if not isinstance(index, faiss.IndexIDMap2) or index.d != dim:
            raise ValueError(f"{path} is not an index of {dim}-d vectors")
        inner = faiss.downcast_index(index.index)
        self = cls.__new__(cls)
        self.dim, self.hnsw, self.index, self.dead = dim, isinstance(inner, faiss.IndexHNSWFlat), index, set()
        if self.hnsw:
            inner.hnsw.efSearch = HNSW_EF_SEARCH
        return self

    def copy(self) -> "VectorIndex":
        clone = VectorIndex.__new__(VectorIndex)
        clone.dim, clone.hnsw, clone.dead = self.dim, self.hnsw, set(self.dead)
        clone.index = faiss.clone_index(self.index)
        return clone

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")  # processes sharing the folder each write their own
        faiss.write_index(self.index, str(tmp))
        tmp.replace(path)

    @property
    def size(self) -> int:
        return self.index.ntotal - len(self.dead)

    def ids(self) -> np.ndarray:
        return faiss.vector_to_array(self.index.id_map).astype(np.int64)

    def add(self, ids: np.ndarray, vectors: np.ndarray) -> None:
        if len(ids):
            self.index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), ids.astype(np.int64))

    def remove(self, ids: np.ndarray) -> None:
        if not len(ids):
            return
        if self.hnsw:
            self.dead.update(int(i) for i in ids)
        else:
            self.index.remove_ids(ids.astype(np.int64))

    def fits(self) -> bool:
        """False when the index kind no longer suits its size or too much of it is tombstones."""
        live = self.size
        if self.hnsw:
            return live >= HNSW_THRESHOLD // 2 and len(self.dead) <= max(100, self.index.ntotal // 10)
        return live < HNSW_THRESHOLD

    def search(self, query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, cosine) best first, for one unit-length query vector."""
        if self.index.ntotal == 0:
            return []
        fetch = min(self.index.ntotal, k + len(self.dead))
        if self.hnsw:
            faiss.downcast_index(self.index.index).hnsw.efSearch = max(HNSW_EF_SEARCH, fetch)
        scores, ids = self.index.search(query.reshape(1, -1).astype(np.float32), fetch)
        hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0 and int(i) not in self.dead]
        return hits[:k]


class Indexes:
    """Every collection's index, derived from the store: rebuilt from its vectors, never re-embedded."""

    def __init__(self, directory: Path, store: Store, model_dim: Callable[[], int]):
        self.directory = directory
        self.store = store
        self.model_dim = model_dim  # asked only for a store that has no vectors yet: it loads the model
        self.by_collection: dict[str, VectorIndex] = {}
        self.lock = threading.Lock()  # held to search and to swap; never while an index is built or changed
        self.changing = threading.RLock()  # one thread changes the indexes at a time: a reconcile or a catch-up
        self.seen = 0  # the last change in the store's log that the indexes hold

    def names(self) -> list[str]:
        with self.lock:  # a sync thread may be adding or dropping collections
            return list(self.by_collection)

    def search(self, collections: list[str], query: np.ndarray, k: int) -> list[tuple[int, float]]:
        """(id, cosine) best first across the collections."""
        hits: list[tuple[int, float]] = []
        with self.lock:  # searches one at a time: an HNSW search sets efSearch on its index
            for index in filter(None, map(self.by_collection.get, collections)):
                hits.extend(index.search(query, k))
        return sorted(hits, key=lambda pair: -pair[1])[:k]

    def clear(self) -> None:
        """For a new embedding model, whose vectors may have another width."""
        with self.lock:
            self.by_collection.clear()

    def load(self) -> None:
        with self.changing:
            seen = self.store.latest_change()  # before reading: a change made meanwhile is applied again, harmlessly
            for collection in self.store.collections():
                self.reconcile(collection)
            self.seen = seen

    def catch_up(self, wait: float | None = None, most: int | None = None) -> bool:
        """Applies the changes in the store's log since the last one seen (other processes' writes, and this
        one's); nothing is embedded. False when it left them: after `wait` seconds (None: as long as it takes)
        while another thread is changing the indexes, or when more than `most` changes are waiting. A search
        passes both, so it waits for a few changes being applied but never for a build or a large batch: the
        follower thread catches up with those."""
        if not self.changing.acquire(timeout=-1 if wait is None else wait):
            return False
        try:
            latest = self.store.latest_change()
            if latest == self.seen:
                return True
            if most is not None and latest - self.seen > most:
                return False
            changes = self.store.changes_since(self.seen)
            if changes is None:  # the log was pruned past what these indexes hold: compare whole collections
                latest = self.store.latest_change()
                for collection in set(self.names()) | set(self.store.collections()):
                    self.reconcile(collection, save=False)
                self.seen = latest
                return True
            for collection, (added, removed) in changes.by_collection.items():
                self._apply(collection, added, removed)
            self.seen = changes.latest
            return True
        finally:
            self.changing.release()

    def _apply(self, collection: str, added: np.ndarray, removed: np.ndarray) -> None:
        with self.lock:
            current = self.by_collection.get(collection)
        if current is None:
            if len(added):  # a collection new to this process: built from the store
                self.reconcile(collection, save=False)
            return
        present = current.ids()
        gone = removed[np.isin(removed, present)]
        ids, vectors = self.store.stored_vectors(added[~np.isin(added, present)])
        if not len(gone) and not len(ids):
            return
        if len(ids) and vectors.shape[1] != current.dim:  # a new embedding model: its vectors need a new index
            with self.lock:
                self.by_collection.pop(collection, None)
            self.reconcile(collection, save=False)
            return
        if len(gone) + len(ids) <= IN_PLACE_CHANGES[current.hnsw]:
            index = current
            with self.lock:
                index.remove(gone)
                index.add(ids, vectors)
        else:
            index = current.copy()
            index.remove(gone)
            index.add(ids, vectors)
        if not index.fits() and index.size:
            self.reconcile(collection, save=False)  # rebuilt as the kind its size now needs
            return
        with self.lock:
            if index.size:
                self.by_collection[collection] = index
            else:
                self.by_collection.pop(collection, None)

    def path(self, collection: str) -> Path:
        return self.directory / index_file(collection)

    def reconcile(self, collection: str, *, save: bool = True) -> None:
        """Brings a collection's FAISS index to exactly the store's chunks: loads it, adds what is missing,
        drops what is gone, and rebuilds it when the file is damaged or the index kind no longer fits. One
        thread at a time (the sync's, opening's or a catch-up's): searches go on meanwhile, on the index as it
        was. A catch-up does not save: the file is the writing process's, and only speeds up the next start."""
        with self.changing:
            with self.lock:
                current = self.by_collection.get(collection)
            index = self._reconciled(collection, current, save)
            with self.lock:
                if index is None:
                    self.by_collection.pop(collection, None)
                else:
                    self.by_collection[collection] = index

    def _reconciled(self, collection: str, current: VectorIndex | None, save: bool) -> VectorIndex | None:
        ids = self.store.ids(collection)
        path = self.path(collection)
        if not len(ids):
            if save:
                path.unlink(missing_ok=True)
            return None
        # a replica that never wrote has no "dim" of its own: its stored vectors say, without loading the model
        dim = int(self.store.get_meta("dim") or 0) or self.store.vector_width() or self.model_dim()
        if save:
            self.store.set_meta("dim", str(dim))
        index = current
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
            changed = bool(len(extra) or len(missing))
            if changed and index is current:
                index = index.copy()
            index.remove(extra)
            index.add(missing, self.store.vectors(missing, dim))
            if not index.fits():
                index = None
        if index is None:
            index = VectorIndex.for_size(dim, len(ids))
            index.add(ids, self.store.vectors(ids, dim))
            changed = True
        if save and (changed or not path.exists()):
            index.save(path)
        return index
