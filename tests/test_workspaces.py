"""Tenancy in the core: workspace personas, the operator's bounds, and a database from before workspaces.

Real SQLite files, the real `openai` client against the local OpenAI-compatible server, and the terminal chat
as a real process where the CLI is the point.
"""
from __future__ import annotations

import asyncio
import os
import shutil
import sqlite3
import sys
from pathlib import Path

import pytest
from openai_server import openai_server  # noqa: F401  (fixture)

from bot.config import Settings
from bot.conversation import ConvKey, Incoming, Role, Workspace
from bot.engine import Engine, NotAdmin, PersonaRefused
from bot.history import open_history
from bot.migrations import MIGRATIONS, migrate
from bot.personas import Persona, UnknownPersona

REPO = Path(__file__).resolve().parent.parent
ALPHA, BETA = ConvKey("discord", "111", "general"), ConvKey("discord", "222", "general")


def make_settings(tmp_path: Path, server, **extra) -> Settings:
    personas = tmp_path / "personas"
    if not personas.exists():
        shutil.copytree(REPO / "personas", personas)
    return Settings(_env_file=None, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=server.base_url,
                    PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=personas, **extra)


def on(store_url: str | None) -> dict:
    """The settings that put the engine on the store under test (SQLite when there is no URL)."""
    return {"DATABASE_URL": store_url} if store_url else {}


@pytest.fixture
async def engine(tmp_path, openai_server, store_url):
    engine = await Engine.create(make_settings(tmp_path, openai_server, **on(store_url)), knowledge=False)
    yield engine
    await engine.close()


def person(key: ConvKey, role: Role = Role.MEMBER, text: str = "", user: str = "u1") -> Incoming:
    return Incoming(key, user, text, user_name=user, role=role)


async def answer(engine: Engine, incoming: Incoming) -> str:
    return "".join([piece async for piece in engine.reply(incoming)])


# -- personas --------------------------------------------------------------------------------------


async def test_a_workspace_copy_of_a_shipped_persona_shadows_it_there_only(engine, openai_server):
    shipped = engine.personas.library.get("assistant")
    await engine.save_persona(person(ALPHA, Role.ADMIN), shipped.model_copy(update={"system": "Alpha's voice."}),
                              creating=False)

    await answer(engine, person(ALPHA, text="hi"))
    alpha_prompt = openai_server.last["messages"][0]["content"]
    await answer(engine, person(BETA, text="hi"))

    assert alpha_prompt == "Alpha's voice."
    assert openai_server.last["messages"][0]["content"] == shipped.system
    assert (engine.settings.personas_dir / "assistant.yaml").read_text().count("Alpha's voice") == 0


async def test_workspace_personas_survive_a_restart_and_keep_every_version(tmp_path, openai_server, store_url):
    settings = make_settings(tmp_path, openai_server, **on(store_url))
    engine = await Engine.create(settings, knowledge=False)
    admin = person(ALPHA, Role.ADMIN)
    await engine.save_persona(admin, Persona(name="pirate", system="Arr, first."), creating=True)
    await engine.save_persona(admin, Persona(name="pirate", system="Arr, second."), creating=False)
    await engine.close()

    engine = await Engine.create(settings, knowledge=False)
    try:
        assert (await engine.personas.get(ALPHA.tenant, "pirate")).system == "Arr, second."
        with pytest.raises(UnknownPersona):
            await engine.personas.get(BETA.tenant, "pirate")
    finally:
        await engine.close()
    store = await open_history(settings)
    try:
        versions = await store.fetch("SELECT yaml FROM personas WHERE name = 'pirate' ORDER BY id")
        actions = await store.fetch("SELECT workspace, action, detail FROM audit ORDER BY id")
    finally:
        await store.close()
    assert ["first" in v[0] for v in versions] == [True, False]  # the edit kept what it replaced
    assert actions == [("111", "create_persona", "pirate"), ("111", "edit_persona", "pirate")]


async def test_deleting_a_workspace_copy_brings_the_shipped_persona_back(engine):
    admin = person(ALPHA, Role.ADMIN)
    await engine.save_persona(admin, Persona(name="comic", system="Alpha's comic."), creating=False)

    await engine.delete_persona(admin, "comic")

    assert (await engine.personas.get(ALPHA.tenant, "comic")).system == engine.personas.library.get("comic").system
    with pytest.raises(NotAdmin, match="ships with the bot"):
        await engine.delete_persona(admin, "comic")


async def test_a_workspace_admin_has_no_powers_in_another_workspace(engine):
    alpha_admin_in_beta = person(BETA, Role.MEMBER, user="alpha-admin")  # Manage Server in Alpha only

    with pytest.raises(NotAdmin):
        await engine.set_persona(alpha_admin_in_beta, "comic")
    with pytest.raises(NotAdmin):
        await engine.save_persona(alpha_admin_in_beta, Persona(name="pirate", system="Arr."), creating=True)

    assert (await engine.active_persona(BETA)).name == "assistant"
    assert "pirate" not in await engine.personas.entries(BETA.tenant)


# -- bounds the operator sets ----------------------------------------------------------------------


async def test_no_persona_gets_more_reply_tokens_than_the_operator_allows(tmp_path, openai_server):
    settings = make_settings(tmp_path, openai_server, PERSONABOT_MAX_REPLY_TOKENS=256)
    (settings.personas_dir / "greedy.yaml").write_text("name: greedy\nsystem: Say a lot.\nmodel: {max_tokens: 1000000}\n")
    engine = await Engine.create(settings, knowledge=False)
    try:
        await engine.set_persona(person(ALPHA, Role.ADMIN), "greedy")
        await answer(engine, person(ALPHA, text="go"))
        with pytest.raises(PersonaRefused, match="above this bot's cap of 256"):
            await engine.save_persona(person(ALPHA, Role.OWNER),
                                      Persona(name="greedy2", system="More.", model={"max_tokens": 100000}),
                                      creating=True)
    finally:
        await engine.close()

    assert openai_server.last["max_tokens"] == 256


