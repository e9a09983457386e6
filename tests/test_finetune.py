"""The fine-tuning pipeline, end to end on a tiny GPT-2 built in the test (CPU, seconds per run)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
from typer.testing import CliRunner

from bot.cli.finetune import finetune
from bot.models.base import ModelError
from bot.models.chat_format import DEFAULT_END_OF_TURN
from bot.models.resolve import resolve_local
from finetune.data import DataReport, Example, read_jsonl, split_examples
from finetune.formatting import IGNORE, encode, encode_all, pack_features
from finetune.train import FinetuneConfig, FinetuneError, resolve_base, run
from tiny_gpt2 import build_tiny_gpt2

TOPICS = ["statistics", "the median", "outliers", "regression", "data", "plots", "models", "the mean"]
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def conversations(n: int = 40) -> list[dict]:
    return [
        {"messages": [
            {"role": "user", "content": f"Tell a joke about {TOPICS[i % len(TOPICS)]}, number {i}."},
            {"role": "assistant", "content": f"Why did {TOPICS[i % len(TOPICS)]} break up? It found a better fit."},
        ]}
        for i in range(n)
    ]


def write_jsonl(path: Path, rows: list, extra_lines: tuple[str, ...] = ()) -> Path:
    path.write_text("\n".join([json.dumps(r) for r in rows] + list(extra_lines)) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("tiny") / "base")


@pytest.fixture
def chat_data(tmp_path) -> Path:
    return write_jsonl(tmp_path / "chats.jsonl", conversations())


def config(tmp_path: Path, base: Path, data: Path, **kw) -> FinetuneConfig:
    kw = {"max_steps": 24, "batch_size": 8, "learning_rate": 3e-3, "progress": False, **kw}
    return FinetuneConfig(out=tmp_path / "out", base=str(base), data=[data], **kw)


class KillAfter(TrainerCallback):
    """Stands in for a kill -9 mid-run: training dies after `step`, with only the saved checkpoints left."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise KeyboardInterrupt("killed")


def test_finetune_lowers_held_out_perplexity_and_records_it(tmp_path, settings, tiny_base, chat_data):
    meta = run(config(tmp_path, tiny_base, chat_data), settings)

    assert meta["perplexity_after"] < meta["perplexity_before"] / 2
    written = json.loads((tmp_path / "out" / "personabot-model.json").read_text())
    assert {k: written[k] for k in ("base", "data_hash", "steps", "eval_loss_before", "eval_loss_after")} == {
        "base": str(tiny_base), "data_hash": meta["data_hash"], "steps": 24,
        "eval_loss_before": meta["eval_loss_before"], "eval_loss_after": meta["eval_loss_after"],
    }
    assert len(written["samples"]) == 3 and all(s["prompt"].startswith("Tell a joke") for s in written["samples"])
    assert "base_model: " in (tmp_path / "out" / "README.md").read_text()
    assert not (tmp_path / "out" / "checkpoints").exists()


def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted_run(tmp_path, settings, tiny_base, chat_data):
    whole = run(config(tmp_path / "whole", tiny_base, chat_data), settings)

    killed = config(tmp_path / "killed", tiny_base, chat_data)
    with pytest.raises(KeyboardInterrupt):
        run(killed, settings, callbacks=[KillAfter(step=13)])
    assert (killed.out / "checkpoints" / "checkpoint-10").is_dir()  # 36 train rows / 8 = 5 steps an epoch
    messages: list[str] = []
    resumed = run(killed, settings, echo=messages.append)

    assert any("resuming from" in m and "checkpoint-10" in m for m in messages)
    assert resumed["steps"] == whole["steps"] == 24
    assert resumed["eval_loss_after"] == pytest.approx(whole["eval_loss_after"], rel=1e-5)
    assert resumed["samples"] == whole["samples"]


def test_checkpoints_of_a_different_run_are_not_resumed(tmp_path, settings, tiny_base, chat_data):
    first = config(tmp_path, tiny_base, chat_data)
    with pytest.raises(KeyboardInterrupt):
        run(first, settings, callbacks=[KillAfter(step=6)])
    other = write_jsonl(tmp_path / "other.jsonl", conversations(30))

    with pytest.raises(FinetuneError, match="different run.*data_hash.*--restart"):
        run(config(tmp_path, tiny_base, other), settings)
    assert (first.out / "checkpoints" / "checkpoint-5").is_dir()  # nothing lost until the user says so


