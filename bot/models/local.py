"""Local transformers models (SmolLM2, GPT-2 fine-tunes, any causal LM) behind the `ChatModel` interface.

Loading accepts what a server admin is likely to have (see `bot.models.resolve`): a name under
`<data dir>/models/`, a model folder, a `.gguf` file, or a Hugging Face Hub id. Generation runs in one worker
thread per model with continuous batching (`bot.models.batching`), so the event loop never waits on torch and
many channels share the model at once.
"""
from __future__ import annotations

import asyncio
import gc
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import AsyncIterator

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import logging as hf_logging

from bot.models import chat_format
from bot.models.base import Chunk, ContextLengthError, GenParams, Message, ModelError
from bot.models.batching import BatchWorker, Request, TextStream
from bot.models.resolve import PULL_HINT, LocalSource, resolve_local

log = logging.getLogger(__name__)


class LocalChatModel:
    """A causal LM from transformers, served to many conversations at once.

    `context_window` is the model's own; a shallow copy with a lower one (what `ModelRegistry` hands a persona
    that asks for less) shares the weights, tokenizer and worker, and is held to its lower window.
    """

    def __init__(self, name: str, model, tokenizer, *, max_batch: int = 8, max_waiting: int = 32):
        self.name = name
        self.tokenizer = tokenizer
        model.eval()
        config = model.config
        self.context_window = int(getattr(config, "n_positions", None)
                                  or getattr(config, "max_position_embeddings", None) or tokenizer.model_max_length)
        # Counting a long history is how trimming works, not an error: stop the tokenizer warning about it.
        tokenizer.model_max_length = VERY_LARGE_INTEGER
        self.uses_chat_template = bool(tokenizer.chat_template)
        eos = tokenizer.eos_token or chat_format.DEFAULT_END_OF_TURN
        self._end_of_turn = eos
        self._stops: tuple[str, ...] = () if self.uses_chat_template else tuple(
            "\n" + header.rstrip("\n") for header in chat_format.ROLE_HEADER.values())
        self._specials = [t for t in tokenizer.all_special_tokens if t]
        # The model's own generation config may ask for a repetition penalty (`models pull smollm2` sets one);
        # honouring it keeps replies the same as `model.generate` gives.
        penalty = getattr(getattr(model, "generation_config", None), "repetition_penalty", None) or 1.0
        self.worker = BatchWorker(model, _stop_ids(model, tokenizer), max_batch=max_batch, max_waiting=max_waiting,
                                  repetition_penalty=penalty)

    @property
    def model(self):
        """The weights live in the worker alone, so closing it frees them whoever still holds this object."""
        return self.worker.model

    @classmethod
    def load(cls, source: str | LocalSource, models_dir: Path, **kwargs) -> LocalChatModel:
        """Load `source`: a name under `models_dir`, a model folder, a `.gguf` file, a Hub id, or one already
        resolved (the registry resolves first, to know whether it has the model already). A path under the data
        dir is looked for under `models_dir`'s parent, which is where `Settings` puts it."""
        if isinstance(source, str):
            source = resolve_local(source, models_dir, Path(models_dir).parent)
        _limit_threads()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = "auto" if device == "cuda" else torch.float32
        hub = source.kind == "hub"
        try:
            # A bar for a sub-second load from disk is noise in the chat; a Hub download keeps its bar.
            with _progress_bars(shown=hub):
                tokenizer = AutoTokenizer.from_pretrained(source.target, **source.options)
                model = AutoModelForCausalLM.from_pretrained(source.target, dtype=dtype, **source.options).to(device)
        except (OSError, ValueError, ImportError) as exc:
            where = f"'{source.name}' (not under {models_dir}, not a file)" if hub else source.target
            raise ModelError(f"Could not load the local model {where}: {exc}. {PULL_HINT}") from exc
        log.info("loaded local model %s on %s", source.name, device)
        return cls(source.name, model, tokenizer, **kwargs)

    def prompt_ids(self, messages: list[Message]) -> list[int]:
        """The token ids the model sees: its own chat template when it has one, else personabot's chat format."""
        clean = [{"role": m["role"], "content": self._strip_specials(m["content"])} for m in messages]
        if self.uses_chat_template:
            text = self.tokenizer.apply_chat_template(clean, tokenize=False, add_generation_prompt=True)
        else:
            text = chat_format.render(clean, end_of_turn=self._end_of_turn)
        return self.tokenizer(text, add_special_tokens=False).input_ids

    def count_tokens(self, messages: list[Message]) -> int:
        return len(self.prompt_ids(messages))

    async def stream(self, messages: list[Message], params: GenParams) -> AsyncIterator[Chunk]:
        ids = self.prompt_ids(messages)
        if len(ids) >= self.context_window:
            raise ContextLengthError(
                f"The conversation is {len(ids)} tokens; {self.name} holds {self.context_window}.")
        # The reply ends with "length" where the context is full, however many tokens the persona allowed.
        room = self.context_window - len(ids)
        request = Request(
            prompt_ids=ids, params=params, max_new_tokens=max(1, min(params.max_tokens, room)),
            text=TextStream(self.tokenizer, tuple(params.stop) + self._stops), loop=asyncio.get_running_loop())
        self.worker.submit(request)
        try:
            while True:
                item = await request.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finish_reason:
                    return
        finally:
            request.cancelled = True  # a reader that stops listening frees its place in the batch

    def close(self) -> None:
        """Stop the worker thread and free the weights' memory (RAM, or GPU memory back to the driver)."""
        self.worker.close()
        gc.collect()  # modules hold reference cycles: without a collection the weights outlive the close
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _strip_specials(self, text: str) -> str:
        """Users typing `<|im_end|>` must not be able to end their turn and speak as the assistant."""
        for token in self._specials:
            text = text.replace(token, "")
        return text


def _stop_ids(model, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        value = getattr(source, "eos_token_id", None)
        if isinstance(value, int):
            ids.add(value)
        elif value:
            ids.update(value)
    return ids


def _limit_threads() -> None:
    """torch defaults to one thread per core it sees, not per core this process may use (containers)."""
    if "OMP_NUM_THREADS" not in os.environ and hasattr(os, "sched_getaffinity"):
        torch.set_num_threads(max(1, min(torch.get_num_threads(), len(os.sched_getaffinity(0)))))


@contextmanager
def _progress_bars(shown: bool) -> Iterator[None]:
    was_shown = hf_logging.is_progress_bar_enabled()
    if shown or not was_shown:
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
