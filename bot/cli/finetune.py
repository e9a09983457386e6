"""`personabot finetune`: one command from conversations to a model dir a persona can use the same day."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bot.config import Settings


def finetune(
    base: Annotated[str, typer.Option(help="Base causal LM: a hub id, a model dir, or a name under <data dir>/models.")] = "gpt2",
    out: Annotated[Optional[Path], typer.Option(help="Model dir to write (default: <data dir>/models/<persona or 'custom'>).")] = None,
    data: Annotated[Optional[list[Path]], typer.Option(help="Chat JSONL, one {\"messages\": [...]} a line (repeatable).")] = None,
    text: Annotated[Optional[list[Path]], typer.Option(help="Plain-text file for language-model style tuning (repeatable).")] = None,
    persona: Annotated[Optional[str], typer.Option(help="Train on this persona's examples, in its system prompt.")] = None,
    from_history: Annotated[bool, typer.Option("--from-history", help="Add the stored conversations (as `history export` writes them).")] = False,
    max_steps: Annotated[int, typer.Option(help="Stop after N optimizer steps (overrides --epochs).")] = -1,
    epochs: Annotated[float, typer.Option(help="Passes over the training data.")] = 3.0,
    eval_split: Annotated[float, typer.Option(help="Fraction of conversations held out for evaluation.")] = 0.1,
    seed: Annotated[int, typer.Option(help="Seed for the split, initialisation and data order.")] = 42,
    lora: Annotated[bool, typer.Option("--lora", help="Train LoRA adapters (peft) and merge them; for bases larger than GPT-2.")] = False,
    batch_size: Annotated[int, typer.Option(help="Examples per device step.")] = 8,
    grad_accum: Annotated[int, typer.Option(help="Gradient accumulation steps.")] = 1,
    learning_rate: Annotated[Optional[float], typer.Option(help="Default 5e-5, or 2e-4 with --lora.")] = None,
    max_length: Annotated[Optional[int], typer.Option(help="Tokens per sequence (default: the model's context).")] = None,
    pack: Annotated[bool, typer.Option("--pack", help="Pack examples into full-context blocks instead of padding.")] = False,
    keep_checkpoints: Annotated[bool, typer.Option("--keep-checkpoints", help="Keep <out>/checkpoints after success.")] = False,
    restart: Annotated[bool, typer.Option("--restart", help="Discard checkpoints of an earlier run in --out.")] = False,
) -> None:
    """Fine-tune a causal LM on chat JSONL, a persona's examples, history or text; resumes after a kill.

    Writes a model dir loadable by from_pretrained (with a model card) plus personabot-model.json, and prints eval loss and perplexity before and after, with sample replies to held-out prompts.
    """
    from finetune.train import FinetuneConfig, FinetuneError, run

    settings = Settings()
    if not (data or text or persona or from_history):
        typer.echo("error: nothing to train on: give --data F.jsonl, --text F.txt, --persona P or --from-history", err=True)
        raise typer.Exit(2)
    config = FinetuneConfig(
        out=out or settings.models_dir / (persona or "custom"), base=base, data=list(data or []), text=list(text or []),
        persona=persona, from_history=from_history, max_steps=max_steps, epochs=epochs, eval_split=eval_split,
        seed=seed, lora=lora, batch_size=batch_size, grad_accum=grad_accum, learning_rate=learning_rate,
        max_length=max_length, pack=pack, keep_checkpoints=keep_checkpoints, restart=restart,
    )
    try:
        run(config, settings, echo=typer.echo)
    except FinetuneError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