def test_finetuned_dir_answers_through_the_local_backend(tmp_path, settings, tiny_base, chat_data):
    local = pytest.importorskip("bot.models.local")
    from bot.models.base import GenParams

    run(config(tmp_path, tiny_base, chat_data), settings)
    model = local.LocalChatModel.load(str(tmp_path / "out"), settings.models_dir)

    async def answer() -> str:
        chunks = [c async for c in model.stream(
            [{"role": "user", "content": "Tell a joke about outliers, number 3."}], GenParams(temperature=0, max_tokens=30))]
        return "".join(c.text for c in chunks)

    import asyncio

    assert "break up" in asyncio.run(answer())


def test_a_base_is_found_where_the_bot_finds_a_persona_model(tmp_path, settings, tiny_base):
    folder = shutil.copytree(tiny_base, settings.models_dir / "tiny").resolve()
    (folder.parent / "tiny.gguf").write_bytes(b"GGUF")  # only looked up, never loaded

    def bot(path: str):
        return resolve_local(path, settings.models_dir, settings.data_dir)

    for path in ("tiny", "models/tiny", str(folder)):  # a pulled name, a persona's `path: models/NAME`, a folder
        assert bot(path).target == resolve_base(path, settings) == str(folder)
    assert bot("gpt2").target == resolve_base("gpt2", settings) == "gpt2"  # a Hub id
    gguf = bot("models/tiny.gguf")
    assert (gguf.target, gguf.options) == (str(folder.parent), {"gguf_file": "tiny.gguf"})
    with pytest.raises(FinetuneError, match="GGUF file fine-tunes only once converted"):
        resolve_base("models/tiny.gguf", settings)
    nothing = str(tmp_path / "nothing")
    with pytest.raises(ModelError, match="No model folder at"):
        bot(nothing)
    with pytest.raises(FinetuneError, match="no model dir there"):
        resolve_base(nothing, settings)


def test_malformed_jsonl_rows_are_reported_with_line_and_reason(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", conversations(3) + [
        {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}]},
        {"messages": [{"role": "robot", "content": "beep"}, {"role": "assistant", "content": "boop"}]},
        {"messages": [{"role": "user", "content": "only a question"}]},
        {"prompt": "old completion format"},
    ], extra_lines=("{not json",))
    report = DataReport()

    examples = read_jsonl(path, report)

    assert len(examples) == 3
    assert report.dropped == [
        "mixed.jsonl:4: empty assistant turn (message 1)",
        "mixed.jsonl:5: message 0 has unknown role 'robot' (expected system, user or assistant)",
        "mixed.jsonl:6: no assistant turn to learn from",
        'mixed.jsonl:7: not an object with a "messages" list',
        "mixed.jsonl:8: invalid JSON (Expecting property name enclosed in double quotes)",
    ]


def test_training_with_bad_rows_still_runs_and_reports_them(tmp_path, settings, tiny_base):
    data = write_jsonl(tmp_path / "d.jsonl", conversations(12), extra_lines=("{oops", '{"messages": []}'))

    meta = run(config(tmp_path, tiny_base, data, max_steps=2), settings)

    assert meta["dropped"] == ["d.jsonl:13: invalid JSON (Expecting property name enclosed in double quotes)",
                               "d.jsonl:14: no messages list"]
    assert meta["train_examples"] + meta["eval_examples"] == 12


def _trained_text(tokenizer, features) -> str:
    return tokenizer.decode([t for t, label in zip(features["input_ids"], features["labels"]) if label != IGNORE])


