"""The fine-tuning run: data in, a model dir a persona can use out, with transformers' `Trainer` doing the work.

One call, `run(config, settings)`, is the whole pipeline, so the CLI, the tests and the benchmark all train
the same way. Checkpoints go to `<out>/checkpoints`; running the same command again after a kill resumes from
the last one (and refuses if the data or settings changed, rather than silently mixing two runs). On
success the checkpoints are removed, leaving a plain `from_pretrained` dir plus `personabot-model.json`.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    EarlyStoppingCallback,
    Trainer,
    TrainerCallback,
    TrainingArguments,
    set_seed,
)
from transformers.trainer_utils import get_last_checkpoint

from bot.config import Settings
from bot.models import ct2
from bot.models.base import ModelError
from bot.models.resolve import LocalSource, resolve_local
from finetune.data import (
    DataReport,
    Example,
    Split,
    history_examples,
    persona_examples,
    read_jsonl,
    read_text,
    split_examples,
    with_system,
)
from finetune.evaluate import perplexity, report, sample_prompts, sample_replies, write_metadata, write_model_card
from finetune.formatting import Collator, encode_all

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
RUN_FILE = "personabot-run.json"


class FinetuneError(Exception):
    """A problem the user can fix (bad path, no usable data, mismatched checkpoints); str() says how."""


@dataclass
class FinetuneConfig:
    out: Path
    base: str = "gpt2"
    data: list[Path] = field(default_factory=list)
    text: list[Path] = field(default_factory=list)
    persona: str | None = None
    from_history: bool = False
    max_steps: int = -1
    epochs: float = 3.0
    eval_split: float = 0.1
    seed: int = 42
    lora: bool = False
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float | None = None  # 5e-5 full, 2e-4 LoRA
    max_length: int | None = None  # default: the model's context
    pack: bool = False
    patience: int = 2
    samples: int = 3
    keep_checkpoints: bool = False
    restart: bool = False
    progress: bool = True

    @property
    def lr(self) -> float:
        return self.learning_rate if self.learning_rate is not None else (2e-4 if self.lora else 5e-5)


def resolve_base(base: str, settings: Settings) -> str:
    """The folder or hub id for `from_pretrained`, found exactly where the bot would find a persona's model
    (`bot.models.resolve`), so a base the bot answers with is one that fine-tunes."""
    try:
        source = resolve_local(base, settings.models_dir, settings.data_dir)
    except ModelError:
        raise FinetuneError(f"--base {base}: no model dir there") from None
    if source.gguf_file:
        raise FinetuneError(f"--base {base}: a GGUF file fine-tunes only once converted to a model dir "
                            "(`personabot models pull smollm2` does that for SmolLM2)")
    return source.target


def collect(config: FinetuneConfig, settings: Settings) -> Split:
    """Every requested source, validated, de-duplicated and split. Raises FinetuneError if nothing is left."""
    if not 0 <= config.eval_split < 1:
        raise FinetuneError(f"--eval-split must be at least 0 and below 1, got {config.eval_split}")
    report = DataReport()
    examples: list[Example] = []
    system = ""
    if config.persona:
        from bot.personas import PersonaLibrary, UnknownPersona

        try:
            persona = PersonaLibrary(settings.personas_dir).get(config.persona)
        except UnknownPersona as exc:
            raise FinetuneError(str(exc)) from None
        system = persona.system
        examples += persona_examples(system, list(persona.examples), persona.name, report)
    for path in config.data:
        if not path.is_file():
            raise FinetuneError(f"--data {path}: no such file")
        examples += read_jsonl(path, report)
    if config.from_history:
        history = asyncio.run(history_examples(settings, report, config.persona))
        examples += with_system(history, system)
    for path in config.text:
        if not path.is_file():
            raise FinetuneError(f"--text {path}: no such file")
        examples += read_text(path, report)
    split = split_examples(examples, config.eval_split, config.seed, report)
    if not split.train:
        raise FinetuneError(f"no usable training data.\n{report.summary()}\n"
                            "Give --data F.jsonl, --text F.txt, --persona P (with examples) or --from-history.")
    return split


def _context(model: Any, tokenizer: Any, wanted: int | None) -> int:
    limits = [getattr(model.config, name, None) for name in ("n_positions", "max_position_embeddings")]
    limits.append(tokenizer.model_max_length if tokenizer.model_max_length < 1_000_000 else None)
    known = [x for x in limits if x]
    context = min(known) if known else 1024
    return min(context, wanted) if wanted else context


def _load_base(base: str) -> Any:
    """The base in float32 whatever dtype it was saved in (a float16 base such as the pulled SmolLM2 would
    otherwise train in pure half precision; mixed precision comes from TrainingArguments). A folder written by
    an earlier `models pull` still says its weights are GGUF-quantized although they are plain, and Trainer
    refuses to fine-tune a model it believes quantized, so that stale setting is dropped."""
    config = AutoConfig.from_pretrained(base)
    quantization = getattr(config, "quantization_config", None)
    if Path(base).is_dir() and isinstance(quantization, dict) and quantization.get("quant_method") == "gguf":
        del config.quantization_config
    return AutoModelForCausalLM.from_pretrained(base, config=config, dtype=torch.float32)


def _precision() -> dict[str, bool]:
    if torch.cuda.is_available():
        return {"bf16": torch.cuda.is_bf16_supported(), "fp16": not torch.cuda.is_bf16_supported()}
    return {}


def _fingerprint(config: FinetuneConfig, base: str, data_hash: str) -> dict[str, Any]:
    """What must match for a checkpoint to be resumed: same model, data and training settings."""
    keys = ("max_steps", "epochs", "seed", "lora", "batch_size", "grad_accum", "lr", "max_length", "pack", "patience")
    return {"base": base, "data_hash": data_hash, **{k: getattr(config, k) for k in keys}}


def _prepare_checkpoints(ckpt_dir: Path, fingerprint: dict[str, Any], restart: bool) -> tuple[str | None, dict]:
    """The checkpoint to resume from (None for a fresh start) and the run record, written before training."""
    run_file = ckpt_dir / RUN_FILE
    if restart and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)
    record: dict[str, Any] = {}
    if run_file.exists():
        record = json.loads(run_file.read_text())
        if record.get("fingerprint") != fingerprint:
            changed = sorted(k for k in fingerprint if record.get("fingerprint", {}).get(k) != fingerprint[k])
            raise FinetuneError(
                f"{ckpt_dir} holds checkpoints of a different run ({', '.join(changed)} changed); "
                "pass --restart to discard them, or choose another --out"
            )
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    record["fingerprint"] = fingerprint
    run_file.write_text(json.dumps(record, indent=2))
    return get_last_checkpoint(str(ckpt_dir)), record


def _check_out(out: Path, base: str) -> None:
    if out.resolve() == Path(base).resolve():
        raise FinetuneError("--out is the base model's own dir; choose a new dir for the fine-tuned model")
    if out.is_dir() and any(out.iterdir()):
        ours = (out / "personabot-model.json").exists() or (out / CHECKPOINTS).exists()
        if not ours:
            raise FinetuneError(f"{out} exists and is not a personabot model dir; choose an empty or new --out")


class _NoFinalCheckpoint(TrainerCallback):
    """Without evaluation there is no best checkpoint to reload, and the model is saved right after training,
    so a checkpoint at the last step would only cost a full write of weights and optimizer state."""

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step >= state.max_steps:
            control.should_save = False


def _with_lora(model: Any) -> Any:
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear")
    return get_peft_model(model, lora)


def training_args(config: FinetuneConfig, ckpt_dir: Path, has_eval: bool, **overrides: Any) -> TrainingArguments:
    """Evaluate and save each epoch so early stopping and resuming both work at epoch boundaries."""
    args: dict[str, Any] = dict(
        output_dir=str(ckpt_dir),
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum,
        num_train_epochs=config.epochs,
        max_steps=config.max_steps,
        learning_rate=config.lr,
        warmup_steps=0,
        logging_strategy="steps",
        logging_steps=10,
        eval_strategy="epoch" if has_eval else "no",
        save_strategy="epoch",
        save_total_limit=2,
        load_best_model_at_end=has_eval,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        restore_callback_states_from_checkpoint=True,
        seed=config.seed,
        data_seed=config.seed,
        report_to="none",
        dataloader_num_workers=0,
        remove_unused_columns=False,
        disable_tqdm=not config.progress,
        use_cpu=not torch.cuda.is_available(),
        **_precision(),
    )
    args.update(overrides)
    return TrainingArguments(**args)


def _config_record(config: FinetuneConfig) -> dict[str, Any]:
    """The settings that shaped the model, JSON-ready, for repeating the run."""
    record = asdict(config)
    for key in ("out", "progress", "restart", "keep_checkpoints"):
        record.pop(key)
    record["data"] = [str(p) for p in config.data]
    record["text"] = [str(p) for p in config.text]
    return record


def _convert_for_serving(out: Path, settings: Settings, echo: Callable[[str], None]) -> None:
    """Write the CTranslate2 copy the bot serves the model with, so the persona's first reply does not wait for
    it; where that fails the bot converts on first use or serves with transformers, so the run still stands."""
    if settings.local_engine == "transformers":
        return
    if ct2.engine_for(LocalSource(str(out), str(out.resolve()), "folder")) == "ctranslate2":
        echo(f"converting {out} for CTranslate2 ({ct2.QUANTIZATION})")
        try:
            ct2.convert(out)
        except ModelError as exc:
            echo(str(exc))


def run(config: FinetuneConfig, settings: Settings, callbacks: list[TrainerCallback] | None = None,
        echo: Callable[[str], None] = log.info) -> dict[str, Any]:
    """Train, evaluate and save; returns what was written to personabot-model.json. `echo` gets the data
    report before training starts and the result report at the end."""
    out = Path(config.out)
    base = resolve_base(config.base, settings)
    _check_out(out, base)
    split = collect(config, settings)

    set_seed(config.seed)
    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = _load_base(base)
    except (OSError, ValueError) as exc:
        raise FinetuneError(f"cannot load base model {config.base!r}: {exc}") from exc
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    context = _context(model, tokenizer, config.max_length)
    train = encode_all(tokenizer, split.train, context, split.report, config.pack, config.progress)
    held = encode_all(tokenizer, split.eval, context, split.report, config.pack, config.progress)
    echo(split.report.summary())
    if not train:
        raise FinetuneError(f"no example fits the model's {context}-token context.\n{split.report.summary()}")

    ckpt_dir = out / CHECKPOINTS
    resume, record = _prepare_checkpoints(ckpt_dir, _fingerprint(config, config.base, split.data_hash), config.restart)
    if resume:
        echo(f"resuming from {resume}")
    if config.lora:
        model = _with_lora(model)
    callbacks = list(callbacks or [])
    callbacks.append(EarlyStoppingCallback(early_stopping_patience=config.patience) if held else _NoFinalCheckpoint())
    trainer = Trainer(
        model=model,
        args=training_args(config, ckpt_dir, has_eval=bool(held)),
        data_collator=Collator(tokenizer.pad_token_id),
        train_dataset=train,
        eval_dataset=held or None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    if held and "eval_loss_before" not in record:
        record["eval_loss_before"] = trainer.evaluate()["eval_loss"]
        (ckpt_dir / RUN_FILE).write_text(json.dumps(record, indent=2))
    loss_before = record.get("eval_loss_before")

    trainer.train(resume_from_checkpoint=resume)
    loss_after = trainer.evaluate()["eval_loss"] if held else None

    model = trainer.model
    if config.lora:
        model = model.merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    samples = sample_replies(model, tokenizer, sample_prompts(split.eval, config.samples), context)

    meta = {
        "base": config.base,
        "out": str(out),
        "persona": config.persona,
        "data_hash": split.data_hash,
        "steps": trainer.state.global_step,
        "epochs": round(trainer.state.epoch or 0, 2),
        "seed": config.seed,
        "lora": config.lora,
        "train_examples": len(split.train),
        "eval_examples": len(split.eval),
        "train_sequences": len(train),
        "dropped": split.report.dropped,
        "duplicates": split.report.duplicates,
        "chat_format": "tokenizer chat template" if tokenizer.chat_template else "personabot (bot/models/chat_format.py)",
        "max_length": context,
        "eval_loss_before": loss_before,
        "eval_loss_after": loss_after,
        "perplexity_before": perplexity(loss_before),
        "perplexity_after": perplexity(loss_after),
        "samples": samples,
        "config": _config_record(config),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    write_metadata(out, meta)
    write_model_card(out, meta)
    _convert_for_serving(out, settings, echo)
    if not config.keep_checkpoints:
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    echo(report(meta))
    return meta
