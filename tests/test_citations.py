"""Citations a reader can trust: every source in a reply's footer is a passage the model was shown, cut from
that document. Real text (the documentation of Python's own standard library, which nobody here wrote),
real MiniLM, FAISS and FTS5, the real `openai` client against a scripted HTTP server."""
from __future__ import annotations

import csv
import heapq
import json
import re
import shelve

import pytest
from openai_server import openai_server  # noqa: F401  (fixture)

from bot.config import Settings
from bot.conversation import ConvKey, Incoming
from bot.engine import Engine
from bot.history import HistoryStore
from bot.models.registry import ModelRegistry
from bot.personas import PersonaLibrary
from bot.retrieval import Retriever

PERSONA = """\
name: pydocs
display_name: Python docs
description: Answers from the standard library's documentation.
system: You answer questions about Python from its documentation.
knowledge: [stdlib]
"""
CHANNEL = ConvKey("terminal", "local", "general")
MODULES = {"heapq": heapq, "json": json, "csv": csv, "shelve": shelve}


@pytest.fixture
async def engine(tmp_path, openai_server, embedder):
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "pydocs.yaml").write_text(PERSONA)
    folder = tmp_path / "knowledge" / "stdlib"
    folder.mkdir(parents=True)
    for name, module in MODULES.items():
        (folder / f"{name}.txt").write_text(module.__doc__)
    settings = Settings(
        _env_file=None, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url,
        PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=personas,
        PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge", PERSONABOT_DEFAULT_PERSONA="pydocs",
    )
    retriever = await Retriever.open(settings, embedder=embedder)
    await retriever.sync()
    engine = Engine(settings, PersonaLibrary(personas), await HistoryStore.open(settings.db_path),
                    ModelRegistry(settings), retriever)
    yield engine
    await engine.close()


def shown_passages(system: str) -> dict[int, tuple[str, str]]:
    """{number: (citation, text)} of the passages in the system message's knowledge block."""
    block = system.split("<<<KNOWLEDGE>>>\n", 1)[1].split("\n<<<END KNOWLEDGE>>>", 1)[0]
    parts = re.split(r"(?m)^\[(\d+)\] (.+)$", block)
    return {int(n): (citation, text.strip()) for n, citation, text in zip(parts[1::3], parts[2::3], parts[3::3])}


async def test_only_passages_the_model_was_shown_and_cited_appear_as_sources(engine, openai_server):
    def cite(messages: list[dict]) -> str:
        shown = shown_passages(messages[0]["content"])
        used = next(n for n, (_, text) in shown.items() if "heappush" in text)
        # one real citation, one number never shown, and an index in code that is no citation at all
        return f"Push with heappush(heap, item) [{used}]; heap[0] is the smallest [{len(shown) + 5}]."

    openai_server.reply_with(cite)

    reply = "".join([p async for p in engine.reply(
        Incoming(CHANNEL, "u1", "How do I push items onto a heap and pop the smallest one?"))])

    shown = shown_passages(openai_server.requests[-1]["messages"][0]["content"])
    answer, footer = reply.split("\n\nSources: ")
    cited = [(int(n), citation) for group, citation in re.findall(r"\[([\d, ]+)\] ([^;]+)", footer)
             for n in group.split(", ")]
    assert len(shown) > 1  # the passage it did not cite is left out of the footer too
    assert [citation.split(" § ")[0] for _, citation in cited] == ["stdlib/heapq.txt"]
    for n, citation in cited:
        assert shown[n][0] == citation  # shown to the model under that number and that name...
        assert shown[n][1] in heapq.__doc__  # ...and cut from that document
    assert f"[{len(shown) + 5}]" in answer and f"[{len(shown) + 5}]" not in footer


def test_a_reply_without_numbered_citations_lists_every_passage_it_was_shown():
    from bot.retrieval.search import build, Hit

    hits = [Hit("docs/a.md", "A", "alpha", 1.0, tokens=1), Hit("docs/b.md", "B", "beta", 0.9, tokens=1)]
    grounding = build(hits, ["docs"], 500, lambda texts: [1] * len(texts))

    assert grounding.footer("Use items[1] of the list.") == "Sources: [1] docs/a.md § A; [2] docs/b.md § B"
    assert grounding.footer("It is beta [2, 9].") == "Sources: [2] docs/b.md § B"
    assert grounding.footer("As [9] says.") == ""
