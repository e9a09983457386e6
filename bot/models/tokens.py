"""Token counts for OpenAI-style chat messages: exact with tiktoken when its vocabulary loads, else an estimate.

tiktoken downloads each vocabulary on first use (over HTTP, with no timeout) and keeps it under
TIKTOKEN_CACHE_DIR, or the system temp dir. A bot on an offline host, or one talking to a local
OpenAI-compatible server, must neither hang nor retry that download on every message. So each vocabulary is
loaded once per process on a daemon thread; until it arrives, or for good if it cannot, counts use a
deliberately high estimate, ``ceil(utf-8 bytes / 3)`` per message plus the chat framing overhead below.
English runs at about four bytes a token, so the estimate leaves the history budget room to spare rather
than overflowing the model's context.

To count exactly on an offline host, copy the ``*.tiktoken`` cache files from an online one into
``TIKTOKEN_CACHE_DIR``.
"""
from __future__ import annotations

import logging
import math
import threading
from typing import TYPE_CHECKING, Iterable

from bot.models.base import ContentPart, Message

if TYPE_CHECKING:
    import tiktoken

log = logging.getLogger(__name__)

# OpenAI's chat framing: every message costs a few tokens around its content, and the reply is primed with
# three more (https://github.com/openai/openai-cookbook, "How to count tokens with tiktoken").
PER_MESSAGE = 4
REPLY_PRIMING = 3
BYTES_PER_TOKEN_ESTIMATE = 3
DEFAULT_ENCODING = "o200k_base"  # GPT-4o and later; also the closest guess for unknown model names
FIRST_WAIT_S = 1.0  # the longest one count ever waits for a vocabulary to load
# An image part, priced at the most a high-detail image costs on GPT-4o: scaled into 2048 px, its short side to
# 768, it is at most 2 x 4 tiles of 512 px, 170 tokens each, plus 85. Without the picture's size at hand, the
# ceiling keeps the history budget on the safe side, as the byte estimate does for text.
IMAGE_TOKENS = 85 + 170 * 8


class _Vocabulary:
    def __init__(self, name: str):
        self.name = name
        self.encoding: tiktoken.Encoding | None = None
        self._loaded = threading.Event()
        self._waited = False
        threading.Thread(target=self._load, name=f"tiktoken-{name}", daemon=True).start()

    def _load(self) -> None:
        try:
            import tiktoken

            self.encoding = tiktoken.get_encoding(self.name)
        except Exception as exc:  # offline, proxy, corrupt cache: all end the same way
            log.info("tiktoken vocabulary %s unavailable (%s); token counts are estimates", self.name,
                     type(exc).__name__)
        finally:
            self._loaded.set()

    def get(self) -> tiktoken.Encoding | None:
        if not self._loaded.is_set() and not self._waited:
            self._waited = True
            self._loaded.wait(FIRST_WAIT_S)
        return self.encoding


_vocabularies: dict[str, _Vocabulary] = {}
_lock = threading.Lock()


def encoding_name(model: str) -> str:
    try:
        import tiktoken

        return tiktoken.encoding_name_for_model(model)
    except (ImportError, KeyError):
        return DEFAULT_ENCODING


def _vocabulary(name: str) -> _Vocabulary:
    with _lock:
        if name not in _vocabularies:
            _vocabularies[name] = _Vocabulary(name)
        return _vocabularies[name]


def estimate_text(text: str) -> int:
    return math.ceil(len(text.encode("utf-8")) / BYTES_PER_TOKEN_ESTIMATE)


class TokenCounter:
    """Counts tokens the way the model named `model` would, as closely as this host allows."""

    def __init__(self, model: str):
        self._vocabulary = _vocabulary(encoding_name(model))  # starts loading now, off the caller's thread

    @property
    def exact(self) -> bool:
        return self._vocabulary.get() is not None

    def text(self, text: str) -> int:
        encoding = self._vocabulary.get()
        if encoding is None:
            return estimate_text(text)
        return len(encoding.encode(text, disallowed_special=()))

    def messages(self, messages: Iterable[Message]) -> int:
        return sum(PER_MESSAGE + self.content(m["content"]) for m in messages) + REPLY_PRIMING

    def content(self, content: str | list[ContentPart]) -> int:
        if isinstance(content, str):
            return self.text(content)
        return sum(self.text(part["text"]) if part["type"] == "text" else IMAGE_TOKENS for part in content)
