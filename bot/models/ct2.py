"""The CTranslate2 engine: local models converted once to int8, 2.4 times transformers' speed on a CPU.

A model folder is converted the first time it is served (`models pull` and `finetune` convert right after they
write one) into `<folder>/ctranslate2/`, beside the weights it came from; a record of those weights' sizes and
times marks the copy stale when they change. Architectures CTranslate2 cannot convert, `.gguf` files and Hub ids
stay on the transformers engine (`bot.models.batching`), which is also what `finetune` trains with.

CTranslate2 cannot add a sequence to a running batch: `generate_batch` forwards the prompts in one pass (as far
as the shortest reaches), then decodes all rows together. So concurrent chats share work in *lanes*: a lane is a
run of `generate_batch` calls ("rounds") over the rows that sample alike. A newcomer joins a lane whose contexts
are about as long as its own: the lane's round stops at its next token and the next round starts with every
row's prompt plus what it has generated so far, the newcomer included, so nobody waits for anybody's reply to
end; the price is forwarding those contexts once more. A newcomer that fits no lane (sampled differently, or a
context far longer or shorter, whose excess CTranslate2 would feed one token per step) gets a lane of its own;
lanes run in parallel on replicas of the model that share its weights. Past `lanes` of them it waits.

The model's repetition penalty is CTranslate2's: it counts what the reply says, not the prompt (transformers
counts both and spares the end-of-turn tokens), so end-of-turn tokens, which every prompt holds, are never
penalised. After a restart it counts what that round decodes: the reply since, and the end of each context that
CTranslate2 feeds one step at a time. int8 arithmetic changes some greedy tokens against transformers, and so can
the batch a reply is decoded in; on the tiny test GPT-2 every token is the same.
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import shutil
import sys
import threading
import weakref
from collections import deque
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Literal

import ctranslate2

from bot.models.base import GenParams, ModelError
from bot.models.batching import Request, admit, close_at_exit
from bot.models.resolve import LocalSource

log = logging.getLogger(__name__)

Engine = Literal["auto", "ctranslate2", "transformers"]
CONVERTED = "ctranslate2"
RECORD = "personabot-ct2.json"
QUANTIZATION = "int8"
# Contexts in one lane differ by at most this many tokens: CTranslate2 feeds the longer ones' excess one token
# per decoding step, during which those rows produce nothing (48 steps is well under a second).
MAX_SPREAD = 48
# Converting takes about a second per 20 MB of weights: below this a progress line is noise in the chat.
ANNOUNCE_BYTES = 20_000_000


def engine_for(source: LocalSource, wanted: Engine = "auto") -> Literal["ctranslate2", "transformers"]:
    """The engine that serves `source`: CTranslate2 wherever it can, unless `wanted` says otherwise; a forced
    CTranslate2 that cannot be raises ModelError saying why."""
    if wanted == "transformers":
        return "transformers"
    if source.kind == "gguf":
        reason = "a .gguf file is served by transformers (`personabot models pull` converts one to a folder)"
    elif source.kind == "hub":
        reason = "a Hub id has no folder to keep a converted copy beside"
    else:
        architecture = _architecture(Path(source.target))
        reason = None if architecture in _convertible() else f"CTranslate2 does not convert {architecture}"
    if reason is None:
        return "ctranslate2"
    if wanted == "ctranslate2":
        raise ModelError(f"{source.name} cannot run on CTranslate2: {reason}. Set PERSONABOT_LOCAL_ENGINE=auto.")
    return "transformers"


def convert(folder: Path) -> Path:
    """Write `folder`'s CTranslate2 copy (int8) into `<folder>/ctranslate2`, replacing a stale one whole."""
    from ctranslate2.converters import TransformersConverter

    folder = Path(folder)
    target, staging = folder / CONVERTED, folder / f".{CONVERTED}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        TransformersConverter(str(folder), low_cpu_mem_usage=True).convert(str(staging), quantization=QUANTIZATION)
    except (OSError, ValueError, NotImplementedError) as exc:
        shutil.rmtree(staging, ignore_errors=True)
        raise ModelError(f"Could not convert {folder.name} for CTranslate2: {exc}") from exc
    (staging / RECORD).write_text(json.dumps({"quantization": QUANTIZATION, "weights": _fingerprint(folder)}))
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    return target


