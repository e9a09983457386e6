"""The engine's reply path, end to end: real SQLite file (and real PostgreSQL server, for the tests on the
`engine` fixture), real `openai` client, real HTTP test server."""
import asyncio
import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from openai_server import Reply, openai_server  # noqa: F401  (fixture)
from postgres_server import query

from bot.config import Settings
from bot.conversation import ConvKey, Incoming, Role
from bot.engine import (
    BUDGET_NOTICE, CONTENT_FILTER_NOTICE, CUT_OFF_NOTICE, PREFIX_TOKENS_CACHED, UNFINISHED_NOTICE, Engine, NotAdmin,
)
from bot.history import open_history
from bot.models.base import GenParams
from bot.models.openai import BROKE_OFF

SHIPPED_PERSONAS = Path(__file__).resolve().parent.parent / "personas"
CHANNEL = ConvKey("terminal", "local", "general")


def make_settings(tmp_path: Path, server, **extra) -> Settings:
    personas = tmp_path / "personas"
    if not personas.exists():
        shutil.copytree(SHIPPED_PERSONAS, personas)
    return Settings(
        _env_file=None,
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=server.base_url,
        PERSONABOT_MODEL_TIMEOUT=2,
        PERSONABOT_DATA_DIR=tmp_path / "data",
        PERSONABOT_PERSONAS_DIR=personas,
        **extra,
    )


@pytest.fixture
async def engine(tmp_path, openai_server, store_url):
    extra = {"DATABASE_URL": store_url} if store_url else {}
    engine = await Engine.create(make_settings(tmp_path, openai_server, **extra), knowledge=False)
    yield engine
    await engine.close()


def said(text: str, key: ConvKey = CHANNEL, *, admin: bool = False, user: str = "u1") -> Incoming:
    return Incoming(key, user, text, user_name=user, role=Role.ADMIN if admin else Role.MEMBER)


async def answer(engine: Engine, incoming: Incoming) -> str:
    return "".join([piece async for piece in engine.reply(incoming)])


async def test_reply_sends_persona_prompt_and_history_then_survives_restart(tmp_path, openai_server):
    settings = make_settings(tmp_path, openai_server)
    engine = await Engine.create(settings, knowledge=False)
    assert await answer(engine, said("first question")) == "echo: first question"
    await engine.close()

    engine = await Engine.create(settings, knowledge=False)
    try:
        await answer(engine, said("second question"))
    finally:
        await engine.close()
    sent = openai_server.last["messages"]
    assert sent[0]["role"] == "system" and sent[0]["content"] == engine.personas.library.get("assistant").system
    assert [m["content"] for m in sent[1:]] == ["first question", "echo: first question", "second question"]


async def test_few_shot_examples_follow_the_system_prompt(engine, openai_server):
    await engine.set_persona(said("", admin=True), "comic")
    await answer(engine, said("joke please"))
    comic = engine.personas.library.get("comic")
    sent = openai_server.last["messages"]
    assert sent[: 1 + len(comic.examples)] == comic.prefix()
    assert openai_server.last["temperature"] == comic.model.temperature


async def test_messages_in_one_channel_are_answered_in_arrival_order(engine, openai_server):
    # The first reply is slow, so the later ones queue behind it; each must still see every earlier turn.
    openai_server.script(Reply(text="one", delay=0.3), "two", "three", "four")
    replies = await asyncio.gather(*(answer(engine, said(f"m{i}")) for i in range(1, 5)))
    assert replies == ["one", "two", "three", "four"]
    last_history = [m["content"] for m in openai_server.last["messages"][1:]]
    assert last_history == ["m1", "one", "m2", "two", "m3", "three", "m4"]


async def test_a_slow_channel_does_not_hold_up_another(engine, openai_server):
    openai_server.script(Reply(text="slow", delay=1.0), "fast")
    slow = asyncio.create_task(answer(engine, said("A", ConvKey("terminal", "local", "a"))))
    await asyncio.sleep(0.1)  # let channel a's request reach the server first
    assert await answer(engine, said("B", ConvKey("terminal", "local", "b"))) == "fast"
    assert not slow.done()
    assert await slow == "slow"


async def test_history_is_kept_per_channel(engine, openai_server):
    await answer(engine, said("secret plans", ConvKey("discord", "g1", "c1")))
    await answer(engine, said("hello", ConvKey("discord", "g1", "c2")))
    assert "secret plans" not in str(openai_server.last["messages"])


async def test_one_off_answer_is_stored_and_counted_but_never_becomes_context(engine, openai_server):
    await answer(engine, said("remember the word walrus"))
    one_off = ""
    async for piece in engine.reply(said("what is a p-value?"), use_history=False):
        one_off += piece
    assert [m["content"] for m in openai_server.last["messages"] if m["role"] == "user"] == ["what is a p-value?"]

    await answer(engine, said("and now?"))
    sent = str(openai_server.last["messages"])
    assert "walrus" in sent and "p-value" not in sent
    threads = rows(engine, "SELECT thread FROM messages WHERE content LIKE '%p-value%' ORDER BY id")
    assert len(threads) == 2 and threads[0] == threads[1] and threads[0][0].startswith("one-off:")
    assert one_off == "echo: what is a p-value?"


