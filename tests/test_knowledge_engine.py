"""Grounding through the engine: a persona with knowledge answers from its collection and cites it, over the
real `openai` client against a real HTTP test server, with real MiniLM and FAISS."""
from __future__ import annotations

import pytest
from openai_server import openai_server  # noqa: F401  (fixture)

from bot.config import Settings
from bot.conversation import ConvKey, Incoming, Role
from bot.engine import Engine, NotAdmin
from bot.history import HistoryStore
from bot.models.registry import ModelRegistry
from bot.personas import PersonaLibrary
from bot.retrieval import Retriever

LIBRARIAN = """\
name: librarian
display_name: Librarian
description: Answers from the handbook.
system: You answer questions about the company from the handbook.
knowledge: [handbook]
"""
HANDBOOK = "# Handbook\n\n## Holidays\n\nEvery employee gets 27 days of paid holiday a year.\n"
CHANNEL = ConvKey("terminal", "local", "general")
ADMIN = Incoming(CHANNEL, "boss", "", user_name="boss", role=Role.ADMIN)


@pytest.fixture
async def engine(tmp_path, openai_server, embedder):
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "librarian.yaml").write_text(LIBRARIAN)
    settings = Settings(
        _env_file=None, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url,
        PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=personas,
        PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge", PERSONABOT_DEFAULT_PERSONA="librarian",
    )
    retriever = await Retriever.open(settings, embedder=embedder)
    engine = Engine(settings, PersonaLibrary(personas), await HistoryStore.open(settings.db_path),
                    ModelRegistry(settings), retriever)
    yield engine
    await engine.close()


async def ask(engine: Engine, text: str) -> str:
    incoming = Incoming(CHANNEL, "u1", text, user_name="u1")
    return "".join([piece async for piece in engine.reply(incoming)])


async def test_persona_answers_from_an_uploaded_file_and_cites_it(engine, openai_server):
    await engine.add_knowledge(ADMIN, "handbook.md", HANDBOOK.encode())
    openai_server.script("You get 27 days [1].")

    reply = await ask(engine, "How many days of paid holiday do I get?")

    system = openai_server.requests[-1]["messages"][0]["content"]
    assert "27 days of paid holiday" in system and "not instructions" in system
    assert reply == "You get 27 days [1].\n\nSources: [1] handbook/handbook.md § Handbook › Holidays"


async def test_persona_is_told_it_has_no_source_when_nothing_matches(engine, openai_server):
    await engine.add_knowledge(ADMIN, "handbook.md", HANDBOOK.encode())
    openai_server.script("I have no source for that.")

    reply = await ask(engine, "What is the melting point of tungsten?")

    system = openai_server.requests[-1]["messages"][0]["content"]
    assert "no source for that" in system and "27 days" not in system
    assert reply == "I have no source for that."


async def test_history_gives_up_room_for_the_passages_so_the_prompt_fits_the_window(engine, openai_server):
    (engine.personas.library.directory / "archivist.yaml").write_text(
        LIBRARIAN.replace("name: librarian", "name: archivist") + "model: {context_window: 3000, max_tokens: 200}\n")
    persona = await engine.set_persona(ADMIN, "archivist")
    sections = "".join(f"## Holiday rule {n}\n\nPaid holiday rule {n}: " + "holiday days are booked with the team "
                       "lead and carried over to the next year only with approval. " * 6 + "\n\n" for n in range(12))
    await engine.add_knowledge(ADMIN, "holidays.md", f"# Holidays\n\n{sections}".encode())
    for n in range(40):
        await ask(engine, f"Message {n} about something else entirely: " + "lorem ipsum dolor " * 20)

    await ask(engine, "How are paid holiday days booked and carried over?")

    sent = openai_server.requests[-1]["messages"]
    model = await engine.models.get(persona.model)
    assert "Holiday rule" in sent[0]["content"]  # the passages made it in
    assert sum(1 for m in sent if m["content"].startswith("Message ")) >= 2  # and so did some history
    assert model.count_tokens(sent) <= 3000 - 200


async def test_a_persona_never_cites_another_workspaces_collection_of_the_same_name(engine, openai_server):
    other = Incoming(ConvKey("slack", "T2", "C1"), "boss2", "", user_name="boss2", role=Role.ADMIN)
    await engine.add_knowledge(other, "handbook.md", HANDBOOK.encode(), "handbook")
    openai_server.script("I have no source for that.")

    await ask(engine, "How many days of paid holiday do I get?")  # this workspace's librarian cites "handbook"

    system = openai_server.requests[-1]["messages"][0]["content"]
    assert "27 days" not in system and "no source for that" in system
    assert await engine.search_knowledge(Incoming(CHANNEL, "u1", ""), "paid holiday") == []


async def test_an_owner_adds_global_knowledge_from_chat_and_an_admin_may_not(engine):
    owner = Incoming(ConvKey("slack", "T2", "C1"), "root", "", role=Role.OWNER)

    with pytest.raises(NotAdmin, match="owners"):
        await engine.add_knowledge(ADMIN, "handbook.md", HANDBOOK.encode(), "global:handbook")
    await engine.add_knowledge(owner, "handbook.md", HANDBOOK.encode(), "global:handbook")

    hits = await engine.search_knowledge(Incoming(CHANNEL, "u1", ""), "paid holiday")
    assert [hit.source for hit in hits] == ["handbook/handbook.md"]
    assert (engine.settings.knowledge_dir / "handbook" / "handbook.md").exists()
