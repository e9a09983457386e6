"""Questions answered through the real engine path, with what the scores need recorded on the way.

A `Workbench` is an `Engine` of its own for one evaluation: the persona's variants saved as personas in a
scratch folder, a private copy of the collections they cite indexed in a scratch index (so the dynamism step
can add a document without touching the user's knowledge), a scratch history database (so evaluation never
shows up in the user's usage or exports), and the user's own models and settings. Every question is a
one-off (`Engine.reply(..., use_history=False)`) in a terminal channel whose persona is the variant, exactly
as `/ask` would answer it.

Two thin recorders sit where the engine already calls out: around the retriever's `ground()` (which passages
the model was shown) and around the model's `stream()` (its own words, before the engine appends the sources
footer or a notice, and the token usage it reported).
"""
from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bot.config import Settings
from bot.conversation import ConvKey, Incoming, Role
from bot.engine import Engine
from bot.evaluation.questions import Question
from bot.history import HistoryStore
from bot.models.base import Chunk, GenParams, Message
from bot.models.registry import ModelRegistry
from bot.personas import Persona, PersonaLibrary
from bot.retrieval import Grounding, Hit, Retriever
from bot.retrieval.embed import Embedder

WORKSPACE = "eval"


class EvalError(Exception):
    """A problem with what `eval` was asked to do; str() says how to fix it."""


@dataclass
class Answer:
    variant: str
    question: Question
    shown: str  # the reply as a user would have seen it, sources footer included
    said: str  # the model's own words
    passages: list[Hit] = field(default_factory=list)  # what the model was shown, numbered from 1
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    finish_reason: str | None = None


@dataclass
class _Record:
    text: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    grounding: Grounding | None = None


class _RecordingModel:
    """The engine's model, seen through a recorder: every call passes straight through."""

    def __init__(self, model: Any, record: _Record):
        self._model, self._record = model, record

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)

    def count_tokens(self, messages: list[Message]) -> int:
        return self._model.count_tokens(messages)

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[Chunk]:
        async for chunk in self._model.stream(messages, params):
            if chunk.text:
                self._record.text.append(chunk.text)
            if chunk.finish_reason:
                self._record.finish_reason = chunk.finish_reason
            if chunk.usage:
                self._record.prompt_tokens = chunk.usage.prompt_tokens
                self._record.completion_tokens = chunk.usage.completion_tokens
            yield chunk


class _RecordingRegistry(ModelRegistry):
    def __init__(self, settings: Settings):
        super().__init__(settings)
        self.record = _Record()

    @asynccontextmanager
    async def use(self, spec=None):  # type: ignore[no-untyped-def]
        async with super().use(spec) as model:
            yield _RecordingModel(model, self.record)


class _RecordingRetriever:
    def __init__(self, retriever: Retriever, registry: _RecordingRegistry):
        self._retriever, self._registry = retriever, registry

    def __getattr__(self, name: str) -> Any:
        return getattr(self._retriever, name)

    async def ground(self, *args: Any, **kwargs: Any) -> Grounding | None:
        grounding = await self._retriever.ground(*args, **kwargs)
        self._registry.record.grounding = grounding
        return grounding


class Workbench:
    def __init__(self, engine: Engine, retriever: Retriever, registry: _RecordingRegistry, work: Path):
        self.engine, self.retriever, self.registry, self.work = engine, retriever, registry, work
        self.index_seconds = 0.0  # indexing the collections' copy: RAG's up-front cost

    @classmethod
    async def open(cls, settings: Settings, work: Path, collections: list[str],
                   embedder: Embedder | None = None) -> "Workbench":
        """`work` is emptied first: it belongs to this evaluation alone."""
        shutil.rmtree(work, ignore_errors=True)
        for name in collections:
            source = Path(settings.knowledge_dir) / name
            if not source.is_dir():
                raise EvalError(f"no collection {name!r}: {source} is not a folder (collections live in "
                                "PERSONABOT_KNOWLEDGE_DIR, one folder each)")
            shutil.copytree(source, work / "knowledge" / name)
        (work / "knowledge").mkdir(parents=True, exist_ok=True)
        index_settings = settings.model_copy(update={"knowledge_dir": work / "knowledge", "data_dir": work / "data"})
        retriever = await Retriever.open(index_settings, embedder=embedder or Embedder.shared(settings.embed_model))
        began = time.perf_counter()
        await retriever.sync()
        index_seconds = time.perf_counter() - began
        # Evaluation asks many questions in a row: a daily token budget meant for a channel must not cut it short.
        # Its history is its own temporary SQLite file, never the bot's shared database (DATABASE_URL).
        engine_settings = settings.model_copy(update={"daily_token_budget": None, "database_url": None})
        engine_settings.__dict__.pop("db_path", None)  # a cached_property copied along would point at the real one
        registry = _RecordingRegistry(engine_settings)
        history = await HistoryStore.open(work / "history.sqlite3")
        engine = Engine(engine_settings, PersonaLibrary(work / "personas"), history, registry,
                        _RecordingRetriever(retriever, registry))  # type: ignore[arg-type]
        bench = cls(engine, retriever, registry, work)
        bench.index_seconds = index_seconds
        return bench

    async def close(self) -> None:
        await self.engine.close()

    @property
    def embed(self):  # type: ignore[no-untyped-def]
        return self.retriever.embedder.encode

    async def add_persona(self, persona: Persona) -> None:
        """Saves the variant as a persona and makes it the one answering in its own channel."""
        await asyncio.to_thread(self.engine.personas.library.save, persona)
        await self.engine.set_persona(self._incoming(persona.name, ""), persona.name)

    async def ask(self, variant: str, persona: str, question: Question) -> Answer:
        record = self.registry.record = _Record()
        began = time.perf_counter()
        shown = "".join([piece async for piece in self.engine.reply(self._incoming(persona, question.text),
                                                                    use_history=False)])
        seconds = time.perf_counter() - began
        passages = list(record.grounding.hits) if record.grounding is not None else []
        return Answer(variant, question, shown, "".join(record.text), passages, record.prompt_tokens,
                      record.completion_tokens, seconds, record.finish_reason)

    async def add_document(self, path: Path, collection: str) -> float:
        """Copies a new document into the collection and syncs; returns the seconds the sync took."""
        target = self.work / "knowledge" / collection / Path(path).name
        shutil.copy2(path, target)
        began = time.perf_counter()
        await self.retriever.sync()
        return time.perf_counter() - began

    def _incoming(self, persona: str, text: str) -> Incoming:
        # The person running eval is at the terminal: an owner, in a conversation of their own.
        return Incoming(ConvKey("terminal", WORKSPACE, persona), "eval", text, user_name="eval", role=Role.OWNER,
                        is_private=True)


def with_model(persona: Persona, **changes: Any) -> Persona:
    """A copy of the persona with some model settings changed (the rest of it untouched)."""
    return persona.model_copy(update={"model": persona.model.model_copy(update=changes)})


def renamed(persona: Persona, name: str, **changes: Any) -> Persona:
    return persona.model_copy(update={"name": name, **changes})