async def test_history_is_trimmed_to_the_context_window(tmp_path, openai_server):
    persona_dir = tmp_path / "personas"
    shutil.copytree(SHIPPED_PERSONAS, persona_dir)
    (persona_dir / "tiny.yaml").write_text(
        "name: tiny\nsystem: Be brief.\nmodel: {context_window: 400, max_tokens: 100}\n"
    )
    settings = make_settings(tmp_path, openai_server, PERSONABOT_DEFAULT_PERSONA="tiny")
    engine = await Engine.create(settings, knowledge=False)
    try:
        for i in range(30):
            await answer(engine, said(f"message number {i} " + "padding " * 10))
        sent = openai_server.last["messages"]
        model = await engine.models.get(engine.personas.library.get("tiny").model)
        assert model.count_tokens(sent) <= 400 - 100
        assert sent[-1]["content"].startswith("message number 29")
        assert len(sent) < 20  # older turns were dropped, newest kept
    finally:
        await engine.close()


async def test_persona_switch_starts_a_new_context(engine, openai_server):
    await answer(engine, said("remember the llama"))
    await engine.set_persona(said("", admin=True), "sre")
    await answer(engine, said("what did I say?"))
    sent = openai_server.last["messages"]
    assert sent[0]["content"] == engine.personas.library.get("sre").system
    assert "llama" not in str(sent)


async def test_non_admin_cannot_switch_persona(engine):
    with pytest.raises(NotAdmin, match="Only this workspace's admins"):
        await engine.set_persona(said("", admin=False), "comic")
    assert (await engine.active_persona(CHANNEL)).name == "assistant"


async def test_admin_actions_are_audited(engine):
    await engine.set_persona(said("", admin=True, user="boss"), "comic")
    assert ("boss", "set_persona", "comic") in rows(engine, "SELECT user_id, action, detail FROM audit")


async def test_length_finish_marks_the_reply_as_cut_off(engine, openai_server):
    openai_server.script(Reply(text="and then the", finish_reason="length"))
    assert await answer(engine, said("tell me a long story")) == "and then the" + CUT_OFF_NOTICE


async def test_content_filter_gives_a_polite_notice(engine, openai_server):
    openai_server.script(Reply(text="", finish_reason="content_filter"))
    assert await answer(engine, said("something awful")) == CONTENT_FILTER_NOTICE


async def test_backend_error_gives_a_clear_message_and_keeps_the_users_turn(engine, openai_server):
    openai_server.script(*[Reply.error(500)] * 5)
    text = await answer(engine, said("are you there?"))
    assert text.startswith("Sorry, I couldn't answer that:")
    assert "Traceback" not in text
    await answer(engine, said("retrying"))
    assert [m["content"] for m in openai_server.last["messages"][1:]] == ["are you there?", "retrying"]


def rows(engine: Engine, sql: str) -> list[tuple]:
    """What the engine's store holds, read beside it (SQLite file or PostgreSQL database)."""
    if engine.settings.database_url:
        return query(engine.settings.database_url, sql)
    with sqlite3.connect(engine.history.path) as db:
        return db.execute(sql).fetchall()


def stored(engine: Engine) -> list[tuple[str, str, str | None]]:
    return rows(engine, "SELECT role, content, finish_reason FROM messages ORDER BY id")


@pytest.mark.parametrize("cut", [Reply(text="the answer is", drop_after=2),
                                 Reply(text="the answer", finish_reason=None)],
                         ids=["connection dropped", "no finish_reason"])
async def test_a_reply_that_broke_off_says_so_and_is_stored_as_unfinished(engine, openai_server, cut):
    openai_server.script(cut)
    assert await answer(engine, said("what is it?")) == "the answer" + UNFINISHED_NOTICE.format(error=BROKE_OFF)
    assert stored(engine) == [("user", "what is it?", None), ("assistant", "the answer", "error")]


async def test_a_refused_request_shows_a_plain_reason_and_logs_the_servers_words(engine, openai_server, caplog):
    openai_server.script(Reply.echoing_key("sk-proxy-FAKE0123456789"))
    with caplog.at_level(logging.WARNING):
        text = await answer(engine, said("hello"))
    assert text == ("Sorry, I couldn't answer that: The model server refused the request (HTTP 400); "
                    "the bot's log has the details.")
    assert "sk-proxy-FAKE0123456789" in caplog.text


@pytest.mark.parametrize("store_url", [None])  # SQLite's writer lock stands in for a slow disk
async def test_the_first_words_wait_until_the_users_turn_is_on_disk(engine, openai_server):
    await answer(engine, said("warm up"))  # the database exists and the conversation is cached
    slow_disk = sqlite3.connect(engine.history.path, isolation_level=None)
    slow_disk.execute("BEGIN IMMEDIATE")  # holds the write lock, as a slow disk would hold the commit
    pieces = engine.reply(said("are you keeping this?"))
    first = asyncio.ensure_future(anext(pieces))
    await asyncio.sleep(0.3)
    assert not first.done()  # the model answered long ago; the words wait for the commit
    slow_disk.execute("ROLLBACK")
    assert await first == "echo:"
    assert ("user", "are you keeping this?", None) in stored(engine)
    slow_disk.close()
    await pieces.aclose()


