"""Turns a persona's `model:` settings into a loaded `ChatModel`, once per distinct model.

Local models take seconds to load and hundreds of MB of memory, so each one is loaded once, off the event
loop, and shared by every persona and channel that names it.
"""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING

from bot.config import Settings
from bot.models.base import ChatModel

if TYPE_CHECKING:
    from bot.personas import ModelSpec


class ModelRegistry:
    def __init__(self, settings: Settings):
        self.settings = settings
        self._models: dict[tuple, ChatModel] = {}
        self._lock = asyncio.Lock()

    def _identity(self, spec: "ModelSpec | None") -> tuple:
        backend = (spec and spec.backend) or self.settings.backend
        window = spec.context_window if spec else None
        if backend == "openai":
            return ("openai", (spec and spec.name) or self.settings.openai_model, window)
        return ("local", self._local_source((spec and spec.path) or self.settings.local_model), window)

    def _local_source(self, source: str) -> str:
        """A persona may say `path: models/NAME`, meaning under the data dir; anything else passes through."""
        if not Path(source).exists() and (self.settings.data_dir / source).exists():
            return str(self.settings.data_dir / source)
        return source

    async def get(self, spec: "ModelSpec | None" = None) -> ChatModel:
        identity = self._identity(spec)
        if (model := self._models.get(identity)) is not None:
            return model
        async with self._lock:
            if identity not in self._models:
                self._models[identity] = await self._load(*identity)
            return self._models[identity]

    async def close(self) -> None:
        for model in self._models.values():
            if aclose := getattr(model, "aclose", None):
                await aclose()
            elif close := getattr(model, "close", None):
                await asyncio.to_thread(close)

    async def _load(self, backend: str, source: str, window: int | None) -> ChatModel:
        if backend == "openai":
            from bot.models.openai import OpenAIChatModel

            return OpenAIChatModel(
                model=source,
                # OpenAI-compatible local servers (Ollama, vLLM, LM Studio) accept any key.
                api_key=self.settings.openai_api_key or "not-needed",
                base_url=self.settings.openai_base_url,
                timeout=self.settings.model_timeout,
                context_window=window,
            )
        from bot.models.local import LocalChatModel

        return await asyncio.to_thread(LocalChatModel.load, source, self.settings.models_dir, context_window=window)
