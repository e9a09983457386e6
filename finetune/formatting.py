"""Examples to token ids and labels, rendered exactly as the local backend renders prompts at inference.

A tokenizer with a chat template is trained through that template; one without (GPT-2 and its fine-tunes) is
trained through `bot.models.chat_format` with the tokenizer's end-of-sequence token as end-of-turn marker.
Labels are -100 everywhere except the assistant's replies and the marker that ends them, so the model learns to
answer and to stop, not to imitate users. Plain text trains on every token.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from bot.models import chat_format
from bot.models.base import Message
from finetune.data import DataReport, Example

IGNORE = -100
Features = dict[str, list[int]]


def end_of_turn(tokenizer: Any) -> str:
    """The marker that ends a turn in the project's format: the tokenizer's eos, so generation stops on it."""
    return tokenizer.eos_token or chat_format.DEFAULT_END_OF_TURN


def _template(tokenizer: Any, messages: list[Message], add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def prompt_text(tokenizer: Any, messages: list[Message]) -> str:
    """The prompt the local backend sends for `messages`, ending where the assistant's reply begins."""
    if tokenizer.chat_template:
        return _template(tokenizer, messages, add_generation_prompt=True)
    return chat_format.render(messages, end_of_turn(tokenizer), add_generation_prompt=True)


def chat_segments(tokenizer: Any, messages: list[Message]) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trainable) pieces.

    For a chat template the assistant span of turn i is what rendering messages[:i+1] adds to the generation
    prompt for messages[:i]; this needs no `{% generation %}` markers, so it works with any template whose
    earlier turns render the same whatever follows them (checked, with a clear error otherwise).
    """
    if not tokenizer.chat_template:
        return chat_format.render_segments(messages, end_of_turn(tokenizer))
    full = _template(tokenizer, messages, add_generation_prompt=False)
    pieces: list[tuple[str, bool]] = []
    done = 0
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = _template(tokenizer, messages[:i], add_generation_prompt=True)
        turn = _template(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (turn.startswith(prompt) and full.startswith(turn)):
            raise ValueError("the chat template renders earlier turns differently as the conversation grows, "
                             "so the assistant's tokens cannot be located")
        start, end = len(prompt), len(turn)
        pieces += [(full[done:start], False), (full[start:end], True)]
        done = end
    pieces.append((full[done:], False))
    return [(text, trainable) for text, trainable in pieces if text]


def _tokenize(tokenizer: Any, pieces: list[tuple[str, bool]]) -> Features:
    """Adjacent pieces with the same flag are joined first, so a prompt is tokenized in one piece as it is at
    inference and the reply is tokenized on its own, as the model would generate it."""
    merged: list[tuple[str, bool]] = []
    for text, trainable in pieces:
        if merged and merged[-1][1] == trainable:
            merged[-1] = (merged[-1][0] + text, trainable)
        else:
            merged.append((text, trainable))
    ids: list[int] = []
    labels: list[int] = []
    for text, trainable in merged:
        piece = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += piece
        labels += piece if trainable else [IGNORE] * len(piece)
    return {"input_ids": ids, "labels": labels}


def encode(tokenizer: Any, example: Example, max_length: int) -> list[Features] | str:
    """Token ids and labels for one example, or the reason it cannot train.

    A conversation longer than the context is cut at the end (the first replies are kept); a text passage
    is cut into context-sized blocks, since every block of it is equally worth learning.
    """
    if example.text is not None:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        ids = tokenizer(example.text, add_special_tokens=False)["input_ids"] + eos
        return [{"input_ids": ids[i:i + max_length], "labels": ids[i:i + max_length]} for i in range(0, len(ids), max_length)]
    try:
        features = _tokenize(tokenizer, chat_segments(tokenizer, list(example.messages)))
    except Exception as exc:  # a template that refuses a role, or one we cannot split
        return f"chat template error: {exc}"
    features = {k: v[:max_length] for k, v in features.items()}
    if all(label == IGNORE for label in features["labels"]):
        return f"no assistant tokens within the {max_length}-token context"
    return [features]


def encode_all(tokenizer: Any, examples: list[Example], max_length: int, report: DataReport, pack: bool = False,
               progress: bool = False) -> list[Features]:
    """All examples encoded; those that cannot train are reported, not fatal. With `pack`, everything is
    concatenated and cut into full context-length blocks, trading cross-example attention for no padding."""
    out: list[Features] = []
    for ex in tqdm(examples, desc="tokenizing", unit="example", disable=not progress or len(examples) < 1000):
        encoded = encode(tokenizer, ex, max_length)
        if isinstance(encoded, str):
            report.drop(ex.source, encoded)
            report.kept -= 1
        else:
            out += encoded
    return pack_features(out, max_length) if pack else out


def pack_features(features: list[Features], block: int) -> list[Features]:
    ids = [t for f in features for t in f["input_ids"]]
    labels = [t for f in features for t in f["labels"]]
    blocks = [{"input_ids": ids[i:i + block], "labels": labels[i:i + block]} for i in range(0, len(ids), block)]
    # A block of prompt only (a long system prompt, say) teaches nothing, and a batch of them divides by zero.
    # The first label is never predicted (labels shift by one), so it does not count.
    return [b for b in blocks if any(label != IGNORE for label in b["labels"][1:])]


@dataclass
class Collator:
    """Right-pads a batch (whatever the tokenizer's inference padding side): labels with -100, attention 0."""

    pad_token_id: int

    def __call__(self, batch: list[Features]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in batch)
        ids, labels, mask = [], [], []
        for f in batch:
            pad = width - len(f["input_ids"])
            ids.append(f["input_ids"] + [self.pad_token_id] * pad)
            labels.append(f["labels"] + [IGNORE] * pad)
            mask.append([1] * len(f["input_ids"]) + [0] * pad)
        return {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels), "attention_mask": torch.tensor(mask)}
