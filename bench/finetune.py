"""Training throughput of `personabot finetune` against a plain Trainer script on the same data, same process.

The pipeline adds validation, assistant-only labels, its collator, checkpoints for resuming and its callbacks;
this measures what that costs in training samples/s (Trainer's own `train_samples_per_second`). Runs
alternate (plain, personabot, plain, …) and the best of each is compared, so a busy shared machine hurts
both sides alike. Target: ratio >= 0.95.

    python bench/finetune.py                 # GPT-2-sized (124M) random-init model, a few steps
    python bench/finetune.py --tiny --steps 200
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import torch  # noqa: E402
from transformers import (  # noqa: E402
    AutoTokenizer,
    DataCollatorForLanguageModeling,
    GPT2Config,
    GPT2LMHeadModel,
    Trainer,
    TrainerCallback,
    TrainingArguments,
)

from bot.config import Settings  # noqa: E402
from bot.models.chat_format import render  # noqa: E402
from finetune.train import FinetuneConfig, run  # noqa: E402
from tiny_gpt2 import build_tiny_gpt2  # noqa: E402

TOPICS = ["statistics", "the median", "outliers", "regression", "data", "plots", "models", "the mean"]


def conversations(n: int, words: int) -> list[dict]:
    filler = " ".join(TOPICS[i % len(TOPICS)] for i in range(words))
    return [{"messages": [
        {"role": "system", "content": "You are a stand-up comic for data scientists."},
        {"role": "user", "content": f"Tell a joke about {TOPICS[i % len(TOPICS)]}, number {i}. {filler}"},
        {"role": "assistant", "content": f"Why did {TOPICS[i % len(TOPICS)]} break up? It found a better fit. {filler}"},
    ]} for i in range(n)]


def build_base(path: Path, tiny: bool) -> Path:
    """The tiny test model, or a GPT-2-sized (124M) one: random weights, the tiny model's tokenizer."""
    build_tiny_gpt2(path)
    if not tiny:
        tokenizer = AutoTokenizer.from_pretrained(path)
        torch.manual_seed(0)
        config = GPT2Config(vocab_size=len(tokenizer), n_positions=1024, bos_token_id=tokenizer.eos_token_id,
                            eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id)
        GPT2LMHeadModel(config).save_pretrained(path)
    return path


class Throughput(TrainerCallback):
    """Trainer's wall-clock samples/s, and samples per CPU-second of this process over the same span: on a
    machine shared with other work the CPU figure is the steadier of the two."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0
        self._start = 0.0

    def on_train_begin(self, args, state, control, **kwargs):
        self._start = time.process_time()

    def on_train_end(self, args, state, control, **kwargs):
        samples = state.global_step * args.per_device_train_batch_size * args.gradient_accumulation_steps
        self.cpu = samples / (time.process_time() - self._start)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "train_samples_per_second" in logs:
            self.wall = logs["train_samples_per_second"]


def plain(base: Path, rows: list[dict], steps: int, batch: int, seq: int, work: Path) -> Throughput:
    """What a user would write by hand: render, tokenize, language-modelling collator, Trainer."""
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokenizer.padding_side = "right"
    model = GPT2LMHeadModel.from_pretrained(base)
    texts = [render(r["messages"], tokenizer.eos_token, add_generation_prompt=False) for r in rows]
    dataset = [{"input_ids": tokenizer(t, add_special_tokens=False, truncation=True, max_length=seq)["input_ids"]} for t in texts]
    args = TrainingArguments(output_dir=str(work), per_device_train_batch_size=batch, max_steps=steps, learning_rate=5e-5,
                             seed=0, report_to="none", dataloader_num_workers=0, disable_tqdm=True, save_strategy="no",
                             logging_strategy="no", use_cpu=not torch.cuda.is_available(),
                             bf16=torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    meter = Throughput()
    trainer = Trainer(model=model, args=args, train_dataset=dataset, callbacks=[meter],
                      data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
    trainer.train()
    return meter


def personabot(base: Path, data: Path, steps: int, batch: int, seq: int, work: Path, settings: Settings) -> Throughput:
    meter = Throughput()
    cfg = FinetuneConfig(out=work, base=str(base), data=[data], max_steps=steps, batch_size=batch, eval_split=0.0,
                         max_length=seq, samples=0, progress=False, seed=0)
    run(cfg, settings, callbacks=[meter])
    return meter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="the 2-layer test model instead of a GPT-2-sized one")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default 8, tiny 150)")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs of each")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (ignored on GPU)")
    opts = parser.parse_args()
    steps = opts.steps or (150 if opts.tiny else 8)
    torch.set_num_threads(opts.threads)

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        base = build_base(tmp_path / "base", opts.tiny)
        rows = conversations(max(64, steps * opts.batch_size), words=opts.seq_len // 4)
        data = tmp_path / "data.jsonl"
        data.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
        settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=tmp_path / "data")
        ours, theirs = [], []
        for i in range(opts.rounds):
            theirs.append(plain(base, rows, steps, opts.batch_size, opts.seq_len, tmp_path / f"plain{i}"))
            ours.append(personabot(base, data, steps, opts.batch_size, opts.seq_len, tmp_path / f"ours{i}", settings))
        model = "tiny GPT-2 (2 layers, 64 wide)" if opts.tiny else "GPT-2-sized (124M, random init)"
        device = "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"
        print(f"model: {model}; device: {device}; {steps} steps x batch {opts.batch_size} x <= {opts.seq_len} tokens")
        for label, attr in (("wall-clock", "wall"), ("per CPU-second", "cpu")):
            a, b = [getattr(m, attr) for m in theirs], [getattr(m, attr) for m in ours]
            print(f"samples/s {label}: plain Trainer {', '.join(f'{x:.1f}' for x in a)}; "
                  f"personabot {', '.join(f'{x:.1f}' for x in b)}; ratio of bests {max(b) / max(a):.3f} (target >= 0.95)")

if __name__ == "__main__":
    main()
