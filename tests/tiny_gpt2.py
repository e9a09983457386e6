"""A tiny GPT-2 built from scratch, so model tests exercise the real transformers loading path offline.

The tokenizer is a byte-level BPE trained with `tokenizers` on a small corpus that includes the chat format's
role headers, wrapped by `GPT2TokenizerFast(tokenizer_object=...)`; the model is a random-init
`GPT2LMHeadModel`. Both are written with `save_pretrained`, so callers load them back exactly as they would a
real model dir (`from_pretrained`, `LocalChatModel.load`, `finetune --base`). Seeded: the same arguments give
the same files, so greedy outputs are reproducible across runs.

By default the model gets a few dozen optimizer steps (under a second) on chat-format conversations made from
the corpus, so it answers in the chat format, ends its turn with `<|endoftext|>`, and different prompts give
different greedy replies; `train_steps=0` leaves it random (it then babbles newlines).

    from tests.tiny_gpt2 import build_tiny_gpt2
    model_dir = build_tiny_gpt2(tmp_path / "tiny")
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, GPT2TokenizerFast

from bot.models.base import Message
from bot.models.chat_format import DEFAULT_END_OF_TURN, ROLE_HEADER, render

CORPUS = """\
The quick brown fox jumps over the lazy dog. A statistician walks into a bar and orders a mean drink.
Hello! How are you today? I am fine, thank you. What can I help you with?
Data scientists love clean data, good plots and a well-tuned model. The median is robust to outliers.
Tell me a joke about statistics. Why did the regression line break up? It found a better fit.
Café, naïve, résumé, 東京, emoji 🙂 and other bytes beyond ASCII keep the decoder honest.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 100 2024. Punctuation: , . ; : ! ? ( ) [ ] { } " ' - _ / \\ @ # $ % & *
"""


def conversations() -> list[list[Message]]:
    """The chat the tiny model is trained on: each corpus line answered by the next one."""
    lines = CORPUS.splitlines()
    return [[{"role": "user", "content": q}, {"role": "assistant", "content": a}]
            for q, a in zip(lines, lines[1:] + lines[:1])]


def _corpus() -> list[str]:
    turns = [f"{header}{line}{DEFAULT_END_OF_TURN}\n" for header in ROLE_HEADER.values() for line in CORPUS.splitlines()]
    return CORPUS.splitlines() * 4 + turns


def _train(model: GPT2LMHeadModel, tokenizer: GPT2TokenizerFast, steps: int) -> None:
    texts = [render(c, add_generation_prompt=False) for c in conversations()]
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def build_tiny_gpt2(
    path: Path,
    *,
    n_layer: int = 2,
    n_embd: int = 64,
    n_head: int = 2,
    n_positions: int = 256,
    vocab_size: int = 512,
    chat_template: str | None = None,
    train_steps: int = 60,
    seed: int = 0,
) -> Path:
    """Write a tiny GPT-2 model + tokenizer into `path` and return `path`.

    `<|endoftext|>` is bos, eos and pad (as in GPT-2); padding side is left, which is what batched generation
    needs. Pass `chat_template` (a Jinja string) to get a tokenizer that carries one.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    eos = DEFAULT_END_OF_TURN

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[eos],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)

    tokenizer = GPT2TokenizerFast(
        tokenizer_object=bpe, bos_token=eos, eos_token=eos, unk_token=eos, pad_token=eos, padding_side="left",
        model_max_length=n_positions,
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(path)

    eos_id = tokenizer.convert_tokens_to_ids(eos)
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
        bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id,
    )
    model = GPT2LMHeadModel(config)
    _train(model, tokenizer, train_steps)
    model.save_pretrained(path)
    return path


def export_gguf(model_dir: Path, path: Path) -> Path:
    """Write the model in `model_dir` as an F32 GGUF file (the layout llama.cpp's converter gives GPT-2), so the
    GGUF import path can be tested offline against a model whose outputs are known."""
    import gguf
    import numpy as np
    from transformers import AutoTokenizer

    model = GPT2LMHeadModel.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    writer = gguf.GGUFWriter(str(path), "gpt2")
    writer.add_context_length(config.n_positions)
    writer.add_embedding_length(config.n_embd)
    writer.add_feed_forward_length(4 * config.n_embd)
    writer.add_block_count(config.n_layer)
    writer.add_head_count(config.n_head)
    writer.add_layer_norm_eps(config.layer_norm_epsilon)
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    vocab = sorted(backend["vocab"].items(), key=lambda item: item[1])
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list([token for token, _ in vocab])
    writer.add_token_types([gguf.TokenType.CONTROL if token == tokenizer.eos_token else gguf.TokenType.NORMAL
                            for token, _ in vocab])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in backend["merges"]])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GPT2, config.n_layer)
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" or name.endswith(".attn.bias"):
            continue  # tied to the embeddings / a causal-mask buffer
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        data = tensor.float().numpy()
        if name.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")):
            data = data.T  # GPT-2's Conv1D stores weights transposed relative to GGUF
        writer.add_tensor(gguf_name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
