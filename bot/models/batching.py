"""Continuous batching: many conversations share one local model, one forward pass per step.

A single worker thread owns the model. Requests wait in a bounded queue; at each step boundary the worker
admits waiting requests, runs their prompts through one prefill pass, and merges their KV caches into the
running batch by left-padding (every row stays right-aligned, padding masked out, positions tracked per
row). Then one decode pass advances every active sequence by a token. Finished or abandoned sequences
leave the batch between steps, so a short reply never waits for a long one.

Greedy output for a request is the same whether it runs alone or in a batch: the attention mask hides the
padding and each row gets its own position ids, exactly like `generate` with left padding.
"""
from __future__ import annotations

import asyncio
import atexit
import inspect
import logging
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from bot.models.base import Chunk, GenParams, ModelBusy, ModelError, Usage

log = logging.getLogger(__name__)

# Forward passes of every local model in the process take turns, so two models never fight over the cores.
COMPUTE_LOCK = threading.Lock()


class TextStream:
    """Turns generated token ids into text that is safe to show: no half-decoded UTF-8 (BPE merges can split
    a character across tokens), and nothing that might be the start of a stop string until it is known not
    to be. Uses the prefix/read offsets of text-generation-inference so each step decodes a few tokens only."""

    def __init__(self, tokenizer, stops: tuple[str, ...]):
        self._tokenizer = tokenizer
        self._stops = tuple(s for s in stops if s)
        self._ids: list[int] = []
        self._prefix = 0
        self._read = 0
        self.text = ""
        self._sent = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; return the text that became safe to emit (possibly empty)."""
        self._ids.append(token_id)
        decode = self._tokenizer.decode
        before = decode(self._ids[self._prefix:self._read], skip_special_tokens=True)
        after = decode(self._ids[self._prefix:], skip_special_tokens=True)
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before):]
            self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string completing."""
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if self.stopped:
            return ""
        hits = [i for i in (self.text.find(s, self._sent) for s in self._stops) if i >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif final:
            end = len(self.text)
        else:
            end = len(self.text) - self._held()
        out, self._sent = self.text[self._sent:end], max(self._sent, end)
        return out

    def _held(self) -> int:
        """Length of the longest tail of the text that could still grow into a stop string."""
        tail = self.text[self._sent:]
        return max((k for s in self._stops for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)


@dataclass(eq=False)
class Request:
    """One conversation's generation; the worker thread fills it, the event loop drains `queue`."""

    prompt_ids: list[int]
    params: GenParams
    max_new_tokens: int  # no more than the context window has room for: the worker knows no window
    text: TextStream
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: bool = False
    generated: int = 0
    output_ids: list[int] = field(default_factory=list)  # the reply so far: the penalty's and a restart's input
    position: int = 0  # the position id of the next token fed to the model
    next_token: int = -1  # sampled but not yet in the KV cache

    def send(self, item: Chunk | BaseException) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the conversation's event loop has closed: nobody is listening
            self.cancelled = True

    def accept(self, token: int, stop_ids: set[int]) -> bool:
        """Take the next generated token and stream the text it makes safe to show; the reply ends (last chunk,
        with usage) on an end-of-turn token, a stop string or the token limit. True once it has ended: both
        engines feed tokens through here, so they end replies alike."""
        self.generated += 1
        self.output_ids.append(token)
        finish = None
        piece = ""
        if token in stop_ids:
            finish = "stop"
        else:
            piece = self.text.push(token)
            if self.text.stopped:
                finish = "stop"
            elif self.generated >= self.max_new_tokens:
                finish = "length"
        if finish and not self.text.stopped:
            piece += self.text.flush()
        if piece:
            self.send(Chunk(text=piece))
        if finish:
            self.send(Chunk(finish_reason=finish, usage=Usage(len(self.prompt_ids), self.generated)))
            self.cancelled = True
        return finish is not None


def admit(waiting: deque, max_waiting: int, in_flight: int) -> deque:
    """The waiting line with room for one more request, or ModelBusy; callers who gave up waiting hold no place."""
    if len(waiting) >= max_waiting:
        waiting = deque(r for r in waiting if not r.cancelled)
    if len(waiting) >= max_waiting:
        busy = len(waiting) + in_flight
        raise ModelBusy(f"The local model is busy with {busy} conversations; try again in a moment.")
    return waiting


class BatchWorker:
    """The thread that owns a model and serves every request to it in one shared batch."""

    engine = "transformers"

    def __init__(self, model, stop_ids: set[int], *, max_batch: int = 8, max_waiting: int = 32,
                 repetition_penalty: float = 1.0):
        self.model = model
        self.repetition_penalty = repetition_penalty
        # transformers 5 renamed `past_key_values` to `cache` (the old name goes in 5.40); older releases lack it.
        self._cache_kwarg = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        self.stop_ids = stop_ids
        # Sliding-window and other special caches cannot be merged by padding: serve those one at a time.
        layers = DynamicCache(config=model.config).layers
        self.max_batch = max_batch if all(type(layer) is DynamicLayer for layer in layers) else 1
        self.max_waiting = max_waiting
        self._waiting: deque[Request] = deque()
        self._wake = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        # The running batch: one row per active request, all right-aligned in a left-padded KV cache.
        self._active: list[Request] = []
        self._arrivals: list[Request] = []
        self._cache: DynamicCache | None = None
        self._mask: torch.Tensor | None = None
        self.steps = 0  # forward passes run, for benchmarks and tests

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def queued(self) -> int:
        """Requests waiting for a place in the batch."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Requests in the batch, generating."""
        return len(self._active) + len(self._arrivals)

    def submit(self, request: Request) -> None:
        with self._wake:
            if self._closed:
                raise ModelError("The local model has been shut down.")
            self._waiting = admit(self._waiting, self.max_waiting, self.in_flight)
            self._waiting.append(request)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="personabot-local-model", daemon=True)
                self._thread.start()
                # Stop the thread before the interpreter tears torch down under it (which aborts the process).
                atexit.register(close_at_exit, weakref.ref(self))
            self._wake.notify()

    def close(self) -> None:
        """Stop the thread, then let go of the model and the batch's KV cache, so their memory can be freed even
        while something still holds this worker."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        if self._thread is not None:
            self._thread.join()
        self.model, self._active, self._cache, self._mask = None, [], None, None

    def _run(self) -> None:
        with torch.inference_mode():
            while True:
                with self._wake:
                    while not self._closed and not self._waiting and not self._active:
                        self._wake.wait()
                    if self._closed:
                        break
                    self._arrivals = arrivals = []
                    while self._waiting and len(self._active) + len(arrivals) < self.max_batch:
                        request = self._waiting.popleft()
                        if not request.cancelled:
                            arrivals.append(request)
                try:
                    with COMPUTE_LOCK:
                        if arrivals:
                            self._prefill(arrivals)
                        self._drop_finished()
                        if self._active:
                            self._decode()
                            self._drop_finished()
                except Exception:  # a failed step fails the requests in it, never the worker
                    log.exception("local model step failed")
                    for request in self._active + arrivals:
                        request.send(ModelError("The local model failed on this reply; the server log has details."))
                    self._active, self._cache, self._mask = [], None, None
                self._arrivals = []
        for request in self._active + list(self._waiting):
            request.send(ModelError("The local model has been shut down."))

    def _prefill(self, arrivals: list[Request]) -> None:
        width = max(len(r.prompt_ids) for r in arrivals)
        pad = self.model.config.pad_token_id or 0
        ids = torch.tensor([[pad] * (width - len(r.prompt_ids)) + r.prompt_ids for r in arrivals], device=self.device)
        mask = torch.tensor([[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in arrivals],
                            device=self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                         logits_to_keep=1)
        self.steps += 1
        for r in arrivals:
            r.position = len(r.prompt_ids)
        self._emit(arrivals, out.logits[:, -1, :])
        self._merge(arrivals, self._cache_of(out), mask)

    def _decode(self) -> None:
        ids = torch.tensor([[r.next_token] for r in self._active], device=self.device)
        positions = torch.tensor([[r.position] for r in self._active], device=self.device)
        self._mask = torch.cat([self._mask, self._mask.new_ones(len(self._active), 1)], dim=-1)
        out = self.model(input_ids=ids, attention_mask=self._mask, position_ids=positions,
                         use_cache=True, **{self._cache_kwarg: self._cache})
        self.steps += 1
        self._cache = self._cache_of(out)
        for r in self._active:
            r.position += 1
        self._emit(self._active, out.logits[:, -1, :])

    def _cache_of(self, out) -> DynamicCache:
        return getattr(out, self._cache_kwarg)

    def _emit(self, rows: list[Request], logits: torch.Tensor) -> None:
        """Sample each row's next token with its own settings and stream what it adds to the reply."""
        tokens = sample(logits, rows, self.repetition_penalty, self.stop_ids).tolist()
        for r, token in zip(rows, tokens):
            r.next_token = token
            r.accept(token, self.stop_ids)

    def _merge(self, arrivals: list[Request], cache: DynamicCache, mask: torch.Tensor) -> None:
        if not self._active:
            self._active, self._cache, self._mask = list(arrivals), cache, mask
            return
        width = max(self._mask.shape[-1], mask.shape[-1])
        for mine, theirs in zip(self._cache.layers, cache.layers):
            mine.keys = torch.cat([_left_pad(mine.keys, width, -2), _left_pad(theirs.keys, width, -2)])
            mine.values = torch.cat([_left_pad(mine.values, width, -2), _left_pad(theirs.values, width, -2)])
        self._mask = torch.cat([_left_pad(self._mask, width, -1), _left_pad(mask, width, -1)])
        self._active.extend(arrivals)

    def _drop_finished(self) -> None:
        keep = [i for i, r in enumerate(self._active) if not r.cancelled]
        if len(keep) == len(self._active):
            return
        if not keep:
            self._active, self._cache, self._mask = [], None, None
            return
        index = torch.tensor(keep, device=self.device)
        self._mask = self._mask[index]
        # Columns that are padding in every remaining row are dead weight: cut them.
        start = int(self._mask.any(dim=0).int().argmax())
        self._mask = self._mask[:, start:]
        for layer in self._cache.layers:
            layer.keys = layer.keys[index, :, start:]
            layer.values = layer.values[index, :, start:]
        self._active = [self._active[i] for i in keep]


def penalize_repeats(logits: torch.Tensor, rows: list[Request], penalty: float, spared: set[int]) -> torch.Tensor:
    """CTRL's repetition penalty, as transformers' `RepetitionPenaltyLogitsProcessor` applies it: every token
    already in the row's prompt or reply has its logit divided by `penalty` (multiplied where negative).

    Except the `spared` ones, the end-of-turn tokens: every chat prompt holds them, so penalising them makes
    the model talk on past the end of its answer (SmolLM2 ran every reply to the length limit)."""
    seen = [r.prompt_ids + r.output_ids for r in rows]
    width = max(map(len, seen))
    # Short rows are padded with a token they already hold: a repeated index gets the same value written twice.
    index = torch.tensor([ids + ids[:1] * (width - len(ids)) for ids in seen], device=logits.device)
    picked = logits.gather(1, index)
    penalized = logits.scatter(1, index, torch.where(picked > 0, picked / penalty, picked * penalty))
    if spared:
        columns = torch.tensor(sorted(spared), device=logits.device)
        penalized[:, columns] = logits[:, columns]
    return penalized


def close_at_exit(worker: weakref.ref) -> None:
    """Stop a worker's threads before the interpreter tears down the library they are running in."""
    if (alive := worker()) is not None:
        alive.close()


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def sample(logits: torch.Tensor, rows: list[Request], repetition_penalty: float = 1.0,
           spared: set[int] = frozenset()) -> torch.Tensor:
    """Next token per row: argmax where temperature is 0, else temperature + nucleus (top-p) sampling, after the
    repetition penalty (applied first, as `generate` applies it)."""
    logits = logits.float()
    if repetition_penalty != 1.0:
        logits = penalize_repeats(logits, rows, repetition_penalty, spared)
    greedy = logits.argmax(dim=-1)
    if all(r.params.temperature <= 0 for r in rows):
        return greedy
    temps = torch.tensor([max(r.params.temperature, 1e-5) for r in rows], device=logits.device)
    top_p = torch.tensor([r.params.top_p for r in rows], device=logits.device)
    probs = torch.softmax(logits / temps[:, None], dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = (sorted_probs.cumsum(dim=-1) - sorted_probs) > top_p[:, None]  # the top token always stays
    sorted_probs = sorted_probs.masked_fill(outside, 0.0)
    picked = order.gather(-1, torch.multinomial(sorted_probs, 1)).squeeze(-1)
    is_greedy = torch.tensor([r.params.temperature <= 0 for r in rows], device=logits.device)
    return torch.where(is_greedy, greedy, picked)
