"""The Slack adapter under hostile input: replayed and forged requests, other bots, mentions cut across
streamed writes, many channels, and who may read /metrics.

As in test_slack.py: the real bolt app over HTTP on 127.0.0.1, signed requests as Slack sends them, a local
fake of Slack's Web API (tests/slack_api.py), the model played by tests/openai_server.py, a real SQLite file.
"""
from __future__ import annotations

import asyncio
import html
import logging
import random
import re
import sqlite3
import sys
import time

import aiohttp
import pytest
from aiohttp import web
from slack_sdk.web.async_client import AsyncWebClient

from bot.platforms.slack_bot import _Recent
from bot.platforms.slack_http import create_slack_app, create_web_app, run_slack
from bot.platforms.slack_replay import ReplayGuard
from bot.platforms.slack_reply import ChannelPacer, ThreadReply
from openai_server import Reply, openai_server  # noqa: F401  (fixture)
from postgres_server import SQLITE_ONLY
from slack_api import BOT_TOKEN, BOT_USER, TEAM, SlackApp, sign
from test_slack import api, config, engine, rig  # noqa: F401  (fixtures)
from test_slack import ADMIN, free_port, mention, stream_finished, wait_until_serving

FORM = "application/x-www-form-urlencoded"
ZWSP = "\u200b"
# What would notify someone if Slack showed it: any `<!…>` but a date, any `<@…>`, a bare @here/@channel/@everyone.
LIVE = re.compile(r"<!(?!date\^)|<@|@(?:here|channel|everyone)\b", re.IGNORECASE)


# -- replays ------------------------------------------------------------------------------------------------


async def test_slash_command_sent_again_within_its_window_runs_once(rig, caplog):
    caplog.set_level(logging.INFO)
    body = rig.slack.command_body("/ask", "spend my tokens", response_url=rig.api.response_url("ask"))
    timestamp = int(time.time())
    statuses = [(await rig.slack.post(body, FORM, timestamp=timestamp)).status for _ in range(3)]
    await rig.api.wait_for(lambda: rig.api.responses("ask"))
    await rig.slack.command("/ask", "later", response_url=rig.api.response_url("later"))
    await rig.api.wait_for(lambda: rig.api.responses("later"))

    assert statuses == [200, 401, 401]
    assert [r["messages"][-1]["content"] for r in rig.model.requests] == ["spend my tokens", "later"]
    assert len(rig.api.responses("ask")) == 1
    assert sum("replayed Slack request" in r.message and r.levelno == logging.INFO for r in caplog.records) == 2


async def test_form_submission_sent_again_saves_once(rig):
    await rig.slack.command("/persona", "create parrot", user=ADMIN, response_url=rig.api.response_url("form"))
    view = (await rig.api.wait_for(rig.api.opened_views))[0]
    body = rig.slack.view_submission_body(view, {"display_name": "Polly", "system": "You repeat things."},
                                          user=ADMIN)
    timestamp = int(time.time())

    first = await rig.slack.post(body, FORM, timestamp=timestamp)
    again = await rig.slack.post(body, FORM, timestamp=timestamp)
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.postEphemeral"))

    assert (first.status, again.status) == (200, 401)
    fetch = rig.engine.history.fetch
    assert await fetch("SELECT count(*) FROM audit WHERE action = 'create_persona'") == [(1,)]
    assert await fetch("SELECT count(*) FROM personas WHERE name = 'parrot'") == [(1,)]


async def test_event_replayed_to_another_process_is_acknowledged_and_not_answered(rig, config, engine):
    """A second bolt app on the same database stands in for a second process serving the same Slack app."""
    other = web.AppRunner(create_web_app(create_slack_app(engine, config)))
    await other.setup()
    await web.TCPSite(other, "127.0.0.1", 0).start()
    try:
        elsewhere = SlackApp(f"http://127.0.0.1:{other.addresses[0][1]}/slack/events", rig.slack.session)
        body = rig.slack.event_body(mention("hello", "1700000100.000001"))
        timestamp = int(time.time())
        first = await rig.slack.post(body, "application/json", timestamp=timestamp)
        copy = await elsewhere.post(body, "application/json", timestamp=timestamp)
        await stream_finished(rig)
        await rig.slack.event(mention("second", "1700000100.000002"))
        await stream_finished(rig, 2)
    finally:
        await other.cleanup()

    assert (first.status, copy.status, copy.acked) == (200, 200, "")
    assert [r["messages"][-1]["content"] for r in rig.model.requests] == ["hello", "second"]


