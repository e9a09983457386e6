"""The CTranslate2 engine, on the tiny GPT-2 loaded through the real path: converted once, beside its weights,
answering with the same tokens as the transformers engine, many chats at once, and fine-tuned models served
with no extra step."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
from pathlib import Path

import pytest
import torch
from tiny_gpt2 import build_tiny_gpt2, conversations, export_gguf
from typer.testing import CliRunner

from bot.models import ct2
from bot.models.base import Chunk, GenParams, ModelBusy, ModelError
from bot.models.local import LocalChatModel
from bot.models.registry import ModelRegistry
from bot.personas import ModelSpec

GREEDY = GenParams(temperature=0.0, max_tokens=40)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_gpt2(tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def fast(tiny_dir) -> LocalChatModel:
    loaded = LocalChatModel.load(str(tiny_dir), tiny_dir.parent)
    yield loaded
    loaded.close()


@pytest.fixture(scope="module")
def slow(tiny_dir) -> LocalChatModel:
    loaded = LocalChatModel.load(str(tiny_dir), tiny_dir.parent, engine="transformers")
    yield loaded
    loaded.close()


def prompts() -> list[list[dict]]:
    """Every line the tiny model knows, asked with and without a system prompt: twelve different replies."""
    lines = [c[0]["content"] for c in conversations()]
    return [[{"role": "user", "content": q}] for q in lines] + [
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": q}] for q in lines]


async def collect(model: LocalChatModel, messages, params: GenParams = GREEDY) -> list[Chunk]:
    return [chunk async for chunk in model.stream(messages, params)]


def text(chunks: list[Chunk]) -> str:
    return "".join(c.text for c in chunks)


def test_a_gpt2_folder_is_served_by_ctranslate2_from_a_copy_converted_once_beside_it(tiny_dir, fast):
    assert fast.engine == "ctranslate2"
    copy = tiny_dir / ct2.CONVERTED
    assert json.loads((copy / ct2.RECORD).read_text())["quantization"] == "int8"
    written = (copy / "model.bin").stat().st_mtime_ns
    LocalChatModel.load(str(tiny_dir), tiny_dir.parent).close()
    assert (copy / "model.bin").stat().st_mtime_ns == written  # the second load converted nothing


async def test_greedy_replies_have_the_same_tokens_as_the_transformers_engine(fast, slow):
    ours = [await collect(fast, m) for m in prompts()]
    theirs = [await collect(slow, m) for m in prompts()]
    assert len({text(c) for c in theirs}) > 6  # different replies, or the comparison proves little
    assert [(text(c), c[-1].usage.completion_tokens, c[-1].finish_reason) for c in ours] == \
           [(text(c), c[-1].usage.completion_tokens, c[-1].finish_reason) for c in theirs]


class Held:
    """Stands in for a model's generator: after each token it waits for `go`, so a reply is surely mid-way while
    the test acts."""

    def __init__(self, generator):
        self.generator, self.go = generator, threading.Event()

    def generate_batch(self, starts, *, callback, **options):
        def step(result) -> bool:
            stop = callback(result)
            self.go.wait()
            return stop

        return self.generator.generate_batch(starts, callback=step, **options)


async def wait_for(condition) -> None:
    while not condition():
        await asyncio.sleep(0.001)


async def test_chats_arriving_mid_reply_share_the_model_and_nobody_waits_for_another_to_finish(tiny_dir):
    shared = LocalChatModel.load(str(tiny_dir), tiny_dir.parent, lanes=1)  # one lane: sharing is the only way
    chats = prompts()[:4]
    try:
        alone = [text(await collect(shared, m)) for m in chats]
        held = shared.worker.model = Held(shared.worker.model)
        rounds = shared.worker.rounds
        first = shared.stream(chats[0], GREEDY)
        started = [await anext(first)]
        later = [asyncio.ensure_future(collect(shared, m)) for m in chats[1:]]
        await wait_for(lambda: shared.worker.in_flight == 4)  # all four admitted while the first is mid-reply
        held.go.set()
        together = [text(started + [c async for c in first])] + [text(await task) for task in later]
    finally:
        shared.close()
    assert together == alone
    assert shared.worker.rounds - rounds == 2  # the first reply's round, then one round all four shared


async def test_max_tokens_stop_strings_and_sampling_work_as_on_transformers(fast):
    messages = prompts()[3]
    cut = await collect(fast, messages, GenParams(temperature=0, max_tokens=3))
    assert cut[-1].finish_reason == "length" and cut[-1].usage.completion_tokens == 3
    full = text(await collect(fast, messages))
    word = full.split()[2]
    stopped = await collect(fast, messages, GenParams(temperature=0, max_tokens=40, stop=(word,)))
    assert stopped[-1].finish_reason == "stop" and text(stopped) == full[:full.index(word)]
    sampled = await collect(fast, messages, GenParams(temperature=0.8, top_p=0.9, max_tokens=12))
    assert sampled[-1].finish_reason in ("stop", "length") and 1 <= sampled[-1].usage.completion_tokens <= 12


async def test_the_repetition_penalty_of_the_generation_config_applies_to_the_reply(tiny_dir, tmp_path, slow):
    """CTranslate2 penalises what the reply has said, never the prompt, so the end-of-turn tokens every prompt
    holds stay unpenalised (the rule today's engine follows by sparing them)."""
    from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList

    class PenaliseReply(LogitsProcessor):
        def __init__(self, start: int):
            self.start = start

        def __call__(self, input_ids, scores):
            said = input_ids[:, self.start:]
            picked = scores.gather(1, said)
            return scores.scatter(1, said, torch.where(picked > 0, picked / 1.8, picked * 1.8))

    folder = shutil.copytree(tiny_dir, tmp_path / "penalised", ignore=shutil.ignore_patterns(ct2.CONVERTED))
    config = GenerationConfig.from_model_config(slow.model.config)
    config.repetition_penalty = 1.8
    config.save_pretrained(folder)
    penalised = LocalChatModel.load(str(folder), tmp_path)
    try:
        expected, plain = [], []
        for messages in prompts():
            ids = torch.tensor([slow.prompt_ids(messages)])
            for out, oracle in ((expected, [PenaliseReply(ids.shape[1])]), (plain, [])):
                reply = slow.model.generate(ids, max_new_tokens=40, do_sample=False, repetition_penalty=1.0,
                                            logits_processor=LogitsProcessorList(oracle))[0, ids.shape[1]:]
                out.append(slow.tokenizer.decode(reply, skip_special_tokens=True))
        assert [text(await collect(penalised, m)) for m in prompts()] == expected
    finally:
        penalised.close()
    assert expected != plain  # the penalty changed replies, or the comparison proves nothing


async def test_an_abandoned_stream_leaves_its_round(fast):
    stream = fast.stream(prompts()[0], GenParams(temperature=0, max_tokens=200))
    await anext(stream)
    await stream.aclose()
    assert (await collect(fast, prompts()[1]))[-1].finish_reason in ("stop", "length")
    while fast.worker.in_flight:
        await asyncio.sleep(0.001)


async def test_past_its_lanes_a_differently_sampled_chat_waits_and_a_full_queue_is_busy(tiny_dir):
    busy = LocalChatModel.load(str(tiny_dir), tiny_dir.parent, lanes=1, max_waiting=1)
    held = busy.worker.model = Held(busy.worker.model)
    sampled = GenParams(temperature=0.7, max_tokens=4)
    first = busy.stream(prompts()[0], GREEDY)
    try:
        await anext(first)  # the greedy reply holds the only lane
        waiting = asyncio.ensure_future(collect(busy, prompts()[1], sampled))
        await wait_for(lambda: busy.worker.queued == 1)
        with pytest.raises(ModelBusy, match="busy with 2 conversations"):
            await collect(busy, prompts()[2], sampled)
        held.go.set()
        assert [c async for c in first][-1].finish_reason == "stop"
        assert (await waiting)[-1].finish_reason in ("stop", "length")  # served once the lane was free
    finally:
        held.go.set()
        busy.close()


async def test_closing_ends_replies_mid_way_and_lets_go_of_the_model(tiny_dir):
    closing = LocalChatModel.load(str(tiny_dir), tiny_dir.parent)
    held = closing.worker.model = Held(closing.worker.model)
    stream = closing.stream(prompts()[0], GREEDY)
    await anext(stream)
    closed = asyncio.ensure_future(asyncio.to_thread(closing.close))
    await wait_for(lambda: closing.worker._closed)
    held.go.set()
    await closed
    with pytest.raises(ModelError, match="shut down"):
        async for _ in stream:
            pass
    assert closing.model is None


def test_changed_weights_are_converted_again_with_a_line_only_for_a_big_model(tiny_dir, tmp_path, capsys,
                                                                            monkeypatch):
    folder = shutil.copytree(tiny_dir, tmp_path / "copy")  # copied with its converted copy, still current
    LocalChatModel.load(str(folder), tmp_path).close()
    assert capsys.readouterr().err == ""  # nothing converted, nothing said
    weights = folder / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 1))
    monkeypatch.setattr(ct2, "ANNOUNCE_BYTES", 0)  # as if the tiny model were SmolLM2-sized
    LocalChatModel.load(str(folder), tmp_path).close()
    assert f"Converting copy for CTranslate2 (int8, once) into {folder / ct2.CONVERTED}" in capsys.readouterr().err
    assert json.loads((folder / ct2.CONVERTED / ct2.RECORD).read_text())["weights"]["model.safetensors"][1] == \
           weights.stat().st_mtime_ns


