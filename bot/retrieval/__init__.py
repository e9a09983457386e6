"""Knowledge retrieval: documents under knowledge/<collection>/ ground a persona's replies, with citations.

parse → chunk → embed (sentence-transformers) → store (SQLite: manifest, chunks, vectors, FTS5) and
vectors (FAISS per collection) → search (dense + BM25, fused) → a grounding block for the system message.
"""
from bot.retrieval.retriever import Retriever, SyncReport
from bot.retrieval.search import Grounding, Hit
from bot.retrieval.uploads import UploadRefused

__all__ = ["Grounding", "Hit", "Retriever", "SyncReport", "UploadRefused"]
