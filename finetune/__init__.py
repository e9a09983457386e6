"""Fine-tuning for personabot: chat JSONL, persona examples, history and text in; a model dir a persona can
use out (`personabot finetune`). `data` validates and splits, `formatting` renders and labels exactly as the
local backend prompts, `train` runs transformers' Trainer, `evaluate` measures and records the result."""
from finetune.train import FinetuneConfig, FinetuneError, run

__all__ = ["FinetuneConfig", "FinetuneError", "run"]
