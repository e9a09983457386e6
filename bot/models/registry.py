"""Turns a persona's `model:` settings into a loaded `ChatModel`, once per distinct set of weights.

Local models take seconds to load and hundreds of MB of memory, so each one is loaded once, off the event
loop, and shared by every persona and channel that names it, whatever context window each persona asks for:
a persona's window is a view over the shared model, not a model of its own. At most
`settings.max_local_models` stay loaded; loading one more closes the least recently used and frees its
memory, but never under a reply still streaming from it: replies hold their model with `use`. Each is served by
the engine `settings.local_engine` picks: CTranslate2 wherever it converts the model, unless one is forced.
"""
from __future__ import annotations

import asyncio
import copy
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

from bot.config import Settings
from bot.models.base import ChatModel
from bot.models.resolve import LocalSource, resolve_local

if TYPE_CHECKING:
    from bot.models.local import LocalChatModel
    from bot.models.openai import OpenAIChatModel
    from bot.personas import ModelSpec


@dataclass(eq=False)
class _Loaded:
    model: "LocalChatModel"
    leases: int = 0  # replies streaming from it now


class ModelRegistry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._remote: dict[tuple, OpenAIChatModel] = {}
        self._local: OrderedDict[tuple, _Loaded] = OrderedDict()  # least recently used first
        self._draining: dict[tuple, _Loaded] = {}  # evicted while leased: closed when its last reply ends
        self._lock = asyncio.Lock()

    async def get(self, spec: "ModelSpec | None" = None) -> ChatModel:
        """The model for `spec`, not held: enough for tests and the CLI, but a reply must `use` its model, or
        loading another could close this one under it."""
        async with self.use(spec) as model:
            return model

    @asynccontextmanager
    async def use(self, spec: "ModelSpec | None" = None) -> AsyncIterator[ChatModel]:
        """The model for `spec`, seen through the persona's context window and held until the block ends: an
        eviction meanwhile waits for the last holder to finish."""
        if ((spec and spec.backend) or self.settings.backend) == "openai":
            yield self._openai(spec)
            return
        source = resolve_local((spec and spec.path) or self.settings.local_model, self.settings.models_dir,
                               self.settings.data_dir)
        key = (source.target, source.gguf_file)
        entry = self._find(key) or await self._load(key, source)
        entry.leases += 1  # nothing ran since it was found or loaded (no await suspended), so it is still open
        try:
            await self._evict(keep=self.settings.max_local_models)  # in case `_find` took one back
            asked = spec.context_window if spec else None
            yield _with_window(entry.model, asked and min(asked, entry.model.context_window))
        finally:
            entry.leases -= 1
            if not entry.leases and self._draining.get(key) is entry:
                del self._draining[key]
                await asyncio.to_thread(entry.model.close)

    async def close(self) -> None:
        for model in self._remote.values():
            await model.aclose()
        for entry in [*self._local.values(), *self._draining.values()]:
            await asyncio.to_thread(entry.model.close)
        self._remote.clear()
        self._local.clear()
        self._draining.clear()

    def _openai(self, spec: "ModelSpec | None") -> ChatModel:
        """One client per model and server. The persona's window wins where OpenAI publishes none, which is
        every model of a compatible server (Ollama, vLLM): the persona is the only one who knows it there."""
        from bot.models.openai import OpenAIChatModel, known_context_window

        name = (spec and spec.name) or self.settings.openai_model
        key = (name, self.settings.openai_base_url)
        if key not in self._remote:
            self._remote[key] = OpenAIChatModel(
                model=name,
                # OpenAI-compatible local servers (Ollama, vLLM, LM Studio) accept any key.
                api_key=self.settings.openai_api_key or "not-needed",
                base_url=self.settings.openai_base_url,
                timeout=self.settings.model_timeout,
            )
        asked = spec.context_window if spec else None
        return _with_window(self._remote[key], asked and min(asked, known_context_window(name) or asked))

    def _find(self, key: tuple) -> _Loaded | None:
        if key in self._draining:  # evicted but still open under a reply: take it back rather than load a copy
            self._local[key] = self._draining.pop(key)
        if key in self._local:
            self._local.move_to_end(key)
        return self._local.get(key)

    async def _load(self, key: tuple, source: LocalSource) -> _Loaded:
        from bot.models.local import LocalChatModel

        async with self._lock:
            if (entry := self._find(key)) is None:
                # Room first: the bound exists so that two models never need the memory at once.
                await self._evict(keep=self.settings.max_local_models - 1)
                model = await asyncio.to_thread(LocalChatModel.load, source, self.settings.models_dir,
                                                engine=self.settings.local_engine)
                entry = self._local[key] = _Loaded(model)
            return entry

    async def _evict(self, keep: int) -> None:
        """Close the least recently used local models beyond `keep`; one a reply holds closes when it ends."""
        while len(self._local) > keep:
            key, entry = self._local.popitem(last=False)
            if entry.leases:
                self._draining[key] = entry
            else:
                await asyncio.to_thread(entry.model.close)


def _with_window(model: ChatModel, window: int | None) -> ChatModel:
    """`model` as a persona with its own context window sees it: a shallow copy that shares the weights, worker
    and client, so editing a persona's window costs nothing and never loads a model of its own."""
    if window is None or window == model.context_window:
        return model
    view = copy.copy(model)
    view.context_window = window
    return view