# One process serving Slack: claims requests 0..keys-1 (all signed at one timestamp), from a common start.
RACER = """
import asyncio, sys, time
from pathlib import Path
from bot.platforms.slack_replay import ReplayGuard

async def claim(path, timestamp, keys):
    guard = ReplayGuard(Path(path))
    try:
        return sum([await guard.first_time(timestamp, f"v0=sig{n}") for n in range(keys)])
    finally:
        await guard.close()

path, timestamp, keys, start = sys.argv[1:]
time.sleep(max(0.0, float(start) - time.time()))
print(asyncio.run(claim(path, int(timestamp), int(keys))))
"""


@SQLITE_ONLY  # tests/test_postgres.py races PostgreSQL's guard
async def test_three_processes_racing_on_the_same_requests_let_each_through_once(engine):
    keys = 2_000
    args = ("-c", RACER, str(engine.settings.db_path), str(int(time.time())), str(keys), str(time.time() + 1))
    racers = [await asyncio.create_subprocess_exec(sys.executable, *args, stdout=asyncio.subprocess.PIPE)
              for _ in range(3)]
    claimed = [int((await racer.communicate())[0]) for racer in racers]

    assert sum(claimed) == keys, claimed


@SQLITE_ONLY
async def test_requests_older_than_the_window_are_forgotten(engine):
    now = [1_000_000.0]
    guard = ReplayGuard(engine.settings.db_path, clock=lambda: now[0])
    try:
        assert await guard.first_time(1_000_000, "v0=a")
        assert not await guard.first_time(1_000_000, "v0=a")
        now[0] += 301
        assert await guard.first_time(1_000_301, "v0=b")
    finally:
        await guard.close()

    with sqlite3.connect(engine.settings.db_path) as db:
        assert db.execute("SELECT signature FROM slack_requests").fetchall() == [("v0=b",)]


# -- nothing parsed before the signature holds ------------------------------------------------------------


@pytest.mark.parametrize("content_type, body, headers", [
    ("application/json", b'{"type": "event_callback", "event": {', {}),
    (FORM, b"payload=%7Bnot+json", {}),
    ("application/json", b"\xff\xfe not text at all", {}),
    ("application/json", b"{}", {"X-Slack-Request-Timestamp": "soon"}),
    ("application/json", b"{}", {"X-Slack-Signature": "v0=\u00e9t\u00e9"}),
], ids=["broken-json", "broken-payload", "not-utf8", "timestamp-not-a-number", "signature-not-ascii"])
async def test_malformed_request_with_a_bad_signature_is_refused_quietly(rig, caplog, content_type, body, headers):
    caplog.set_level(logging.INFO)
    timestamp = str(int(time.time()))
    sent = {"Content-Type": content_type, "X-Slack-Request-Timestamp": timestamp,
            "X-Slack-Signature": sign("something else", int(timestamp)), **headers}
    async with rig.slack.session.post(rig.slack.url, data=body, headers=sent) as response:
        status = response.status

    assert status == 401
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert rig.model.requests == []


# -- bots never answered ----------------------------------------------------------------------------------


