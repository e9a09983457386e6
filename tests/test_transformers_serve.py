"""The OpenAI backend against a real OpenAI-compatible server that is not ours: transformers' own
`transformers serve` (FastAPI + uvicorn), serving the tiny GPT-2 the other tests build, on a free local port.

This is what a deployment does with vLLM, TGI or Ollama: only OPENAI_BASE_URL and PERSONABOT_OPENAI_MODEL
change. The server needs `transformers[serving]` (the `test` extra installs it); without it the tests skip.
"""
from __future__ import annotations

import os
import shutil
import socket
import sqlite3
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="`transformers serve` needs transformers[serving] (pip install -e '.[test]')")
pytest.importorskip("uvicorn", reason="`transformers serve` needs transformers[serving] (pip install -e '.[test]')")
pytest.importorskip("transformers.cli.transformers", reason="`transformers serve` as transformers 5 has it")

from tiny_gpt2 import build_tiny_gpt2  # noqa: E402

from bot.config import Settings  # noqa: E402
from bot.conversation import ConvKey, Incoming, Role  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.models.base import GenParams  # noqa: E402
from bot.models.openai import OpenAIChatModel  # noqa: E402

# The project's GPT-2 chat format (bot/models/chat_format.py) as a Jinja chat template, which the server needs.
CHAT_FORMAT = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] | trim }}<|endoftext|>\n{% endfor %}"
               "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
PERSONA = """\
name: tiny
display_name: Tiny
description: The tiny test GPT-2, served by transformers.
system: Answer briefly.
model: {backend: openai, temperature: 0.0, max_tokens: 12, context_window: 1024}
"""
STARTUP_TIMEOUT = 90  # seconds; about 5 on an idle two-core machine


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """`transformers serve MODEL_DIR` in a subprocess, offline; yields (base_url, model name, model dir)."""
    model_dir = build_tiny_gpt2(tmp_path_factory.mktemp("served") / "tiny", chat_template=CHAT_FORMAT,
                                n_positions=1024)
    port = free_port()
    log = (model_dir.parent / "serve.log").open("w+b")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen(
        [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve", str(model_dir),
         "--host", "127.0.0.1", "--port", str(port), "--device", "cpu"],
        stdout=log, stderr=subprocess.STDOUT, env=env,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                log.seek(0)
                pytest.fail(f"transformers serve did not start:\n{log.read().decode(errors='replace')[-3000:]}")
            time.sleep(0.25)
        yield f"http://127.0.0.1:{port}/v1", str(model_dir), model_dir
    finally:
        server.terminate()
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        log.close()


async def test_openai_backend_streams_from_transformers_serve_with_finish_reason_and_usage(served):
    base_url, name, model_dir = served
    from transformers import AutoTokenizer

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello! How are you?"}]
    model = OpenAIChatModel(name, api_key="none", base_url=base_url, timeout=30)
    try:
        chunks = [chunk async for chunk in model.stream(messages, GenParams(temperature=0.0, max_tokens=12))]
    finally:
        await model.aclose()
    text = "".join(c.text for c in chunks if c.text)
    last = chunks[-1]
    prompt = AutoTokenizer.from_pretrained(model_dir).apply_chat_template(messages, add_generation_prompt=True,
                                                                         tokenize=True, return_dict=True)
    assert text.strip() and len(chunks) > 2  # streamed in pieces, not one blob
    assert last.finish_reason in ("stop", "length")
    # The server's own count (our fallback estimate would be UTF-8 bytes / 3), not an estimate.
    assert last.usage.prompt_tokens == len(prompt["input_ids"])
    assert 0 < last.usage.completion_tokens <= 12


async def test_engine_reply_through_transformers_serve_is_stored_with_finish_reason_and_usage(served, tmp_path):
    base_url, name, _ = served
    personas = tmp_path / "personas"
    shutil.copytree(Path(__file__).resolve().parent.parent / "personas", personas)
    (personas / "tiny.yaml").write_text(PERSONA)
    settings = Settings(_env_file=None, OPENAI_API_KEY="none", OPENAI_BASE_URL=base_url, PERSONABOT_OPENAI_MODEL=name,
                        PERSONABOT_DEFAULT_PERSONA="tiny", PERSONABOT_DATA_DIR=tmp_path / "data",
                        PERSONABOT_PERSONAS_DIR=personas, PERSONABOT_MODEL_TIMEOUT=30)
    engine = await Engine.create(settings, knowledge=False)
    try:
        incoming = Incoming(ConvKey("terminal", "local", "general"), "u1", "Tell me a joke about statistics.",
                            user_name="u1", role=Role.MEMBER)
        reply = "".join([piece async for piece in engine.reply(incoming)])
    finally:
        await engine.close()
    with sqlite3.connect(settings.db_path) as db:
        row = db.execute("SELECT content, finish_reason, prompt_tokens, completion_tokens FROM messages"
                         " WHERE role = 'assistant'").fetchone()
    content, finish_reason, prompt_tokens, completion_tokens = row
    assert reply.strip() and content.strip() and content in reply
    assert finish_reason in ("stop", "length")
    assert prompt_tokens > 0 and 0 < completion_tokens <= 12