def test_loss_is_only_on_assistant_tokens_in_the_gpt2_chat_format(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    example = Example(source="t", messages=(
        {"role": "system", "content": "You are a comic."},
        {"role": "user", "content": "Tell a joke."},
        {"role": "assistant", "content": "Why did the mean break up?"},
        {"role": "user", "content": "Another."},
        {"role": "assistant", "content": "The median is robust."},
    ))

    [features] = encode(tokenizer, example, max_length=256)

    assert _trained_text(tokenizer, features) == (
        f"Why did the mean break up?{DEFAULT_END_OF_TURN}The median is robust.{DEFAULT_END_OF_TURN}")
    assert tokenizer.decode(features["input_ids"]).startswith("<|system|>\nYou are a comic.")


def test_loss_is_only_on_assistant_tokens_with_a_chat_template(tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(build_tiny_gpt2(tmp_path / "templated", chat_template=CHATML))
    example = Example(source="t", messages=(
        {"role": "user", "content": "Tell a joke."},
        {"role": "assistant", "content": "Why did the mean break up?"},
        {"role": "user", "content": "Another."},
        {"role": "assistant", "content": "The median is robust."},
    ))

    [features] = encode(tokenizer, example, max_length=256)

    assert _trained_text(tokenizer, features) == "Why did the mean break up?<|im_end|>\nThe median is robust.<|im_end|>\n"
    assert tokenizer.decode(features["input_ids"]) == tokenizer.apply_chat_template(list(example.messages), tokenize=False)


def test_conversation_too_long_for_the_context_is_dropped_with_a_reason(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    example = Example(source="t", messages=(
        {"role": "user", "content": "data " * 300}, {"role": "assistant", "content": "ok"}))

    assert encode(tokenizer, example, max_length=64) == "no assistant tokens within the 64-token context"


def test_packing_fills_context_blocks_and_keeps_labels_aligned(tiny_base):
    tokenizer = AutoTokenizer.from_pretrained(tiny_base)
    examples = [Example(source=str(i), messages=tuple(c["messages"])) for i, c in enumerate(conversations(10))]

    packed = encode_all(tokenizer, examples, max_length=32, report=DataReport(), pack=True)
    unpacked = encode_all(tokenizer, examples, max_length=32, report=DataReport())

    assert all(len(block["input_ids"]) == 32 for block in packed[:-1])
    assert [t for b in packed for t in b["input_ids"]] == [t for f in unpacked for t in f["input_ids"]]
    assert [t for b in packed for t in b["labels"]] == [t for f in unpacked for t in f["labels"]]


def test_held_out_split_is_by_conversation_seeded_and_deduplicated():
    examples = [Example(source=str(i), messages=tuple(c["messages"])) for i, c in enumerate(conversations(20))]
    duplicate = Example(source="dup", messages=({"role": "user", "content": "Tell a joke about  statistics, number 0."},
                                               examples[0].messages[1]))

    first = split_examples(examples + [duplicate], 0.2, seed=7, report=(report := DataReport()))
    again = split_examples(examples, 0.2, seed=7, report=DataReport())
    other = split_examples(examples, 0.2, seed=8, report=DataReport())

    assert report.duplicates == 1 and len(first.train) == 16 and len(first.eval) == 4
    assert [e.source for e in first.eval] == [e.source for e in again.eval] and first.data_hash == again.data_hash
    assert [e.source for e in first.eval] != [e.source for e in other.eval]


def test_text_files_train_on_every_token(tmp_path, settings, tiny_base):
    notes = tmp_path / "notes.txt"
    notes.write_text("\n\n".join(f"The median of sample {i} is robust to outliers." for i in range(30)))
    cfg = FinetuneConfig(out=tmp_path / "out", base=str(tiny_base), text=[notes], max_steps=4, progress=False)

    meta = run(cfg, settings)

    assert meta["train_examples"] == 1 and meta["eval_examples"] == 0 and meta["perplexity_after"] is None
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.n_layer == 2


def test_lora_run_saves_a_merged_model_that_loads_with_from_pretrained(tmp_path, settings, tiny_base, chat_data):
    meta = run(config(tmp_path, tiny_base, chat_data, lora=True, max_steps=10), settings)

    out = tmp_path / "out"
    assert not (out / "adapter_config.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert type(model).__name__ == "GPT2LMHeadModel" and meta["eval_loss_after"] < meta["eval_loss_before"]


def test_float16_base_left_marked_gguf_quantized_by_an_earlier_pull_trains_in_float32(tmp_path, settings, tiny_base,
                                                                                    chat_data):
    pulled = tmp_path / "pulled"
    AutoModelForCausalLM.from_pretrained(tiny_base).half().save_pretrained(pulled)
    AutoTokenizer.from_pretrained(tiny_base).save_pretrained(pulled)
    model_config = json.loads((pulled / "config.json").read_text())
    model_config["quantization_config"] = {"quant_method": "gguf", "dequantize": False, "gguf_file": "tiny.gguf"}
    (pulled / "config.json").write_text(json.dumps(model_config))

    meta = run(config(tmp_path, pulled, chat_data, max_steps=2), settings)

    assert meta["steps"] == 2
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").dtype == torch.float32


def test_cli_trains_a_persona_on_its_examples_into_the_models_dir(tmp_path, settings, tiny_base, monkeypatch):
    shutil.copytree(tiny_base, settings.models_dir / "tiny")  # a base named like `personabot models pull` leaves it
    personas = tmp_path / "personas"
    personas.mkdir()
    examples = "\n".join(
        f"  - {{role: user, content: 'Joke {i} about {t}?'}}\n  - {{role: assistant, content: '{t} walks into a bar.'}}"
        for i, t in enumerate(TOPICS))
    (personas / "comic.yaml").write_text(f"name: comic\nsystem: You are a comic.\nexamples:\n{examples}\n")
    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("PERSONABOT_PERSONAS_DIR", str(personas))
    app = typer.Typer()
    app.command()(finetune)

    result = CliRunner().invoke(app, ["--base", "tiny", "--persona", "comic", "--max-steps", "3", "--eval-split", "0.25"])

    assert result.exit_code == 0, result.output
    meta = json.loads((settings.data_dir / "models" / "comic" / "personabot-model.json").read_text())
    assert meta["base"] == "tiny" and meta["persona"] == "comic" and meta["train_examples"] == 6 and meta["eval_examples"] == 2
    assert "perplexity:" in result.output


def test_cli_reports_an_unknown_persona_without_training(tmp_path, settings, tiny_base, monkeypatch):
    monkeypatch.setenv("PERSONABOT_PERSONAS_DIR", str(tmp_path / "personas"))
    app = typer.Typer()
    app.command()(finetune)

    result = CliRunner().invoke(app, ["--base", str(tiny_base), "--persona", "nobody", "--out", str(tmp_path / "o")])

    assert result.exit_code == 1 and "no persona named 'nobody'" in result.output
    assert not (tmp_path / "o").exists()


def test_from_history_adds_stored_conversations_under_the_personas_system_prompt(tmp_path, settings, store_url):
    history = pytest.importorskip("bot.history")
    from bot.config import Settings
    from bot.conversation import ConvKey
    from finetune.train import collect

    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "comic.yaml").write_text("name: comic\nsystem: You are a comic.\n")
    settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=settings.data_dir, PERSONABOT_PERSONAS_DIR=personas,
                        DATABASE_URL=store_url)
    settings.data_dir.mkdir(parents=True, exist_ok=True)

    async def store_chats() -> None:
        store = await history.open_history(settings)
        for i in range(5):
            key = ConvKey("terminal", "", f"chan{i}")
            await store.append(key, "user", f"Joke {i}?", persona="comic")
            await store.append(key, "assistant", f"Punchline {i}.", persona="comic")
        await store.close()

    import asyncio

    asyncio.run(store_chats())
    data = collect(FinetuneConfig(out=tmp_path / "o", persona="comic", from_history=True, eval_split=0), settings)

    assert sorted(ex.messages[2]["content"] for ex in data.train) == [f"Punchline {i}." for i in range(5)]
    assert all(ex.messages[0] == {"role": "system", "content": "You are a comic."} for ex in data.train)


def test_packing_drops_blocks_that_hold_no_assistant_tokens():
    prompt_only = {"input_ids": list(range(8)), "labels": [IGNORE] * 8}
    answered = {"input_ids": list(range(8, 12)), "labels": [IGNORE, 9, 10, 11]}
    # A block whose only label sits at its first position: labels shift by one, so it is never predicted.
    first_only = {"input_ids": list(range(12, 16)), "labels": [12, IGNORE, IGNORE, IGNORE]}

    blocks = pack_features([prompt_only, answered, first_only], block=4)

    assert blocks == [{"input_ids": [8, 9, 10, 11], "labels": [IGNORE, 9, 10, 11]}]