@pytest.mark.parametrize("event", [
    {**mention("are you there?", "1700000200.000001", user="UOTHERBOT"), "bot_id": "B2"},
    mention("talking to myself", "1700000200.000001", user=BOT_USER),
    {"type": "message", "channel_type": "im", "channel": "D1", "user": BOT_USER, "text": "my own words",
     "ts": "1700000200.000001"},
    {"type": "message", "subtype": "bot_message", "channel_type": "im", "channel": "D1", "bot_id": "B2",
     "text": "a bot in my DMs", "ts": "1700000200.000001"},
], ids=["another-bots-mention", "own-mention", "own-dm", "bot-message-in-dm"])
async def test_messages_written_by_bots_are_never_answered(rig, event):
    await rig.slack.event(event)
    await rig.slack.event(mention("a person asks", "1700000200.000009"))
    await stream_finished(rig)

    assert [r["messages"][-1]["content"] for r in rig.model.requests] == ["a person asks"]
    assert len(rig.api.calls_to("chat.startStream", "chat.postMessage")) == 1


# -- mentions split across streamed writes --------------------------------------------------------------


async def test_channel_mention_split_across_two_writes_never_pings(rig):
    # The first piece goes out as the stream's first write; the rest comes a paced second later, in another.
    rig.model.script(Reply(text="Hi <!channel|a<b> all", chunks=["Hi <!channel|a<", "b> all"], chunk_delay=1.2))
    await rig.slack.event(mention("greet everyone", "1700000300.000001"))
    await stream_finished(rig)

    shown = rig.api.thread_text("C1", "1700000300.000001")
    assert len(rig.api.calls_to("chat.startStream", "chat.appendStream")) == 2
    assert not LIVE.search(shown)
    assert shown.replace(ZWSP, "") == "Hi @channel all"


def _token(rng: random.Random) -> tuple[str, str]:
    """A special token Slack knows, in a random form, and how the reader should see it."""
    name = rng.choice(["channel", "here", "everyone"])
    cased = rng.choice([name, name.upper(), name.title()])
    label = rng.choice(["@here", "here", "Everyone!", "a<b", "all of you"])
    return rng.choice([
        (f"<!{cased}>", f"@{name}"),
        (f"<!{cased}|{label}>", f"@{name}"),
        ("<!subteam^S123|@team>", "@team"),
        ("<!subteam^S123>", "@group"),
        ("<!SUBTEAM^S9|devs>", "@devs"),
        ("<@U123>", "@U123"),
        ("<@U123|bob>", "@bob"),
        ("<@W42|@ann>", "@ann"),
        ("<#C123>", "<#C123>"),
        ("<#C123|general>", "<#C123|general>"),
        ("<!date^1392734382^{date_short} at {time}|Feb 18th>", "<!date^1392734382^{date_short} at {time}|Feb 18th>"),
        (f"@{cased}", f"@{cased}"),
    ])


FILLER = ["hello", "a < b", "x > y", "mail me@example.com", "1 & 2", "ok.", "see <https://example.com|docs>", "<<",
          "line\nbreak", "<!-- note -->"]
FUZZ_SECONDS = 1.2  # per fuzz and delivery path; CI runs the seeds 0, 1, 2… that fit (20 at least)


def _chunks(rng: random.Random, text: str) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, len(text) // 2))))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "chat.update"])
async def test_mentions_cut_at_random_points_never_ping_and_read_as_written(api, streaming, capsys):
    api.streaming = streaming
    client = AsyncWebClient(token=BOT_TOKEN, base_url=api.api_url)
    cases = 0
    deadline = time.monotonic() + FUZZ_SECONDS
    while time.monotonic() < deadline or cases < 20:
        rng = random.Random(cases)
        parts = [_token(rng) if rng.random() < 0.6 else (word, word) for word in rng.choices(FILLER, k=6)]
        text, expected = " ".join(raw for raw, _ in parts), " ".join(seen for _, seen in parts)
        api.calls.clear()
        reply = ThreadReply(client, channel="C1", thread_ts=f"{cases}.0", team_id=TEAM, user_id="U1",
                            pacer=ChannelPacer(interval=0))  # no pacing: every piece that may go out, goes out
        for piece in _chunks(rng, text):
            await reply.write(piece)
        await reply.close()

        shown = api.thread_text("C1", f"{cases}.0")
        assert not LIVE.search(shown), f"case {cases}: {text!r} was shown as {shown!r}"
        if not streaming:  # chat.update carries mrkdwn, which escapes &, < and >
            shown, expected = " ".join(html.unescape(shown).split()), " ".join(expected.split())
        assert shown.replace(ZWSP, "") == expected, f"case {cases}: {text!r}"
        cases += 1
    with capsys.disabled():
        print(f"\n{cases} {'streamed' if streaming else 'chat.update'} replies of whole tokens fuzzed", file=sys.stderr)