async def test_a_workspace_admin_may_pick_only_allowed_models_and_an_owner_any(engine):
    unlisted = Persona(name="fancy", system="Fancy.", model={"name": "gpt-unlisted"})

    with pytest.raises(PersonaRefused, match="'gpt-unlisted' is not a model this bot allows"):
        await engine.save_persona(person(ALPHA, Role.ADMIN), unlisted, creating=True)
    await engine.save_persona(person(ALPHA, Role.OWNER), unlisted, creating=True)

    assert (await engine.personas.get(ALPHA.tenant, "fancy")).model.name == "gpt-unlisted"


async def test_a_persona_whose_model_left_the_allow_list_answers_on_the_default(engine, openai_server):
    allowed = engine.settings.model_copy(update={"allowed_models": frozenset({"gpt-4o-mini", "gpt-old"})})
    engine.settings = allowed
    await engine.save_persona(person(ALPHA, Role.ADMIN), Persona(name="old", system="Old.", model={"name": "gpt-old"}),
                              creating=True)
    await engine.set_persona(person(ALPHA, Role.ADMIN), "old")
    engine.settings = allowed.model_copy(update={"allowed_models": frozenset({"gpt-4o-mini"})})

    await answer(engine, person(ALPHA, text="hi"))

    assert openai_server.last["model"] == "gpt-4o-mini"


# -- upgrade in place ------------------------------------------------------------------------------


async def test_a_database_from_before_workspaces_opens_with_nothing_lost(tmp_path, openai_server):
    settings = make_settings(tmp_path, openai_server)
    settings.db_path.parent.mkdir(parents=True)
    with sqlite3.connect(settings.db_path, isolation_level=None) as db:
        assert migrate(db, upto=2) == 2  # the schema the previous release wrote
        db.execute("INSERT INTO channels VALUES ('discord', '111', 'general', 'comic', '2026-11-30T10:00:00')")
        db.execute("INSERT INTO channel_settings VALUES ('slack', 'T1', 'C1', 'enabled', '1')")
        for role, content in (("user", "the codeword is swordfish"), ("assistant", "noted")):
            db.execute("INSERT INTO messages (platform, workspace, channel, role, content, created_at)"
                       " VALUES ('discord', '111', 'general', ?, ?, '2026-11-30T10:00:00')", (role, content))
        db.execute("INSERT INTO audit (time, platform, workspace, channel, user_id, action, detail)"
                   " VALUES ('2026-11-30T10:00:00', 'discord', '111', 'general', 'boss', 'set_persona', 'comic')")

    engine = await Engine.create(settings, knowledge=False)
    try:
        await answer(engine, person(ALPHA, text="what is the codeword?"))
        assert (await engine.active_persona(ALPHA)).name == "comic"
        assert await engine.channel_enabled(ConvKey("slack", "T1", "C1"))
        assert (await engine.active_persona(BETA)).name == "assistant"
    finally:
        await engine.close()
    sent = openai_server.last["messages"]
    assert sent[0]["content"] == engine.personas.library.get("comic").system
    assert {"role": "user", "content": "the codeword is swordfish"} in sent
    with sqlite3.connect(settings.db_path) as db:
        assert db.execute("SELECT count(*) FROM audit").fetchone()[0] == 1
        assert db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)


# -- the terminal ----------------------------------------------------------------------------------


async def run_chat(tmp_path: Path, server, stdin: str, *args: str, store_url: str | None = None) -> str:
    env = {**os.environ, "OPENAI_API_KEY": "sk-test", "OPENAI_BASE_URL": server.base_url,
           "PERSONABOT_DATA_DIR": str(tmp_path / "data"), "PERSONABOT_PERSONAS_DIR": str(REPO / "personas"),
           "PERSONABOT_KNOWLEDGE_DIR": str(tmp_path / "knowledge"), **on(store_url)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", *args, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=tmp_path, env=env)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
    assert proc.returncode == 0, err.decode()
    return out.decode()


async def test_terminal_workspaces_keep_their_personas_apart(tmp_path, openai_server, store_url):
    form = "/persona create pirate\nCaptain\n.\n.\nYou are a pirate.\n.\n.\n"
    made = await run_chat(tmp_path, openai_server, form + "/persona set pirate\nahoy\n", "chat", "--workspace", "a",
                          store_url=store_url)
    pirate_prompt = openai_server.last["messages"][0]["content"]
    other = await run_chat(tmp_path, openai_server, "/persona list\n/persona set pirate\n", "chat", "--workspace", "b",
                           store_url=store_url)
    exported = await run_chat(tmp_path, openai_server, "", "personas", "export", "--workspace", "terminal:a",
                              store_url=store_url)

    assert "Saved **Captain** for this workspace" in made and pirate_prompt == "You are a pirate."
    assert "pirate" not in other.split("There is no persona")[0] and "There is no persona named 'pirate'" in other
    assert exported.startswith("name: pirate\ndisplay_name: Captain\n") and "You are a pirate." in exported
    assert not (REPO / "personas" / "pirate.yaml").exists()
    assert (tmp_path / "data" / "personabot.sqlite3").exists() == (store_url is None)  # DATABASE_URL: no file
