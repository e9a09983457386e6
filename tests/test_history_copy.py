"""`personabot history copy --to postgresql://…`: a bot moving from its SQLite file to PostgreSQL keeps its
history, personas and audit, and a copy never lands in a database that already has history."""
import asyncio
import sqlite3

import pytest
import typer
from typer.testing import CliRunner

from bot.cli import history as history_cli
from bot.conversation import ConvKey, Workspace
from bot.history import HistoryStore
from bot.history_copy import COPIED, SKIPPED
from bot.history_pg import PostgresHistoryStore
from bot.migrations import MIGRATIONS, migrate
from postgres_server import query

CHAN = ConvKey("discord", "guild1", "chan1")
OTHER = ConvKey("slack", "T1", "C1")
GUILD = Workspace("discord", "guild1")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "personabot.sqlite3"


@pytest.fixture
def copy(tmp_path, monkeypatch):
    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("DATABASE_URL", raising=False)
    root = typer.Typer()
    root.add_typer(history_cli.app, name="history")
    return lambda url: CliRunner().invoke(root, ["history", "copy", "--to", url])


async def chat(store, key, *pairs):
    for question, answer in pairs:
        await store.append(key, "user", question, author="u1", persona="comic", tokens=5)
        await store.append(key, "assistant", answer, author="bot", persona="comic", tokens=7,
                           finish_reason="stop", prompt_tokens=100, completion_tokens=7)


async def seed(db_path):
    store = await HistoryStore.open(db_path)
    await chat(store, CHAN, ("before the reset", "forgotten"))
    await store.reset(CHAN)
    await chat(store, CHAN, ("Tell me a joke", "Why did the p-value blush?"))
    await chat(store, OTHER, ("Hi", "Hello"))
    await store.set_persona(CHAN, "pirate")
    await store.save_workspace_persona(GUILD, "pirate", "name: pirate\n", saved_by="u1", by_owner=True)
    await store.save_workspace_persona(GUILD, "gone", "name: gone\n", saved_by="u1", by_owner=False)
    await store.save_workspace_persona(GUILD, "gone", None, saved_by="u1", by_owner=False)
    await store.audit(CHAN, "u1", "persona", "pirate")
    await store.audit(CHAN, "u1", "reset")
    await store.close()


async def seen(store):
    return {
        "windows": [await store.window(key, 10_000) for key in (CHAN, OTHER)],
        "persona": await store.get_persona(CHAN),
        "workspace personas": await store.workspace_personas(GUILD),
        "usage": await store.usage(),
        "export": [conversation async for conversation in store.export()],
    }


def test_every_table_the_migrations_create_is_copied_or_skipped_for_a_reason(tmp_path):
    db = sqlite3.connect(tmp_path / "schema.sqlite3", isolation_level=None)
    migrate(db)
    tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == set(COPIED) | set(SKIPPED), "a new table: add it to COPIED or SKIPPED in bot/history_copy.py"


async def read_sqlite(db_path):
    store = await HistoryStore.open(db_path)
    try:
        return await seen(store)
    finally:
        await store.close()


async def read_postgres_then_append(url):
    store = await PostgresHistoryStore.open(url)
    try:
        return await seen(store), await store.append(CHAN, "user", "first on PostgreSQL")
    finally:
        await store.close()


def test_a_copied_history_reads_the_same_on_postgresql_and_new_rows_get_fresh_ids(db_path, copy, database_url):
    asyncio.run(seed(db_path))
    expected = asyncio.run(read_sqlite(db_path))

    result = copy(database_url)

    assert result.exit_code == 0, result.output
    assert result.output.splitlines()[0].split() == ["messages", "6", "rows"]
    print(result.output)
    after, new_id = asyncio.run(read_postgres_then_append(database_url))
    assert after == expected
    assert new_id == 7
    assert query(database_url, "SELECT count(*) FROM audit") == [(2,)]
    assert query(database_url, "SELECT count(*) FROM schema_migrations") == [(len(MIGRATIONS),)]


def test_a_second_copy_into_the_same_database_is_refused_and_changes_nothing(db_path, copy, database_url):
    asyncio.run(seed(db_path))
    assert copy(database_url).exit_code == 0
    before = {table: query(database_url, f"SELECT * FROM {table} ORDER BY 1, 2") for table in COPIED}

    result = copy(database_url)

    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        f"Refused: {database_url} already has history (messages, contexts, channels, audit, personas not empty);"
        " copy only into a database no bot has used. Nothing was written."]
    assert {table: query(database_url, f"SELECT * FROM {table} ORDER BY 1, 2") for table in COPIED} == before


@pytest.mark.parametrize("bad_row", [
    "INSERT INTO notices_said VALUES ('discord', 'guild1', 'chan1', 'hello' || char(0), '2025-01-01')",
    "UPDATE messages SET tokens = 'many' WHERE id = 6",
], ids=["nul-in-text", "text-in-a-number"])
def test_a_row_postgresql_rejects_fails_the_copy_and_leaves_the_target_empty(db_path, copy, database_url, bad_row):
    asyncio.run(seed(db_path))
    with sqlite3.connect(db_path) as db:
        db.execute(bad_row)

    result = copy(database_url)

    assert result.exit_code == 1
    assert "nothing was written" in str(result.exception)
    assert [query(database_url, f"SELECT count(*) FROM {table}") for table in COPIED] == [[(0,)]] * len(COPIED)
