"""The one interface every model backend implements (after simonw/llm: an id and a stream method).

The engine only ever talks to a `ChatModel`; OpenAI-compatible servers and local transformers models are two
implementations of it, so adapters and the engine never learn which one answered.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import AsyncIterator, Literal, Protocol, TypedDict

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "content_filter", "error"]


class TextPart(TypedDict):
    type: Literal["text"]
    text: str


class ImageURL(TypedDict):
    url: str  # a `data:image/png;base64,...` URL: the bytes the bot checked, not a link the server must fetch


class ImagePart(TypedDict):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = TextPart | ImagePart


class Message(TypedDict):
    role: Role
    # Text, except the user's turn to a model that accepts images: OpenAI's content parts, text first. Local
    # models and history only ever see text.
    content: str | list[ContentPart]


@dataclass(frozen=True)
class GenParams:
    temperature: float = 0.7
    max_tokens: int = 400
    top_p: float = 1.0
    stop: tuple[str, ...] = ()


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class Chunk:
    """A piece of a streamed reply; the last one carries `finish_reason` and `usage`."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None
    error: str | None = field(default=None)


class ModelError(Exception):
    """A backend failure the user should hear about in plain words (`str(exc)` is safe to show)."""


class ModelTimeout(ModelError):
    pass


class ContextLengthError(ModelError):
    """The prompt did not fit the model's context; the engine trims harder and retries once."""


class ModelBusy(ModelError):
    pass


class ChatModel(Protocol):
    name: str
    context_window: int

    def count_tokens(self, messages: list[Message]) -> int: ...

    def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[Chunk]: ...
