"""What a fine-tune did, measured on the held-out split and written next to the weights.

`personabot-model.json` is the machine-readable record (base, data hash, steps, eval loss and perplexity
before and after, sample replies); README.md is the model card a person reads. Both are enough to tell
whether a run helped and to repeat it.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from bot.models.base import Message
from finetune.data import Example
from finetune.formatting import prompt_text

METADATA_FILE = "personabot-model.json"


def perplexity(loss: float | None) -> float | None:
    if loss is None:
        return None
    return math.exp(loss) if loss < 700 else math.inf


def sample_prompts(examples: list[Example], n: int) -> list[tuple[list[Message], str]]:
    """(prompt messages, reference reply) for the first `n` held-out conversations: everything before the
    last assistant turn is the prompt, that turn is what a good model would say."""
    out = []
    for ex in examples:
        if ex.text is not None:
            continue
        last = max(i for i, m in enumerate(ex.messages) if m["role"] == "assistant")
        out.append((list(ex.messages[:last]), ex.messages[last]["content"]))
        if len(out) == n:
            break
    return out


@torch.no_grad()
def sample_replies(model: Any, tokenizer: Any, prompts: list[tuple[list[Message], str]], context: int,
                   max_new_tokens: int = 60) -> list[dict[str, str]]:
    """Greedy replies, prompted exactly as the local backend prompts, so they show what users will see."""
    model.eval()
    device = next(model.parameters()).device
    stop = tokenizer.eos_token_id
    samples = []
    for messages, reference in prompts:
        ids = tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"]
        ids = ids[-max(1, context - max_new_tokens):]
        input_ids = torch.tensor([ids], device=device)
        output = model.generate(
            input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_new_tokens, do_sample=False,
            eos_token_id=stop, pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop,
        )
        reply = tokenizer.decode(output[0, len(ids):], skip_special_tokens=True).strip()
        prompt = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        samples.append({"prompt": prompt, "reference": reference, "reply": reply})
    return samples


def write_metadata(out: Path, meta: dict[str, Any]) -> Path:
    path = out / METADATA_FILE
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path


def _fmt(x: float | None, digits: int = 3) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(meta: dict[str, Any]) -> str:
    """The short report printed at the end of a run."""
    lines = [
        f"model: {meta['out']}  (base {meta['base']}{', LoRA merged' if meta['lora'] else ''})",
        f"steps: {meta['steps']}  train examples: {meta['train_examples']}  held out: {meta['eval_examples']}",
        f"eval loss: {_fmt(meta['eval_loss_before'])} -> {_fmt(meta['eval_loss_after'])}   "
        f"perplexity: {_fmt(meta['perplexity_before'], 2)} -> {_fmt(meta['perplexity_after'], 2)}",
    ]
    for s in meta["samples"]:
        lines += [f"  > {s['prompt'][:100]}", f"    {s['reply'][:200] or '(empty reply)'}"]
    return "\n".join(lines)


def write_model_card(out: Path, meta: dict[str, Any]) -> Path:
    """A model card in the Hub's format (YAML front matter, then prose), so the dir is self-describing."""
    samples = "\n".join(
        f"- **{s['prompt'][:200]}**\n  - reply: {s['reply'][:400] or '(empty)'}\n  - reference: {s['reference'][:400]}"
        for s in meta["samples"]
    ) or "_no held-out conversations_"
    card = f"""---
base_model: {meta['base']}
library_name: transformers
pipeline_tag: text-generation
tags: [personabot, fine-tuned{', lora-merged' if meta['lora'] else ''}]
---

# {Path(meta['out']).name}

Fine-tuned from `{meta['base']}` with `personabot finetune`{f" for the persona `{meta['persona']}`" if meta['persona'] else ''}.
Use it from a persona with `model: {{backend: local, path: {Path(meta['out']).name}}}` (a name under the data
dir's `models/`) or the full path.

| | before | after |
| --- | --- | --- |
| eval loss | {_fmt(meta['eval_loss_before'])} | {_fmt(meta['eval_loss_after'])} |
| perplexity | {_fmt(meta['perplexity_before'], 2)} | {_fmt(meta['perplexity_after'], 2)} |

- training: {meta['steps']} steps on {meta['train_examples']} examples, {meta['eval_examples']} held out
  (seed {meta['seed']}, data sha256 `{meta['data_hash'][:16]}…`)
- chat format: {meta['chat_format']}; loss on assistant turns only
- context: {meta['max_length']} tokens

## Sample replies to held-out prompts

{samples}
"""
    path = out / "README.md"
    path.write_text(card, encoding="utf-8")
    return path
