"""Local generation: the CTranslate2 engine against today's transformers engine and against each library's raw
calls, all in one run on the same model and prompts.

    python bench/generate.py                      # SmolLM2 when pulled, else a random-init GPT-2 (124M-sized)
    python bench/generate.py --model data/models/smollm2

Every reply is forced to the same length (end-of-sequence ignored) so all sides do identical work.
  - one stream: tokens/s of `model.generate`, the transformers engine, raw `generate_tokens`, the CTranslate2
    engine (targets: >= 3x the transformers engine, >= 0.95x raw);
  - eight chats arriving one after another: aggregate tokens/s of each engine (target: CTranslate2 >= 2x
    transformers) and the slowest first token among them, beside the raw batched calls with all eight
    started together (which no server sees: chats do not arrive together);
  - the first token of a 1,000-token prompt; the peak RSS of a process serving the eight chats with each engine;
  - greedy agreement: replies with the same tokens from both engines, on the tiny test GPT-2 and on this model.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import ctranslate2
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bot.config import Settings  # noqa: E402
from bot.models import ct2  # noqa: E402
from bot.models.base import GenParams  # noqa: E402
from bot.models.local import LocalChatModel  # noqa: E402

QUESTIONS = [
    "Tell me a joke about statistics.",
    "What is the median and why is it robust to outliers?",
    "Hi!",
    "Explain overfitting to a new data scientist in two sentences, with an example from house prices.",
    "Why did the regression line break up?",
    "Plot twist: the p-value was 0.051. What now?",
    "Give me three tips for clean data.",
    "What's the difference between a mean and a mode, and when would you use each one?",
    "What is the capital of France?",
    "Write a haiku about spreadsheets.",
    "How do I make a good cup of tea?",
    "What is a neural network, in one sentence?",
    "Name three planets.",
    "Why is the sky blue?",
    "Suggest a name for a pet goldfish.",
    "What does CPU stand for?",
    "How many days are in a leap year?",
    "Give me a fun fact about octopuses.",
    "What is 12 times 12?",
    "Translate 'good morning' into French.",
]
ENGINES = ("transformers", "ctranslate2")


def gpt2_sized(folder: Path) -> Path:
    """GPT-2 small's shape with random weights, plus the tiny test tokenizer (ids it lacks decode to nothing)."""
    from tiny_gpt2 import build_tiny_gpt2
    from transformers import GPT2Config, GPT2LMHeadModel

    build_tiny_gpt2(folder, train_steps=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(folder)
    return folder


def chats(n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a friendly, concise assistant."},
             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def long_prompt(chat: LocalChatModel, tokens: int) -> list[dict]:
    """A conversation of exactly `tokens` prompt tokens (a long pasted text), as the model counts them."""
    words = ("The median is robust to outliers, the mean is not, and a good plot shows both. " * 400).split()
    lo, hi = 0, len(words)
    while lo < hi:  # the most words that still fit
        mid = (lo + hi + 1) // 2
        fits = chat.count_tokens([{"role": "user", "content": " ".join(words[:mid])}]) <= tokens
        lo, hi = (mid, hi) if fits else (lo, mid - 1)
    return [{"role": "user", "content": " ".join(words[:lo])}]


def bare_generate(chat: LocalChatModel, batch: list[list[dict]], tokens: int) -> float:
    """Tokens/s of transformers' `model.generate` on these prompts, all started together (left padded)."""
    ids = [chat.prompt_ids(m) for m in batch]
    width = max(map(len, ids))
    pad = chat.model.config.pad_token_id or 0
    input_ids = torch.tensor([[pad] * (width - len(i)) + i for i in ids], device=chat.model.device)
    mask = torch.tensor([[0] * (width - len(i)) + [1] * len(i) for i in ids], device=chat.model.device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = chat.model.generate(input_ids=input_ids, attention_mask=mask, max_new_tokens=tokens,
                                  min_new_tokens=tokens, do_sample=False, pad_token_id=pad)
    elapsed = time.perf_counter() - start
    assert out.shape[1] - width == tokens
    return len(ids) * tokens / elapsed


def raw_ct2(generator: ctranslate2.Generator, chat: LocalChatModel, batch: list[list[dict]], tokens: int) -> float:
    """Tokens/s of CTranslate2 called directly: `generate_tokens` for one prompt, `generate_batch` for more."""
    starts = [chat.tokenizer.convert_ids_to_tokens(chat.prompt_ids(m)) for m in batch]
    start = time.perf_counter()
    if len(starts) == 1:
        made = sum(1 for _ in generator.generate_tokens(starts[0], max_length=tokens, end_token=[]))
    else:
        results = generator.generate_batch(starts, max_length=tokens, end_token=[], include_prompt_in_result=False)
        made = sum(len(r.sequences_ids[0]) for r in results)
    elapsed = time.perf_counter() - start
    assert made == len(starts) * tokens
    return made / elapsed


async def served(chat: LocalChatModel, batch: list[list[dict]], tokens: int, stagger: float) -> tuple[float, float]:
    """Aggregate tokens/s with chat i arriving `i * stagger` s after the first, and the slowest first token (s)."""
    params = GenParams(temperature=0, max_tokens=tokens)

    async def one(messages, delay: float) -> tuple[int, float]:
        await asyncio.sleep(delay)
        asked, first = time.perf_counter(), None
        async for chunk in chat.stream(messages, params):
            first = first or time.perf_counter() - asked
            if chunk.finish_reason:
                assert chunk.finish_reason == "length"
                return chunk.usage.completion_tokens, first
        return 0, first

    start = time.perf_counter()
    done = await asyncio.gather(*(one(m, i * stagger) for i, m in enumerate(batch)))
    return sum(n for n, _ in done) / (time.perf_counter() - start), max(first for _, first in done)


async def first_token(chat: LocalChatModel, messages: list[dict]) -> float:
    start = time.perf_counter()
    async for chunk in chat.stream(messages, GenParams(temperature=0, max_tokens=1)):
        if chunk.finish_reason:
            return time.perf_counter() - start
    raise AssertionError("no reply")


def raw_first_token(chat: LocalChatModel, generator: ctranslate2.Generator, messages: list[dict]) -> tuple[float, float]:
    """Seconds to the first token of `model.generate` and of raw `generate_batch`."""
    ids = chat.prompt_ids(messages)
    start = time.perf_counter()
    with torch.inference_mode():
        chat.model.generate(torch.tensor([ids]), max_new_tokens=1, do_sample=False)
    bare = time.perf_counter() - start
    start = time.perf_counter()
    generator.generate_batch([chat.tokenizer.convert_ids_to_tokens(ids)], max_length=1, include_prompt_in_result=False)
    return bare, time.perf_counter() - start


async def greedy_replies(chat: LocalChatModel, conversations: list[list[dict]], tokens: int) -> list[list[int]]:
    """Each conversation's greedy reply, one at a time, as token ids (re-encoded from the streamed text)."""
    replies = []
    for messages in conversations:
        text = "".join([c.text async for c in chat.stream(messages, GenParams(temperature=0, max_tokens=tokens))])
        replies.append(chat.tokenizer(text, add_special_tokens=False).input_ids)
    return replies


async def agreement(folder: Path, conversations: list[list[dict]], tokens: int) -> str:
    loaded = [LocalChatModel.load(str(folder), folder.parent, engine=engine) for engine in ENGINES]
    try:
        ours, theirs = [await greedy_replies(chat, conversations, tokens) for chat in loaded]
    finally:
        for chat in loaded:
            chat.close()
    same = sum(a == b for a, b in zip(ours, theirs))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(ours, theirs)]
    return f"{same}/{len(ours)} identical, first {statistics.median(prefix):.0f} tokens shared (median)"


def peak_rss(folder: Path, engine: str, tokens: int, stagger: float, lanes: int) -> float:
    """MB: a fresh process loads `folder` with `engine` and serves the eight staggered chats (see `--rss-of`)."""
    out = subprocess.run([sys.executable, __file__, "--model", str(folder), "--tokens", str(tokens), "--lanes",
                          str(lanes), "--rss-of", engine, "--stagger", str(stagger)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.split()[-1])


def rss_child(folder: Path, engine: str, tokens: int, stagger: float, lanes: int) -> None:
    chat = LocalChatModel.load(str(folder), folder.parent, engine=engine, lanes=lanes)
    chat.worker.stop_ids = set()
    asyncio.run(served(chat, chats(8), tokens, stagger))
    # VmHWM, not ru_maxrss: a child's ru_maxrss starts at the RSS of the parent it was forked from.
    status = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    print(int(status["VmHWM"].split()[0]) / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: data/models/smollm2 when pulled, else a "
                                        "random-init GPT-2 small)")
    parser.add_argument("--tokens", type=int, default=128, help="tokens generated per reply")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lanes", type=int, default=2, help="CTranslate2 lanes (replicas decoding in parallel)")
    parser.add_argument("--rss-of", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--stagger", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_of:
        return rss_child(Path(args.model), args.rss_of, args.tokens, args.stagger, args.lanes)

    pulled = Settings().models_dir / "smollm2"
    with tempfile.TemporaryDirectory() as tmp:
        if args.model or pulled.is_dir():
            folder = Path(args.model or pulled).resolve()
        else:
            folder = gpt2_sized(Path(tmp) / "gpt2")
        report(folder, args)


def report(folder: Path, args: argparse.Namespace) -> None:
    from tiny_gpt2 import build_tiny_gpt2, conversations

    started = time.perf_counter()
    ct2.converted(folder)
    print(f"model: {folder.name}  cores: {ct2.cpu_cores()}  tokens per reply: {args.tokens}  lanes: {args.lanes}  "
          f"(CTranslate2 copy ready in {time.perf_counter() - started:.1f} s)")
    with tempfile.TemporaryDirectory() as tmp:
        tiny = build_tiny_gpt2(Path(tmp) / "tiny")
        tiny_chats = [[{"role": "user", "content": turn["content"]}] for c in conversations() for turn in c]
        print(f"greedy, tiny GPT-2:   {asyncio.run(agreement(tiny, tiny_chats, 40))}")
    print(f"greedy, {folder.name}:  {asyncio.run(agreement(folder, chats(len(QUESTIONS)), 64))}")

    slow = LocalChatModel.load(str(folder), folder.parent, engine="transformers")
    fast = LocalChatModel.load(str(folder), folder.parent, engine="ctranslate2", lanes=args.lanes)
    # Raw calls get the threads one of the engine's replicas has, so the ratio is what personabot costs.
    raw = ctranslate2.Generator(str(folder / ct2.CONVERTED), compute_type=ct2.QUANTIZATION,
                                intra_threads=max(1, ct2.cpu_cores() // args.lanes))
    for chat in (slow, fast):
        chat.worker.stop_ids = set()  # every reply runs to --tokens, like min_new_tokens on the bare side

    def median(measure) -> float:
        return statistics.median(measure() for _ in range(args.repeats))

    one = chats(1)
    bare_generate(slow, one, 4)  # warm up every path
    raw_ct2(raw, fast, one, 4)
    for chat in (slow, fast):
        asyncio.run(served(chat, one, 4, 0))
    bare1 = median(lambda: bare_generate(slow, one, args.tokens))
    slow1 = median(lambda: asyncio.run(served(slow, one, args.tokens, 0))[0])
    raw1 = median(lambda: raw_ct2(raw, fast, one, args.tokens))
    fast1 = median(lambda: asyncio.run(served(fast, one, args.tokens, 0))[0])
    print(f"one stream:   generate {bare1:6.1f}  transformers engine {slow1:6.1f}  raw generate_tokens {raw1:6.1f}  "
          f"ctranslate2 engine {fast1:6.1f} tok/s  ->  {fast1 / slow1:.2f}x transformers (target >= 3), "
          f"{fast1 / raw1:.2f}x raw (target >= 0.95)")

    eight = chats(8)
    stagger = 2 / bare1  # a new chat every couple of `generate` steps, the same moments for both engines
    bare8 = median(lambda: bare_generate(slow, eight, args.tokens))
    raw8 = median(lambda: raw_ct2(raw, fast, eight, args.tokens))
    runs = {name: [asyncio.run(served(chat, eight, args.tokens, stagger)) for _ in range(args.repeats)]
            for name, chat in (("transformers", slow), ("ctranslate2", fast))}
    (slow8, slow_wait), (fast8, fast_wait) = [sorted(r)[len(r) // 2] for r in runs.values()]
    print(f"eight chats:  transformers engine {slow8:6.1f}  ctranslate2 engine {fast8:6.1f} tok/s  ->  "
          f"{fast8 / slow8:.2f}x (target >= 2); slowest first token {slow_wait * 1000:.0f} / {fast_wait * 1000:.0f} ms "
          f"(chats arrive {stagger * 1000:.0f} ms apart)")
    print(f"              started together: generate {bare8:6.1f}  raw generate_batch {raw8:6.1f} tok/s")

    messages = long_prompt(fast, 1000)
    for chat in (slow, fast):  # warm up at this length
        asyncio.run(first_token(chat, messages))
    bare_first, raw_first = raw_first_token(slow, raw, messages)
    slow_first, fast_first = asyncio.run(first_token(slow, messages)), asyncio.run(first_token(fast, messages))
    print(f"first token of a {fast.count_tokens(messages)}-token prompt:  generate {bare_first * 1000:.0f}  "
          f"transformers engine {slow_first * 1000:.0f}  raw generate_batch {raw_first * 1000:.0f}  "
          f"ctranslate2 engine {fast_first * 1000:.0f} ms")
    slow.close()
    fast.close()
    rss = {engine: peak_rss(folder, engine, args.tokens, stagger, args.lanes) for engine in ENGINES}
    print(f"peak RSS serving the eight chats:  transformers {rss['transformers']:.0f} MB  "
          f"ctranslate2 {rss['ctranslate2']:.0f} MB")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