@pytest.mark.parametrize("streaming", [True, False], ids=["streamed", "chat.update"])
async def test_fragments_of_tokens_in_any_order_never_ping(api, streaming, capsys):
    """Not well-formed tokens: shards of them (nested, unclosed, mixed case) in random order and cuts."""
    api.streaming = streaming
    shards = ["<", ">", "!", "@", "|", "^", "<!", "<@", "channel", "here", "EVERYONE", "Here", "subteam", "S1",
              "U1", "#C1", "date", " ", "x", "\n", "group"]
    client = AsyncWebClient(token=BOT_TOKEN, base_url=api.api_url)
    deadline = time.monotonic() + FUZZ_SECONDS
    cases = 0
    while time.monotonic() < deadline or cases < 20:
        rng = random.Random(cases)
        text = "".join(rng.choices(shards, k=rng.randint(5, 30)))
        api.calls.clear()
        reply = ThreadReply(client, channel="C1", thread_ts=f"{cases}.0", team_id=TEAM, user_id="U1",
                            pacer=ChannelPacer(interval=0))
        for piece in _chunks(rng, text):
            await reply.write(piece)
        await reply.close()

        shown = api.thread_text("C1", f"{cases}.0")
        assert not LIVE.search(shown), f"case {cases}: {text!r} was shown as {shown!r}"
        cases += 1
    with capsys.disabled():
        print(f"\n{cases} {'streamed' if streaming else 'chat.update'} replies of token fragments fuzzed",
              file=sys.stderr)


# -- bounded state ----------------------------------------------------------------------------------------


def test_event_dedupe_stays_bounded_across_many_channels():
    recent = _Recent(size=1_000)

    for n in range(20_000):
        assert recent.first_time(("message", TEAM, f"C{n}", "1700000000.000001"))

    assert len(recent) == 1_000
    assert not recent.first_time(("message", TEAM, "C19999", "1700000000.000001"))  # the newest are still known


def test_channel_pacer_remembers_only_channels_with_a_write_due():
    now = [0.0]
    pacer = ChannelPacer(interval=1.0, clock=lambda: now[0], size=500)

    for n in range(20_000):  # 20,000 channels written within 20 seconds
        now[0] += 0.001
        assert pacer.try_acquire((TEAM, f"C{n}"))
    busiest = len(pacer)
    now[0] += 5
    pacer.try_acquire((TEAM, "C0"))

    assert busiest <= 500 and len(pacer) == 1
    assert not pacer.try_acquire((TEAM, "C0"))  # pacing itself still holds


# -- the web server: where it listens, who reads /metrics -------------------------------------------------


def _serving(config, **update):
    config = config.model_copy(update={"port": free_port(), **update})
    return config, f"http://{config.bind_address}:{config.port}"


async def test_metrics_answer_only_the_configured_token(config, engine, api, openai_server):
    config, url = _serving(config, bind_address="127.0.0.1", metrics_token="s3cret-token")
    server = asyncio.create_task(run_slack(engine, config))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_serving(session, url, server)
            statuses = []
            for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret-token"},
                            {"Authorization": "Bearer s3cret-token"}):
                async with session.get(f"{url}/metrics", headers=headers) as response:
                    statuses.append(response.status)
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)

    assert statuses == [401, 401, 401, 200]


@pytest.mark.skipif(sys.platform != "linux", reason="binds 127.0.0.2, which only Linux routes to loopback")
async def test_slack_listens_only_on_the_configured_address(config, engine, api, openai_server):
    config, url = _serving(config, bind_address="127.0.0.2")
    server = asyncio.create_task(run_slack(engine, config))
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_serving(session, url, server)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.get(f"http://127.0.0.1:{config.port}/metrics"):
                    pass
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)
