"""Knowledge retrieval: documents in collections ground a persona's replies, with citations.

Global collections (knowledge/<collection>/) are seen by every workspace; a workspace's own uploads
(<data_dir>/workspaces/<platform>/<id>/knowledge/<collection>/) by it alone (folders.py).

parse → chunk → embed (sentence-transformers) → store (SQLite: manifest, chunks, vectors, FTS5) and
vectors (FAISS per collection) → search (dense + BM25, fused) → a grounding block for the system message.
Several processes share one index: each one's FAISS follows the store's change log; with DATABASE_URL the
store is a replica of PostgreSQL's knowledge tables (replica.py).
"""
from bot.retrieval.indexing import SyncReport
from bot.retrieval.retriever import Retriever
from bot.retrieval.search import Grounding, Hit
from bot.retrieval.store import FileRow
from bot.retrieval.uploads import UploadRefused

__all__ = ["FileRow", "Grounding", "Hit", "Retriever", "SyncReport", "UploadRefused"]