async def test_a_reply_cancelled_mid_stream_is_stored_as_far_as_it_was_shown(engine, openai_server):
    openai_server.script(Reply(text="one two three four", chunk_delay=0.05))
    pieces = engine.reply(said("count"))
    assert [await anext(pieces), await anext(pieces)] == ["one", " two"]
    await pieces.aclose()  # the reader went away (a deleted message, a shutdown)
    assert stored(engine) == [("user", "count", None), ("assistant", "one two", "error")]


async def test_many_conversations_leave_no_locks_behind(engine, openai_server):
    keys = [ConvKey("discord", "g1", f"c{n}", f"t{n % 7}") for n in range(300)]
    await asyncio.gather(*(answer(engine, said("hi", key)) for key in keys for _ in range(2)))
    assert engine.history.conversations_in_turn == 0


async def test_persona_edits_keep_the_prompt_token_cache_bounded(engine):
    persona = engine.personas.library.get("assistant")
    async with engine.models.use(persona.model) as model:
        for n in range(PREFIX_TOKENS_CACHED * 3):
            edited = persona.model_copy(update={"system": f"{persona.system} (edit {n})"})
            engine._history_budget(model, edited, GenParams(), 0)
    assert len(engine._prefix_tokens._items) == PREFIX_TOKENS_CACHED


async def test_backend_silence_times_out_with_a_clear_message(engine, openai_server):
    openai_server.script(Reply(text="never", delay=30))
    text = await answer(engine, said("hello?"))
    assert text.startswith("Sorry, I couldn't answer that:")
    assert "did not answer" in text


async def test_context_length_error_is_retried_once_with_less_history(engine, openai_server):
    for i in range(4):
        await answer(engine, said(f"turn {i}"))
    openai_server.script(Reply.context_length_exceeded(), "fits now")
    assert await answer(engine, said("last")) == "fits now"
    assert len(openai_server.requests[-1]["messages"]) < len(openai_server.requests[-2]["messages"])


async def test_daily_token_budget_stops_model_calls_politely(tmp_path, openai_server):
    engine = await Engine.create(make_settings(tmp_path, openai_server, PERSONABOT_DAILY_TOKEN_BUDGET=50), knowledge=False)
    try:
        await answer(engine, said("a question long enough to spend the whole small budget " * 5))
        calls = len(openai_server.requests)
        assert await answer(engine, said("another")) == BUDGET_NOTICE.format(budget=50)
        assert len(openai_server.requests) == calls
    finally:
        await engine.close()


async def test_daily_budget_holds_when_many_threads_of_a_channel_ask_at_once(tmp_path, openai_server):
    # Each reply spends 300 tokens; a budget of 1,000 while 12 threads ask at the same moment: each question was
    # let through by a spend read before any of the others had finished, so all 12 answered (3,600 tokens).
    engine = await Engine.create(make_settings(tmp_path, openai_server, PERSONABOT_DAILY_TOKEN_BUDGET=1000,
                                               PERSONABOT_MAX_REPLY_TOKENS=300), knowledge=False)
    openai_server.reply_with(lambda messages: Reply(text="an answer", delay=0.3,
                                                    usage={"prompt_tokens": 200, "completion_tokens": 100}))
    try:
        threads = [said(f"question {n}", CHANNEL._replace(thread=f"t{n}")) for n in range(12)]
        answers = await asyncio.gather(*(answer(engine, incoming) for incoming in threads))

        answered = [a for a in answers if a == "an answer"]
        assert len(answered) + answers.count(BUDGET_NOTICE.format(budget=1000)) == 12
        assert 300 * len(answered) <= 1000 + 300  # at most one reply past the budget, not every one in flight
        assert await engine.history.tokens_today(CHANNEL) == 300 * len(answered)
    finally:
        await engine.close()


async def test_reset_needs_an_admin_in_a_shared_channel_but_not_in_a_dm(engine, openai_server):
    await answer(engine, said("old context"))
    with pytest.raises(NotAdmin):
        await engine.reset(said("", admin=False))
    dm = Incoming(ConvKey("discord", "dm", "d1"), "u1", "", is_private=True)
    await engine.reset(dm)
    await engine.reset(said("", admin=True))
    await answer(engine, said("fresh"))
    assert "old context" not in str(openai_server.last["messages"])


async def test_stored_turns_carry_tokens_and_finish_reason(engine, openai_server, tmp_path):
    await answer(engine, said("count me"))
    store = await open_history(engine.settings)
    try:
        rows = await store.usage(None)
        assert sum(r["total"] for r in rows) > 0
    finally:
        await store.close()
