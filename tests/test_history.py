"""The history store on a real SQLite file and on a real PostgreSQL server (each test that is not about SQLite
runs on both): persistence, windows, contexts, migrations, export and usage."""
import asyncio
import json
import sqlite3
from datetime import datetime, timedelta, timezone

import asyncpg
import pytest
import typer
from typer.testing import CliRunner

from bot.cli import history as history_cli
from bot.conversation import ConvKey
from bot.history import HistoryError, HistoryStore
from bot.history_pg import PostgresHistoryStore
from bot.migrations import MIGRATIONS, SchemaTooNew, migrate
from bot.sql_dialect import to_postgres

CHAN = ConvKey("discord", "guild1", "chan1")
THREAD = ConvKey("discord", "guild1", "chan1", "thread9")


@pytest.fixture
def db_path(tmp_path):
    return tmp_path / "data" / "personabot.sqlite3"


@pytest.fixture
def open_store(db_path, store_url):
    """Opens the store under test: the SQLite file, or the test's PostgreSQL database."""
    return lambda: HistoryStore.open(db_path) if store_url is None else PostgresHistoryStore.open(store_url)


@pytest.fixture
async def store(open_store):
    store = await open_store()
    yield store
    await store.close()


@pytest.fixture
def query(db_path, store_url):
    """One portable statement on a connection of its own, beside the store; its rows."""
    async def run(sql, *params):
        if store_url is None:
            with sqlite3.connect(db_path) as db:
                return db.execute(sql, params).fetchall()
        connection = await asyncpg.connect(store_url)
        try:
            return [tuple(row) for row in await connection.fetch(to_postgres(sql), *params)]
        finally:
            await connection.close()
    return run


def rows(db_path, sql, *params):
    with sqlite3.connect(db_path) as db:
        return db.execute(sql, params).fetchall()


async def chat(store, key, *pairs, tokens=10):
    for question, answer in pairs:
        await store.append(key, "user", question, author="u1", persona="comic", tokens=tokens)
        await store.append(key, "assistant", answer, author="bot", persona="comic", tokens=tokens,
                           finish_reason="stop", prompt_tokens=100, completion_tokens=tokens)


