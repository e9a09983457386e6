"""Local models (SmolLM2, GPT-2 fine-tunes, any causal LM) behind the `ChatModel` interface.

Loading accepts what a server admin is likely to have (see `bot.models.resolve`): a name under
`<data dir>/models/`, a model folder, a `.gguf` file, or a Hugging Face Hub id. Two engines generate: CTranslate2
(`bot.models.ct2`, int8, for every folder whose architecture it converts) and transformers with continuous
batching (`bot.models.batching`: `.gguf` files, Hub ids and the rest). Each runs off the event loop and lets many
channels share the model at once; this class holds what both share, so they prompt, stop and stream alike.
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
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import logging as hf_logging

from bot.models import chat_format, ct2
from bot.models.base import Chunk, ContextLengthError, GenParams, Message, ModelError
from bot.models.batching import BatchWorker, Request, TextStream
from bot.models.resolve import PULL_HINT, LocalSource, resolve_local

log = logging.getLogger(__name__)


class LocalChatModel:
    """A causal LM served to many conversations at once by `worker`, a `BatchWorker` or a `CT2Worker`.

    `context_window` is the model's own; a shallow copy with a lower one (what `ModelRegistry` hands a persona
    that asks for less) shares the weights, tokenizer and worker, and is held to its lower window.
    """

    def __init__(self, name: str, tokenizer, worker: BatchWorker | ct2.CT2Worker, context_window: int):
        self.name = name
        self.tokenizer = tokenizer
        self.worker = worker
        self.context_window = context_window
        # Counting a long history is how trimming works, not an error: stop the tokenizer warning about it.
        tokenizer.model_max_length = VERY_LARGE_INTEGER
        self.uses_chat_template = bool(tokenizer.chat_template)
        eos = tokenizer.eos_token or chat_format.DEFAULT_END_OF_TURN
        self._end_of_turn = eos
        self._stops: tuple[str, ...] = () if self.uses_chat_template else tuple(
            "\n" + header.rstrip("\n") for header in chat_format.ROLE_HEADER.values())
        self._specials = [t for t in tokenizer.all_special_tokens if t]

    @property
    def engine(self) -> str:
        """`ctranslate2` or `transformers`: which one generates (what `personabot models list` shows)."""
        return self.worker.engine

    @property
    def model(self):
        """The weights live in the worker alone, so closing it frees them whoever still holds this object."""
        return self.worker.model

    @classmethod
    def load(cls, source: str | LocalSource, models_dir: Path, *, engine: ct2.Engine = "auto", max_batch: int = 8,
             max_waiting: int = 32, lanes: int = 2) -> LocalChatModel:
        """Load `source`: a name under `models_dir`, a model folder, a `.gguf` file, a Hub id, or one already
        resolved (the registry resolves first, to know whether it has the model already). A path under the data
        dir is looked for under `models_dir`'s parent, which is where `Settings` puts it. `engine` "auto" means
        CTranslate2 wherever it converts the model, converting a folder once on its first use."""
        if isinstance(source, str):
            source = resolve_local(source, models_dir, Path(models_dir).parent)
        hub = source.kind == "hub"
        chosen = ct2.engine_for(source, engine)
        try:
            # A bar for a sub-second load from disk is noise in the chat; a Hub download keeps its bar.
            with _progress_bars(shown=hub):
                tokenizer = AutoTokenizer.from_pretrained(source.target, **source.options)
                generator = _load_ctranslate2(source, engine, lanes) if chosen == "ctranslate2" else None
                if generator is None:
                    model = _load_transformers(source)
                    config, generation = model.config, model.generation_config
                else:
                    config = AutoConfig.from_pretrained(source.target)
                    generation = _generation_config(source.target, config)
        except (OSError, ValueError, ImportError) as exc:
            where = f"'{source.name}' (not under {models_dir}, not a file)" if hub else source.target
            raise ModelError(f"Could not load the local model {where}: {exc}. {PULL_HINT}") from exc
        stop_ids = _stop_ids(generation, config, tokenizer)
        # The model's own generation config may ask for a repetition penalty (`models pull smollm2` sets one, or
        # it loops on its own phrases); each engine applies it as its library does (`bot.models.ct2` says how).
        penalty = getattr(generation, "repetition_penalty", None) or 1.0
        if generator is None:
            worker = BatchWorker(model, stop_ids, max_batch=max_batch, max_waiting=max_waiting,
                                 repetition_penalty=penalty)
        else:
            worker = ct2.CT2Worker(generator, tokenizer, stop_ids, repetition_penalty=penalty, max_batch=max_batch,
                                   max_waiting=max_waiting, lanes=lanes)
        window = int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings", None)
                     or tokenizer.model_max_length)
        log.info("loaded local model %s with %s", source.name, worker.engine)
        return cls(source.name, tokenizer, worker, window)

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
        """Stop the worker and free the weights' memory (RAM, or GPU memory back to the driver)."""
        self.worker.close()
        gc.collect()  # modules hold reference cycles: without a collection the weights outlive the close
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _strip_specials(self, text: str) -> str:
        """Users typing `<|im_end|>` must not be able to end their turn and speak as the assistant."""
        for token in self._specials:
            text = text.replace(token, "")
        return text


def _load_ctranslate2(source: LocalSource, wanted: ct2.Engine, lanes: int):
    """The CTranslate2 generator, or None where converting failed (a read-only folder, say) and `wanted` lets
    transformers serve instead: a model that answers slowly beats one that does not answer."""
    try:
        return ct2.load_generator(Path(source.target), lanes=lanes)
    except ModelError as exc:
        if wanted == "ctranslate2":
            raise
        log.warning("serving %s with transformers: %s", source.name, exc)
        return None


def _generation_config(folder: str, config) -> GenerationConfig:
    """What `from_pretrained` would give the model: its generation_config.json, else its config's defaults."""
    try:
        return GenerationConfig.from_pretrained(folder)
    except OSError:
        return GenerationConfig.from_model_config(config)


def _load_transformers(source: LocalSource):
    _limit_threads()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = "auto" if device == "cuda" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(source.target, dtype=dtype, **source.options).to(device)
    return model.eval()


def _stop_ids(generation, config, tokenizer) -> set[int]:
    ids: set[int] = set()
    for source in (generation, config, tokenizer):
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
