"""FAISS indexes, one per collection, kept in step with the vectors in the SQLite store.

Inner product on unit vectors is cosine similarity. Below HNSW_THRESHOLD vectors a collection is searched
exactly (IndexFlatIP): scanning 25k × 384 floats takes about as long as encoding the query with MiniLM
(a few ms on one core), so an approximate index there would only cost recall and build time. Above it the
scan grows linearly while HNSW stays near-constant (bench/retrieval.py prints both at 10k and 100k).
HNSW cannot delete, so removed ids are tombstoned and filtered, and the index is rebuilt once a tenth of it
is dead.
"""
from __future__ import annotations

import logging
from pathlib import Path

import faiss
import numpy as np

log = logging.getLogger(__name__)

HNSW_THRESHOLD = 25_000
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 96


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

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
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
