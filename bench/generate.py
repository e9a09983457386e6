"""How much of the model's raw speed the local backend keeps, one chat and eight at once.

    python bench/generate.py                      # random-init GPT-2 (124M-sized), no download
    python bench/generate.py --model data/models/smollm2

Figures are ratios against bare `model.generate` run in the same process on the same prompts:
  - one stream: LocalChatModel tokens/s vs `generate` of one prompt (target >= 0.95);
  - eight chats arriving at different times: aggregate tokens/s vs one batched `generate` of the same eight
    prompts started together (target >= 0.8).
Every reply is forced to the same length (end-of-sequence ignored) so both sides do identical work.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path[:0] = [str(Path(__file__).resolve().parents[1]), str(Path(__file__).resolve().parents[1] / "tests")]

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
]


def gpt2_sized(folder: Path) -> Path:
    """GPT-2 small's shape with random weights, plus the tiny test tokenizer (ids it lacks decode to nothing)."""
    from tiny_gpt2 import build_tiny_gpt2
    from transformers import GPT2Config, GPT2LMHeadModel

    build_tiny_gpt2(folder, train_steps=0)
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(bos_token_id=0, eos_token_id=0, pad_token_id=0)).save_pretrained(folder)
    return folder


def prompts(chat: LocalChatModel, n: int) -> list[list[dict]]:
    return [[{"role": "system", "content": "You are a friendly, concise assistant."},
             {"role": "user", "content": QUESTIONS[i % len(QUESTIONS)]}] for i in range(n)]


def bare_generate(chat: LocalChatModel, batch: list[list[dict]], tokens: int) -> float:
    """Tokens/s of `model.generate` on these prompts, all started together (left padded)."""
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


async def served(chat: LocalChatModel, batch: list[list[dict]], tokens: int, stagger: float) -> float:
    """Aggregate tokens/s of LocalChatModel with chat i arriving `i * stagger` seconds after the first."""
    params = GenParams(temperature=0, max_tokens=tokens)

    async def one(messages, delay: float) -> int:
        await asyncio.sleep(delay)
        async for chunk in chat.stream(messages, params):
            if chunk.finish_reason:
                assert chunk.finish_reason == "length"
                return chunk.usage.completion_tokens
        return 0

    start = time.perf_counter()
    counts = await asyncio.gather(*(one(m, i * stagger) for i, m in enumerate(batch)))
    return sum(counts) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="a model folder (default: random-init GPT-2 small)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens generated per reply")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(args.model) if args.model else gpt2_sized(Path(tmp) / "gpt2")
        chat = LocalChatModel.load(str(folder), folder.parent)
    chat.worker.stop_ids = set()  # every reply runs to --tokens, like min_new_tokens on the bare side
    print(f"model: {args.model or 'GPT-2 small shape, random init'}  torch threads: {torch.get_num_threads()}  "
          f"tokens per reply: {args.tokens}")

    one_prompt = prompts(chat, 1)
    bare_generate(chat, one_prompt, 4)  # warm up both paths
    asyncio.run(served(chat, one_prompt, 4, 0))

    single_bare = statistics.median(bare_generate(chat, one_prompt, args.tokens) for _ in range(args.repeats))
    single_ours = statistics.median(asyncio.run(served(chat, one_prompt, args.tokens, 0))
                                    for _ in range(args.repeats))
    print(f"one stream:     generate {single_bare:6.1f} tok/s   personabot {single_ours:6.1f} tok/s   "
          f"ratio {single_ours / single_bare:.2f} (target >= 0.95)")

    eight = prompts(chat, 8)
    stagger = 2 / single_bare  # a new chat every couple of decode steps
    batch_bare = statistics.median(bare_generate(chat, eight, args.tokens) for _ in range(args.repeats))
    batch_ours = statistics.median(asyncio.run(served(chat, eight, args.tokens, stagger))
                                   for _ in range(args.repeats))
    print(f"eight chats:    generate {batch_bare:6.1f} tok/s   personabot {batch_ours:6.1f} tok/s   "
          f"ratio {batch_ours / batch_bare:.2f} (target >= 0.8; chats arrive {stagger * 1000:.0f} ms apart, "
          f"generate starts all eight together)")
    print(f"batching gain:  {batch_ours / single_ours:.2f}x the single-stream rate")
    chat.close()


if __name__ == "__main__":
    main()