def converted(folder: Path) -> Path:
    """`folder`'s CTranslate2 copy, converted now if it is missing or older than the weights (with a line on
    stderr where that takes more than a moment)."""
    folder = Path(folder)
    target, weights = folder / CONVERTED, _fingerprint(folder)
    try:
        if json.loads((target / RECORD).read_text())["weights"] == weights:
            return target
    except (OSError, ValueError, KeyError):
        pass
    if sum(size for size, _ in weights.values()) > ANNOUNCE_BYTES:
        print(f"Converting {folder.name} for CTranslate2 ({QUANTIZATION}, once) into {target}...", file=sys.stderr)
    return convert(folder)


def load_generator(folder: Path, *, lanes: int) -> ctranslate2.Generator:
    """The converted model on the GPU when CTranslate2 sees one, else on the CPU cores this process may use,
    split between `lanes` replicas that share one copy of the weights."""
    on_gpu = ctranslate2.get_cuda_device_count() > 0
    return ctranslate2.Generator(
        str(converted(folder)), device="cuda" if on_gpu else "cpu",
        compute_type=f"{QUANTIZATION}_float16" if on_gpu else QUANTIZATION,
        inter_threads=lanes, intra_threads=max(1, cpu_cores() // lanes))


@dataclass(eq=False)
class _Lane:
    """Rows decoded together by one `generate_batch` at a time; `joining` enter when the current round ends."""

    sampling: tuple[float, float]
    rows: list[Request] = field(default_factory=list)
    joining: list[Request] = field(default_factory=list)

    def spread_with(self, request: Request) -> int:
        lengths = [len(r.prompt_ids) + r.generated for r in self.rows + self.joining] + [len(request.prompt_ids)]
        return max(lengths) - min(lengths)


class CT2Worker:
    """Serves every request to one CTranslate2 model in lanes of shared rounds (see the module docstring)."""

    engine = "ctranslate2"

    def __init__(self, generator: ctranslate2.Generator, tokenizer, stop_ids: set[int], *,
                 repetition_penalty: float = 1.0, max_batch: int = 8, max_waiting: int = 32, lanes: int = 2):
        self.model = generator
        self._tokens = tokenizer.convert_ids_to_tokens
        self.stop_ids = stop_ids
        self.repetition_penalty = repetition_penalty
        self.max_batch, self.max_waiting, self.lanes = max_batch, max_waiting, lanes
        self._lock = threading.Lock()
        self._waiting: deque[Request] = deque()
        self._lanes: list[_Lane] = []
        self._threads: list[threading.Thread] = []
        self._closed = False
        self.rounds = 0  # `generate_batch` calls, for benchmarks and tests
        atexit.register(close_at_exit, weakref.ref(self))  # end rounds before the interpreter goes

    @property
    def queued(self) -> int:
        """Requests waiting for a lane."""
        return len(self._waiting)

    @property
    def in_flight(self) -> int:
        """Requests in a lane, generating."""
        return sum(len(lane.rows) + len(lane.joining) for lane in self._lanes)

    def submit(self, request: Request) -> None:
        with self._lock:
            if self._closed:
                raise ModelError("The local model has been shut down.")
            self._waiting = admit(self._waiting, self.max_waiting, self.in_flight)
            self._waiting.append(request)
            self._place()

    def close(self) -> None:
        """End every round at its next token, stop the lanes, and let go of the model so its memory is freed."""
        with self._lock:
            self._closed = True
            threads = list(self._threads)
        for thread in threads:
            thread.join()
        for request in self._waiting:
            request.send(ModelError("The local model has been shut down."))
        self._waiting.clear()
        self.model = None

    def _place(self) -> None:
        """Under the lock: hand waiting requests, oldest first, to a lane that can take them."""
        while self._waiting:
            request = self._waiting[0]
            lane = None if request.cancelled else self._lane_for(request)
            if lane is None and not request.cancelled:
                return
            self._waiting.popleft()
            if lane is not None:
                lane.joining.append(request)

    def _lane_for(self, request: Request) -> _Lane | None:
        sampling = _sampling(request.params)
        fits = [lane for lane in self._lanes if lane.sampling == sampling
                and len(lane.rows) + len(lane.joining) < self.max_batch and lane.spread_with(request) <= MAX_SPREAD]
        if fits:
            return min(fits, key=lambda lane: lane.spread_with(request))
        if len(self._lanes) >= self.lanes:
            return None
        lane = _Lane(sampling)
        self._lanes.append(lane)
        thread = threading.Thread(target=self._run, args=(lane,), name="personabot-ct2-lane", daemon=True)
        self._threads.append(thread)
        thread.start()
        return lane

    def _run(self, lane: _Lane) -> None:
        while True:
            with self._lock:
                lane.rows = [r for r in lane.rows + lane.joining if not r.cancelled]
                lane.joining = []
                if self._closed or not lane.rows:
                    self._lanes.remove(lane)
                    self._threads.remove(threading.current_thread())
                    if self._closed:
                        for request in lane.rows:
                            request.send(ModelError("The local model has been shut down."))
                    else:
                        self._place()  # a lane is free: the first waiting request may take it
                    return
            try:
                self._round(lane)
            except Exception:  # a failed round fails the replies in it, never the lane
                log.exception("CTranslate2 round failed")
                for request in lane.rows:
                    request.send(ModelError("The local model failed on this reply; the server log has details."))
                    request.cancelled = True

    def _round(self, lane: _Lane) -> None:
        """One `generate_batch` over the lane's rows, each continuing from its prompt plus its reply so far; it
        ends when every row has ended or, at the next token, when someone is waiting to join."""
        rows = lane.rows
        temperature, top_p = lane.sampling

        def step(result) -> bool:
            request = rows[result.batch_id]
            if request.cancelled:
                return True
            return request.accept(result.token_id, self.stop_ids) or bool(lane.joining) or self._closed

        self.rounds += 1
        self.model.generate_batch(
            [self._tokens(r.prompt_ids + r.output_ids) for r in rows],
            max_length=max(r.max_new_tokens - r.generated for r in rows), include_prompt_in_result=False,
            end_token=sorted(self.stop_ids), repetition_penalty=self.repetition_penalty,
            sampling_topk=1 if temperature <= 0 else 0, sampling_temperature=temperature if temperature > 0 else 1,
            sampling_topp=top_p, callback=step)


def _sampling(params: GenParams) -> tuple[float, float]:
    """What one `generate_batch` call must share: greedy is greedy whatever its top-p."""
    return (0.0, 1.0) if params.temperature <= 0 else (params.temperature, params.top_p)


def _fingerprint(folder: Path) -> dict[str, list[int]]:
    """Size and modification time of the files a conversion reads (the model card and README excepted)."""
    skip = {"personabot-model.json", "README.md"}
    return {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(folder.iterdir())
            if f.is_file() and f.name not in skip}


def _architecture(folder: Path) -> str:
    try:
        return json.loads((folder / "config.json").read_text())["model_type"]
    except (OSError, ValueError, KeyError):
        return "this folder (no config.json with a model_type)"


def cpu_cores() -> int:
    """The cores this process may use (a container's share, not the host's), or what OMP_NUM_THREADS says."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return int(os.environ["OMP_NUM_THREADS"])
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@cache
def _convertible() -> set[str]:
    """The transformers `model_type`s CTranslate2's converter knows (it registers loaders by config class)."""
    from ctranslate2.converters import transformers as converters
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    known = set(getattr(converters, "_MODEL_LOADERS", {}))
    return {model_type for model_type, config in CONFIG_MAPPING_NAMES.items() if config in known}