async def test_turns_survive_closing_and_reopening_the_database(open_store, query):
    store = await open_store()
    await chat(store, CHAN, ("hi", "hello"))
    await store.close()

    store = await open_store()
    try:
        assert await store.window(CHAN, 1000) == [
            {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
        ]
    finally:
        await store.close()
    assert await query("SELECT role, author, persona, finish_reason FROM messages ORDER BY id") == [
        ("user", "u1", "comic", None), ("assistant", "bot", "comic", "stop"),
    ]


async def test_window_keeps_the_newest_turns_that_fit_the_budget_oldest_first(store):
    await chat(store, CHAN, ("q1", "a1"), ("q2", "a2"), ("q3", "a3"))

    assert await store.window(CHAN, 40) == [
        {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"},
        {"role": "user", "content": "q3"}, {"role": "assistant", "content": "a3"},
    ]


async def test_window_drops_a_reply_whose_question_fell_outside_the_budget(store):
    await chat(store, CHAN, ("q1", "a1"), ("q2", "a2"))

    assert await store.window(CHAN, 30) == [{"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert await store.window(CHAN, 0) == []


async def test_window_prices_turns_stored_without_a_count_with_the_counter(store):
    for text in ("one", "two", "three"):
        await store.append(CHAN, "user", text)

    window = await store.window(CHAN, 7, counter=lambda message: len(message["content"]))

    assert [m["content"] for m in window] == ["three"]


async def test_threads_and_channels_keep_separate_windows(store):
    await chat(store, CHAN, ("channel q", "channel a"))
    await chat(store, THREAD, ("thread q", "thread a"))

    assert [m["content"] for m in await store.window(THREAD, 1000)] == ["thread q", "thread a"]
    assert [m["content"] for m in await store.window(CHAN, 1000)] == ["channel q", "channel a"]


async def test_reset_starts_a_fresh_context_but_export_keeps_the_old_one(open_store):
    store = await open_store()
    await chat(store, CHAN, ("old q", "old a"))
    await store.reset(CHAN)
    await chat(store, CHAN, ("new q", "new a"))
    assert [m["content"] for m in await store.window(CHAN, 1000)] == ["new q", "new a"]
    await store.close()

    store = await open_store()
    try:
        assert [m["content"] for m in await store.window(CHAN, 1000)] == ["new q", "new a"]
        exported = [c async for c in store.export()]
    finally:
        await store.close()
    assert [[m["content"] for m in c["messages"]] for c in exported] == [["old q", "old a"], ["new q", "new a"]]


async def test_database_at_an_older_schema_version_is_migrated_on_open(db_path):
    db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    assert migrate(db, upto=1) == 1
    db.execute(
        "INSERT INTO messages (platform, workspace, channel, thread, role, content, prompt_tokens, completion_tokens,"
        " created_at) VALUES ('discord', 'guild1', 'chan1', '', 'assistant', 'from v1', 5, 7, ?)",
        (datetime.now(timezone.utc).isoformat(),),
    )
    db.close()

    store = await HistoryStore.open(db_path)
    try:
        assert await store.tokens_today(CHAN) == 12
    finally:
        await store.close()
    assert rows(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert rows(db_path, "SELECT name FROM sqlite_master WHERE name = 'messages_usage'") == [("messages_usage",)]
    assert rows(db_path, "SELECT content FROM messages") == [("from v1",)]


async def test_a_file_numbered_by_user_version_alone_is_recorded_by_name_and_upgraded(db_path):
    db_path.parent.mkdir(parents=True)
    db = sqlite3.connect(db_path, isolation_level=None)
    for step in MIGRATIONS[:2]:  # what personabot wrote before migrations were recorded by name
        step(db)
    db.execute("PRAGMA user_version = 2")
    db.execute("INSERT INTO messages (platform, workspace, channel, role, content, created_at)"
               " VALUES ('discord', 'guild1', 'chan1', 'user', 'kept', '2026-11-30T10:00:00')")
    db.close()

    store = await HistoryStore.open(db_path)
    try:
        assert await store.window(CHAN, 1000) == [{"role": "user", "content": "kept"}]
    finally:
        await store.close()
    assert rows(db_path, "SELECT name FROM schema_migrations ORDER BY name") == [(s.__name__,) for s in MIGRATIONS]
    assert rows(db_path, "PRAGMA user_version") == [(len(MIGRATIONS),)]


async def test_a_file_with_a_step_this_personabot_does_not_know_is_refused(db_path):
    await (await HistoryStore.open(db_path)).close()
    with sqlite3.connect(db_path) as db:
        db.execute("INSERT INTO schema_migrations VALUES ('m999_from_the_future', 'later')")

    with pytest.raises(SchemaTooNew, match="m999_from_the_future"):
        await HistoryStore.open(db_path)


async def test_database_from_a_newer_personabot_is_refused_untouched(db_path):
    db_path.parent.mkdir(parents=True)
    with sqlite3.connect(db_path) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")

    with pytest.raises(SchemaTooNew, match="upgrade personabot"):
        await HistoryStore.open(db_path)
    assert rows(db_path, "SELECT count(*) FROM sqlite_master") == [(0,)]


async def test_a_file_that_is_not_a_database_gives_a_clear_error(db_path):
    db_path.parent.mkdir(parents=True)
    db_path.write_bytes(b"these are my notes, not a database" * 100)

    with pytest.raises(HistoryError, match="not a usable personabot database"):
        await HistoryStore.open(db_path)
    assert db_path.read_bytes().startswith(b"these are my notes")


async def test_concurrent_appends_from_many_tasks_land_in_order_per_key(store, query):
    keys = [ConvKey("slack", "T1", f"C{i}") for i in range(40)]

    async def talk(key):
        return [await store.append(key, "user", f"{key.channel} #{n}") for n in range(25)]

    ids = await asyncio.gather(*(talk(key) for key in keys))

    for key, key_ids in zip(keys, ids):
        stored = await query("SELECT id, content FROM messages WHERE channel = ? ORDER BY id", key.channel)
        assert stored == [(i, f"{key.channel} #{n}") for n, i in enumerate(key_ids)]
    assert len({i for key_ids in ids for i in key_ids}) == 40 * 25


async def test_appends_still_queued_at_close_are_committed(open_store, query):
    store = await open_store()
    tasks = [asyncio.create_task(store.append(CHAN, "user", f"m{n}")) for n in range(50)]
    await asyncio.sleep(0)
    await store.close()

    assert all(task.done() and not task.exception() for task in tasks)
    assert await query("SELECT count(*) FROM messages") == [(50,)]
    with pytest.raises(HistoryError, match="closed"):
        await store.append(CHAN, "user", "too late")


async def test_a_failing_write_fails_alone_and_its_batch_mates_are_saved(store, db_path, store_url, query):
    if store_url is None:
        await query("CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.content = 'boom'"
                    " BEGIN SELECT RAISE(ABORT, 'refused by trigger'); END")
    else:
        await query("CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
                    " IF NEW.content = 'boom' THEN RAISE 'refused by trigger'; END IF; RETURN NEW; END $$")
        await query("CREATE TRIGGER refuse BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse()")

    results = await asyncio.gather(*(store.append(CHAN, "user", text) for text in ("a", "boom", "c")),
                                   return_exceptions=True)

    assert isinstance(results[1], HistoryError) and "refused by trigger" in str(results[1])
    assert [m["content"] for m in await store.window(CHAN, 1000)] == ["a", "c"]


async def test_an_unknown_role_is_refused_and_nothing_is_stored(store, query):
    with pytest.raises(ValueError, match="role must be one of"):
        await store.append(CHAN, "narrator", "Once upon a time")
    assert await query("SELECT count(*) FROM messages") == [(0,)]


async def test_usage_and_tokens_today_sum_prompt_and_completion_tokens(store, query):
    await chat(store, CHAN, ("q1", "a1"), ("q2", "a2"))  # 2 replies x (100 prompt + 10 completion)
    await chat(store, THREAD, ("q3", "a3"))  # same channel, in a thread
    await chat(store, ConvKey("slack", "T1", "C1"), ("q4", "a4"))
    yesterday = (datetime.now(timezone.utc) - timedelta(days=1)).isoformat()
    await query("INSERT INTO messages (platform, workspace, channel, role, content, persona, prompt_tokens,"
                " completion_tokens, created_at) VALUES ('discord', 'guild1', 'chan1', 'assistant', 'old',"
                " 'comic', 1000, 1000, ?)", yesterday)

    assert await store.tokens_today(THREAD) == 330
    await chat(store, CHAN, ("q5", "a5"))
    assert await store.tokens_today(CHAN) == 440

    today = datetime.now(timezone.utc).date()
    usage = await store.usage(today)
    assert [(r["platform"], r["channel"], r["persona"], r["day"], r["prompt_tokens"], r["completion_tokens"], r["total"])
            for r in usage] == [
        ("discord", "chan1", "comic", today.isoformat(), 400, 40, 440),
        ("slack", "C1", "comic", today.isoformat(), 100, 10, 110),
    ]
    assert sum(r["total"] for r in await store.usage(None)) == 550 + 2000


async def test_audit_rows_record_who_did_what_where(store, query):
    await store.audit(THREAD, "u42", "reset")
    await store.audit(CHAN, "u42", "set_persona", "comic")

    assert await query("SELECT platform, workspace, channel, thread, user_id, action, detail FROM audit ORDER BY id") == [
        ("discord", "guild1", "chan1", "thread9", "u42", "reset", ""),
        ("discord", "guild1", "chan1", "", "u42", "set_persona", "comic"),
    ]


async def test_channel_persona_and_settings_round_trip_and_apply_to_threads(open_store, query):
    store = await open_store()
    assert await store.get_persona(CHAN) is None
    await store.set_persona(THREAD, "comic")
    await store.set_setting(CHAN, "enabled", "1")
    await store.set_setting(CHAN, "quiet", "yes")
    await store.set_setting(CHAN, "quiet", None)
    await store.close()

    store = await open_store()
    try:
        assert await store.get_persona(CHAN) == "comic"
        assert await store.get_persona(ConvKey("discord", "guild1", "chan1", "other-thread")) == "comic"
        assert await store.get_persona(ConvKey("discord", "guild1", "chan2")) is None
        assert await store.get_setting(THREAD, "enabled") == "1"
        assert await store.get_setting(CHAN, "quiet") is None
    finally:
        await store.close()
    assert await query("SELECT channel, persona FROM channels") == [("chan1", "comic")]


# -- command line ---------------------------------------------------------------------------------------


@pytest.fixture
def cli(tmp_path, monkeypatch, store_url):
    """The sub-app and command wired the way the root CLI wires them, on the store under test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(tmp_path / "data"))
    if store_url is not None:
        monkeypatch.setenv("DATABASE_URL", store_url)
    root = typer.Typer()
    root.add_typer(history_cli.app, name="history")
    root.command()(history_cli.usage)
    return lambda *args: CliRunner().invoke(root, list(args))


async def seed_for_export(open_store):
    store = await open_store()
    await chat(store, CHAN, ("Tell me a joke", "Why did the p-value blush?"), ("Another", "It was significant."))
    await store.append(CHAN, "user", "unanswered trailing question")
    await store.append(ConvKey("discord", "guild1", "silent"), "user", "nobody answered me")
    await chat(store, ConvKey("slack", "T1", "C1"), ("Hi", "Hello"))
    await store.close()


def test_history_export_writes_openai_fine_tuning_jsonl(cli, tmp_path, open_store):
    asyncio.run(seed_for_export(open_store))

    result = cli("history", "export", "--out", str(tmp_path / "out" / "chats.jsonl"))

    assert result.exit_code == 0, result.output
    assert "Wrote 2 conversations" in result.output
    conversations = [json.loads(line) for line in (tmp_path / "out" / "chats.jsonl").read_text().splitlines()]
    for conversation in conversations:
        assert list(conversation) == ["messages"]
        assert all(set(m) == {"role", "content"} and m["role"] in ("system", "user", "assistant")
                   and isinstance(m["content"], str) for m in conversation["messages"])
        assert conversation["messages"][-1]["role"] == "assistant"
    assert [m["content"] for m in conversations[0]["messages"]] == [
        "Tell me a joke", "Why did the p-value blush?", "Another", "It was significant.",
    ]


def test_history_export_filters_by_platform(cli, tmp_path, open_store):
    asyncio.run(seed_for_export(open_store))

    result = cli("history", "export", "--platform", "slack", "--out", str(tmp_path / "slack.jsonl"))

    assert result.exit_code == 0, result.output
    lines = (tmp_path / "slack.jsonl").read_text().splitlines()
    assert [json.loads(line)["messages"] for line in lines] == [
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
    ]


def test_history_export_filters_by_persona(cli, tmp_path, open_store):
    async def seed():
        store = await open_store()
        await chat(store, CHAN, ("Joke?", "A p-value walks into a bar."))
        await store.reset(CHAN)
        await store.append(CHAN, "user", "Is the pager quiet?", persona="sre")
        await store.append(CHAN, "assistant", "Quiet. Too quiet.", persona="sre", finish_reason="stop")
        await store.close()

    asyncio.run(seed())
    result = cli("history", "export", "--persona", "sre", "--out", str(tmp_path / "sre.jsonl"))

    assert result.exit_code == 0, result.output
    assert [json.loads(line)["messages"] for line in (tmp_path / "sre.jsonl").read_text().splitlines()] == [
        [{"role": "user", "content": "Is the pager quiet?"}, {"role": "assistant", "content": "Quiet. Too quiet."}],
    ]


@pytest.mark.parametrize("store_url", [None])  # a PostgreSQL database is there before any history
def test_history_export_without_a_database_says_so(cli, tmp_path):
    result = cli("history", "export", "--out", str(tmp_path / "x.jsonl"))

    assert result.exit_code == 1 and "No history yet" in result.output
    assert not (tmp_path / "x.jsonl").exists()


def test_usage_command_prints_tokens_by_platform_channel_persona_and_day(cli, open_store):
    asyncio.run(seed_for_export(open_store))

    result = cli("usage", "--since", (datetime.now(timezone.utc) - timedelta(days=1)).date().isoformat())

    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0].split() == ["day", "platform", "channel", "persona", "prompt", "completion", "total"]
    assert lines[1].split()[1:] == ["discord", "guild1/chan1", "comic", "200", "20", "220"]
    assert lines[-1].split() == ["total", "300", "30", "330"]


def test_usage_command_rejects_a_date_it_cannot_read(cli, open_store):
    asyncio.run(seed_for_export(open_store))

    result = cli("usage", "--since", "last tuesday")

    assert result.exit_code == 2 and "YYYY-MM-DD" in result.output