def test_transformers_serves_a_gguf_file_and_forcing_ctranslate2_on_it_says_why(tiny_dir, tmp_path):
    gguf = export_gguf(build_tiny_gpt2(tmp_path / "g", n_positions=1024), tmp_path / "tiny.gguf")
    chat = LocalChatModel.load(str(gguf), tmp_path)
    try:
        assert chat.engine == "transformers"
    finally:
        chat.close()
    with pytest.raises(ModelError, match="cannot run on CTranslate2: a .gguf file"):
        LocalChatModel.load(str(gguf), tmp_path, engine="ctranslate2")


async def test_the_registry_serves_with_the_engine_the_setting_names(settings, tiny_dir):
    spec = ModelSpec(backend="local", path=str(tiny_dir))
    for engine, expected in (("auto", "ctranslate2"), ("transformers", "transformers"),
                             ("ctranslate2", "ctranslate2")):
        registry = ModelRegistry(settings.model_copy(update={"local_engine": engine}))
        try:
            model = await registry.get(spec)
            assert model.engine == expected and (await collect(model, prompts()[0]))[-1].finish_reason == "stop"
        finally:
            await registry.close()


def test_models_list_shows_the_engine_serving_each_model(tiny_dir, tmp_path, monkeypatch):
    from bot.cli.models import app

    models_dir = tmp_path / "data" / "models"
    shutil.copytree(tiny_dir, models_dir / "tiny")
    (models_dir / "odd").mkdir()  # an architecture CTranslate2 has no converter for
    (models_dir / "odd" / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(tmp_path / "data"))
    lines = CliRunner().invoke(app, ["list"]).output.splitlines()
    assert [(line.split()[0], line.split()[4]) for line in lines] == [("odd", "transformers"), ("tiny", "ctranslate2")]
    monkeypatch.setenv("PERSONABOT_LOCAL_ENGINE", "transformers")
    assert "ctranslate2" not in CliRunner().invoke(app, ["list"]).output


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora-merged"])
async def test_a_fine_tuned_gpt2_is_served_by_ctranslate2_with_no_extra_step(tmp_path, settings, tiny_dir, lora):
    from finetune.train import FinetuneConfig, run

    data = tmp_path / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": [
        {"role": "user", "content": f"Tell a joke about outliers, number {i}."},
        {"role": "assistant", "content": "Why did outliers break up? It found a better fit."}]}) + "\n"
        for i in range(40)))
    out = tmp_path / "comic"
    run(FinetuneConfig(out=out, base=str(tiny_dir), data=[data], max_steps=24, learning_rate=3e-3, lora=lora,
                       progress=False), settings)
    written = (out / ct2.CONVERTED / "model.bin").stat().st_mtime_ns  # finetune wrote the copy
    tuned = LocalChatModel.load(str(out), settings.models_dir)
    try:
        reply = text(await collect(tuned, [{"role": "user", "content": "Tell a joke about outliers, number 3."}]))
    finally:
        tuned.close()
    assert tuned.engine == "ctranslate2" and "break up" in reply
    assert (out / ct2.CONVERTED / "model.bin").stat().st_mtime_ns == written
