"""The Slack adapter end to end: the real bolt app served over HTTP on 127.0.0.1, signed requests as Slack
sends them, its Web API calls answered by a local fake Slack (tests/slack_api.py), the model by the local
OpenAI-compatible server (tests/openai_server.py), history in a real SQLite file."""
from __future__ import annotations

import asyncio
import json
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import yaml

from bot.config import Settings
from bot.conversation import ConvKey
from bot.engine import Engine
from bot.platforms.slack_bot import SlackBot
from bot.platforms.slack_http import SlackConfigError, create_slack_app, run_slack
from bot.platforms.slack_format import MESSAGE_LIMIT, safe_to_send, to_mrkdwn
from bot.render import open_fence
from openai_server import OpenAIServer, Reply, openai_server  # noqa: F401  (fixture)
from slack_api import APP_TOKEN, BOT_USER, TEAM, FakeSlackApi, SlackApp, served, sign, slack_settings

ADMIN = "UADMIN"

PERSONAS = {
    "assistant": "name: assistant\nsystem: You are a helpful assistant.\n",
    "pirate": "name: pirate\ndisplay_name: Captain\ndescription: Talks like a pirate.\nsystem: You are a pirate.\n",
    "myna": "name: myna\ndisplay_name: Polly\navatar: polly.png\nsystem: You repeat things.\n",
    "robot": "name: robot\ndisplay_name: Robbie\navatar: ':robot_face:'\nsystem: You beep.\n",
}
PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 64  # a PNG signature is all the avatar route checks


@dataclass
class Rig:
    slack: SlackApp
    api: FakeSlackApi
    model: OpenAIServer
    engine: Engine
    url: str


@pytest.fixture
async def api():
    async with FakeSlackApi(admins={ADMIN}) as api:
        yield api


@pytest.fixture
def config(tmp_path, settings, openai_server, api) -> Settings:  # `settings` clears the host's environment
    config = slack_settings(tmp_path, PERSONAS, openai_server.base_url, api)
    (config.personas_dir / "polly.png").write_bytes(PNG)
    (config.personas_dir / "fake.png").write_text("name: not an image\n")
    return config


@pytest.fixture
async def engine(config):
    engine = await Engine.create(config, knowledge=False)
    yield engine
    await engine.close()


@pytest.fixture
async def rig(config, engine, api, openai_server):
    async with served(engine, config) as url, aiohttp.ClientSession() as session:
        yield Rig(SlackApp(f"{url}/slack/events", session), api, openai_server, engine, url)


def mention(text: str, ts: str, *, channel: str = "C1", user: str = "U1", thread_ts: str | None = None) -> dict:
    event = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER}> {text}", "ts": ts,
             "channel": channel, "event_ts": ts}
    if thread_ts:
        event["thread_ts"] = thread_ts
    return event


async def stream_finished(rig: Rig, count: int = 1) -> None:
    await rig.api.wait_for(lambda: len(rig.api.calls_to("chat.stopStream")) >= count)


# -- slash commands ----------------------------------------------------------------------------------


async def test_ask_is_acknowledged_before_a_slow_model_answers(rig):
    rig.model.script(Reply(text="Forty-two, after some thought.", delay=10))
    started = time.monotonic()
    response = await rig.slack.command("/ask", "what is the answer?", response_url=rig.api.response_url("ask"))
    acked_at = time.monotonic()

    assert response.status == 200
    assert acked_at - started < 3  # Slack's contract: an ack within three seconds
    answers = await rig.api.wait_for(lambda: rig.api.responses("ask"), timeout=30)
    assert answers[0]["response_type"] == "in_channel"
    assert "Forty-two" in answers[0]["text"]
    assert rig.api.calls_to("respond/ask")[0].at > acked_at


async def test_long_ask_answer_stays_within_five_response_url_replies(rig):
    code = "\n".join(f"line_{n} = '{'x' * 60}'" for n in range(500))
    rig.model.script(Reply(text=f"Here it is:\n```\n{code}\n```"))
    await rig.slack.command("/ask", "tell me everything", response_url=rig.api.response_url("long"))
    await rig.api.wait_for(lambda: any("cut short" in r["text"] for r in rig.api.responses("long")))
    await asyncio.sleep(0.2)  # room for a sixth reply, were one to be sent

    replies = [r["text"] for r in rig.api.responses("long")]
    assert len(replies) == 5 and all(len(text) <= MESSAGE_LIMIT for text in replies)
    assert replies[-1].endswith("mention me for long answers)_")
    assert all(open_fence(text) is None for text in replies)  # the notice is not shown as code


async def test_non_admin_cannot_switch_persona(rig):
    await rig.slack.command("/persona", "set pirate", user="U1", response_url=rig.api.response_url("set"))

    refusal = await rig.api.wait_for(lambda: rig.api.responses("set"))
    assert "Only this workspace's admins" in refusal[0]["text"]
    assert (await rig.engine.active_persona(ConvKey("slack", TEAM, "C1"))).name == "assistant"


async def test_workspace_admin_switches_the_channels_persona(rig):
    await rig.slack.command("/persona", "set pirate", user=ADMIN, response_url=rig.api.response_url("set"))

    done = await rig.api.wait_for(lambda: rig.api.responses("set"))
    assert "Captain" in done[0]["text"] and done[0]["response_type"] == "in_channel"
    assert (await rig.engine.active_persona(ConvKey("slack", TEAM, "C1"))).name == "pirate"
    assert [c.params["user"] for c in rig.api.calls_to("users.info")] == [ADMIN]


async def test_persona_list_marks_the_active_one(rig):
    await rig.slack.command("/persona", "list", response_url=rig.api.response_url("list"))

    listing = (await rig.api.wait_for(lambda: rig.api.responses("list")))[0]["text"]
    assert "▶ *Assistant* (`assistant`)" in listing and "• *Captain* (`pirate`)" in listing


async def test_knowledge_search_says_knowledge_is_not_enabled(rig):
    await rig.slack.command("/knowledge", "search refunds", response_url=rig.api.response_url("kb"))

    reply = (await rig.api.wait_for(lambda: rig.api.responses("kb")))[0]["text"]
    assert "not enabled" in reply


async def test_reset_in_a_dm_needs_no_admin(rig):
    await rig.slack.command("/reset", "", channel="D1", response_url=rig.api.response_url("reset"))

    reply = (await rig.api.wait_for(lambda: rig.api.responses("reset")))[0]["text"]
    assert reply.startswith("Context cleared")


# -- request security ---------------------------------------------------------------------------------


async def test_forged_signature_is_refused(rig):
    body = rig.slack.command_body("/ask", "hello", response_url=rig.api.response_url("x"))
    forged = sign(body, int(time.time()), secret="not-the-secret")

    response = await rig.slack.post(body, "application/x-www-form-urlencoded", signature=forged)

    assert response.status == 401
    assert rig.model.requests == []


async def test_request_older_than_five_minutes_is_refused(rig):
    body = rig.slack.command_body("/ask", "hello", response_url=rig.api.response_url("x"))

    response = await rig.slack.post(body, "application/x-www-form-urlencoded", timestamp=int(time.time()) - 6 * 60)

    assert response.status == 401
    assert rig.model.requests == []


async def test_retried_event_is_answered_once(rig):
    event = mention("hello there", "1700000000.000001")
    first = await rig.slack.event(event, event_id="Ev0RETRY")
    await stream_finished(rig)
    retry = await rig.slack.event(event, event_id="Ev0RETRY",
                                  headers={"X-Slack-Retry-Num": "1", "X-Slack-Retry-Reason": "http_timeout"})
    await rig.slack.event(mention("second", "1700000000.000002"))  # a later event, to know the retry was passed
    await stream_finished(rig, 2)

    assert (first.status, retry.status) == (200, 200)
    assert [r["messages"][-1]["content"] for r in rig.model.requests] == ["hello there", "second"]


# -- conversation ---------------------------------------------------------------------------------------


async def test_mention_is_answered_in_its_thread(rig):
    rig.model.script(Reply(text="Ahoy, **friend**!"))
    await rig.slack.event(mention("hi", "1700000001.000100"))
    await stream_finished(rig)

    assert rig.api.thread_text("C1", "1700000001.000100") == "Ahoy, **friend**!"
    start = rig.api.calls_to("chat.startStream")[0].params
    assert (start["recipient_user_id"], start["recipient_team_id"]) == ("U1", TEAM)


async def switch_persona(rig: Rig, name: str, channel: str = "C1") -> None:
    await rig.slack.command("/persona", f"set {name}", user=ADMIN, channel=channel,
                            response_url=rig.api.response_url(f"set-{name}"))
    await rig.api.wait_for(lambda: rig.api.responses(f"set-{name}"))


async def test_reply_streams_under_the_personas_name_and_emoji(rig):
    await switch_persona(rig, "robot")
    await rig.slack.event(mention("hi", "1700000011.000100"))
    await stream_finished(rig)

    start = rig.api.calls_to("chat.startStream")[0].params
    assert (start["username"], start["icon_emoji"]) == ("Robbie", ":robot_face:")


async def test_reply_posted_without_streaming_shows_the_personas_avatar_file(rig):
    rig.engine.settings = rig.engine.settings.model_copy(update={"public_url": "https://bot.example.com/"})
    rig.api.streaming = False
    await switch_persona(rig, "myna")
    await rig.slack.event(mention("hi", "1700000012.000100"))
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.postMessage"))

    posted = rig.api.calls_to("chat.postMessage")[0].params
    assert (posted["username"], posted["icon_url"]) == ("Polly", "https://bot.example.com/avatars/polly.png")


async def test_default_persona_replies_under_its_display_name(rig):
    await rig.slack.event(mention("hi", "1700000013.000100"))
    await stream_finished(rig)

    start = rig.api.calls_to("chat.startStream")[0].params
    assert start["username"] == "Assistant" and "icon_url" not in start and "icon_emoji" not in start


async def test_avatar_file_is_served_as_an_image(rig):
    async with rig.slack.session.get(f"{rig.url}/avatars/polly.png") as response:
        assert (response.status, response.content_type, await response.read()) == (200, "image/png", PNG)


@pytest.mark.parametrize("path", ["fake.png", "myna.yaml", "..%2Fpersonas%2Fpolly.png", "%2E%2E%2Fetc%2Fpasswd",
                                  "missing.png"])
async def test_avatar_route_serves_nothing_but_real_images_in_the_personas_folder(rig, path):
    async with rig.slack.session.get(f"{rig.url}/avatars/{path}") as response:
        assert response.status == 404


# -- Slack's AI-app surface: assistant threads in the app's DM ------------------------------------------


def thread_started(channel: str = "D1", thread_ts: str = "1700000020.000001") -> dict:
    return {"type": "assistant_thread_started", "event_ts": thread_ts,
            "assistant_thread": {"user_id": "U1", "channel_id": channel, "thread_ts": thread_ts, "context": {}}}


def assistant_question(text: str, ts: str, thread_ts: str = "1700000020.000001") -> dict:
    return {"type": "message", "channel_type": "im", "channel": "D1", "user": "U1", "text": text, "ts": ts,
            "thread_ts": thread_ts}


async def test_new_assistant_thread_suggests_the_personas_example_questions(rig):
    (rig.engine.settings.personas_dir / "assistant.yaml").write_text(
        PERSONAS["assistant"] + "examples:\n  - {role: user, content: How do refunds work?}\n"
        "  - {role: assistant, content: They take five days.}\n")
    await rig.engine.personas.library.refresh()

    await rig.slack.event(thread_started())
    (call,) = await rig.api.wait_for(lambda: rig.api.calls_to("assistant.threads.setSuggestedPrompts"))

    prompts = call.params["prompts"] if isinstance(call.params["prompts"], list) else json.loads(call.params["prompts"])
    assert (call.params["channel_id"], call.params["thread_ts"]) == ("D1", "1700000020.000001")
    assert prompts == [{"title": "How do refunds work?", "message": "How do refunds work?"}]


async def test_assistant_question_shows_thinking_titles_the_thread_once_and_is_answered_in_it(rig):
    await rig.slack.event(assistant_question("what is a persona?", "1700000020.000100"))
    await stream_finished(rig)
    await rig.slack.event(assistant_question("and a webhook?", "1700000020.000200"))
    await stream_finished(rig, 2)

    statuses = rig.api.calls_to("assistant.threads.setStatus")
    titles = rig.api.calls_to("assistant.threads.setTitle")
    assert [c.params["status"] for c in statuses] == ["is thinking…", "is thinking…"]
    assert [c.params["title"] for c in titles] == ["what is a persona?"]
    assert statuses[0].at < rig.api.calls_to("chat.startStream")[0].at
    assert rig.api.thread_text("D1", "1700000020.000001") == "echo: what is a persona?\necho: and a webhook?"


async def test_a_thread_sees_only_its_own_history(rig):
    await rig.slack.event(mention("my name is Ann", "1700000002.000001"))
    await stream_finished(rig, 1)
    await rig.slack.event(mention("my name is Bob", "1700000003.000001"))
    await stream_finished(rig, 2)
    await rig.slack.event(mention("what is my name?", "1700000002.000009", thread_ts="1700000002.000001"))
    await stream_finished(rig, 3)

    seen = [m["content"] for m in rig.model.requests[-1]["messages"]]
    assert "my name is Ann" in seen and "my name is Bob" not in seen
    assert rig.api.thread_text("C1", "1700000002.000001").count("echo:") == 2


async def test_direct_message_is_answered_in_its_thread(rig):
    await rig.slack.event({"type": "message", "channel_type": "im", "channel": "D1", "user": "U1",
                           "text": "hello in private", "ts": "1700000004.000001"})
    await stream_finished(rig)

    assert rig.api.thread_text("D1", "1700000004.000001") == "echo: hello in private"


async def test_broadcast_mentions_from_the_model_never_ping(rig):
    rig.model.script(Reply(text="Attention <!channel> and <!here|here>, @everyone and <!subteam^S1|@devs>!",
                           chunks=["Attention <!chan", "nel> and <!here|here>, @every", "one and <!subteam^S1|@devs>!"]))
    await rig.slack.event(mention("announce it", "1700000005.000001"))
    await stream_finished(rig)

    shown = rig.api.thread_text("C1", "1700000005.000001")
    assert "<!" not in shown and "@everyone" not in shown
    assert shown.replace("\u200b", "") == "Attention @channel and @here, @everyone and @devs!"


async def test_long_answer_without_streaming_is_split_at_the_message_limit(rig):
    rig.api.streaming = False
    paragraphs = [f"Paragraph {n}: " + "word " * 150 for n in range(12)]
    rig.model.script(Reply(text="\n\n".join(paragraphs), chunks=[p + "\n\n" for p in paragraphs]))
    await rig.slack.event(mention("tell me a lot", "1700000006.000001"))
    await rig.api.wait_for(lambda: "Paragraph 11" in rig.api.thread_text("C1", "1700000006.000001"))

    posted = rig.api.calls_to("chat.postMessage")
    assert len(posted) > 1 and all(len(c.params["text"]) <= MESSAGE_LIMIT for c in posted)
    assert " ".join(rig.api.thread_text("C1", "1700000006.000001").split()) == " ".join("\n\n".join(paragraphs).split())


async def test_shared_file_is_not_downloaded_when_knowledge_is_off(rig):
    rig.api.files["F1"] = ("handbook.md", b"# Handbook\nRefunds take 5 days.")
    await rig.slack.event({"type": "message", "subtype": "file_share", "channel_type": "im", "channel": "D1",
                           "user": ADMIN, "text": "", "ts": "1700000007.000001",
                           "files": [{"id": "F1", "name": "handbook.md"}]})
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.postMessage"))

    assert rig.api.downloads == []
    assert "not enabled" in rig.api.calls_to("chat.postMessage")[0].params["text"]
    assert rig.model.requests == []


async def test_file_shared_by_a_non_admin_is_refused_without_downloading_it(rig):
    rig.api.files["F3"] = ("secrets.md", b"# Not for the bot")
    await rig.slack.event({"type": "message", "subtype": "file_share", "channel_type": "im", "channel": "D2",
                           "user": "U1", "text": "add", "ts": "1700000009.000001",
                           "files": [{"id": "F3", "name": "secrets.md"}]})
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.postMessage"))

    assert "Only this workspace's admins" in rig.api.calls_to("chat.postMessage")[0].params["text"]
    assert rig.api.downloads == []


async def test_file_shared_with_a_question_gets_an_answer_not_an_upload(rig):
    rig.api.files["F2"] = ("screenshot.png", b"\x89PNG")
    await rig.slack.event({**mention("why does this fail?", "1700000008.000001", channel="C8"),
                           "files": [{"id": "F2", "name": "screenshot.png"}]})
    await stream_finished(rig)

    # Read as the question's context (tests/test_images_in.py has the rest): four bytes are no picture.
    assert rig.api.thread_text("C8", "1700000008.000001") == (
        "_(I left out screenshot.png: it isn't a PNG, JPEG, GIF or WebP image)_\n\n"
        "echo: why does this fail?\n\n[image not read: screenshot.png]")
    assert rig.api.downloads == ["F2"]


async def test_healthz_answers_ok(rig):
    async with rig.slack.session.get(f"{rig.url}/healthz") as response:
        assert (response.status, await response.json()) == (200, {"ok": True})


async def answered_ok(rig) -> float:
    async with rig.slack.session.get(f"{rig.url}/metrics") as response:
        assert response.status == 200 and response.content_type == "text/plain"
        text = await response.text()
    line = 'personabot_replies_total{outcome="ok",platform="slack"} '
    return next((float(row[len(line):]) for row in text.splitlines() if row.startswith(line)), 0.0)


async def test_metrics_count_each_answered_command(rig):
    before = await answered_ok(rig)
    rig.model.script(Reply(text="Counted."))
    await rig.slack.command("/ask", "count me", response_url=rig.api.response_url("m"))
    await rig.api.wait_for(lambda: rig.api.responses("m"))

    assert await answered_ok(rig) == before + 1


# -- run_slack: the entry point `personabot run` uses ------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_run_slack_serves_events_and_healthz_on_port(config, engine, api, openai_server):
    config = config.model_copy(update={"port": free_port()})
    server = asyncio.create_task(run_slack(engine, config))
    url = f"http://127.0.0.1:{config.port}"
    try:
        async with aiohttp.ClientSession() as session:
            await wait_until_serving(session, url, server)
            slack = SlackApp(f"{url}/slack/events", session)
            response = await slack.command("/ask", "over http", response_url=api.response_url("http"))
            assert response.status == 200
            assert (await api.wait_for(lambda: api.responses("http")))[0]["text"] == "echo: over http"
    finally:
        server.cancel()
        await asyncio.gather(server, return_exceptions=True)


async def wait_until_serving(session: aiohttp.ClientSession, url: str, server: asyncio.Task) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if server.done():
            server.result()  # surfaces a startup error
        try:
            async with session.get(f"{url}/healthz") as response:
                if response.status == 200:
                    return
        except aiohttp.ClientConnectionError:
            pass
        await asyncio.sleep(0.05)
    raise AssertionError("the Slack web server never answered /healthz")


async def test_run_slack_in_socket_mode_acks_commands_over_the_socket(config, engine, api, openai_server):
    config = config.model_copy(update={"slack_app_token": APP_TOKEN, "slack_signing_secret": None, "port": free_port()})
    client = asyncio.create_task(run_slack(engine, config))
    url = f"http://127.0.0.1:{config.port}"
    try:
        async with aiohttp.ClientSession() as session:
            # The web process stays healthy for the host, but takes no events without a signing secret.
            await wait_until_serving(session, url, client)
            async with session.post(f"{url}/slack/events", data=b"{}") as response:
                assert response.status == 404
        await asyncio.wait_for(api.socket_connected.wait(), 20)
        envelope = await api.push("slash_commands", {
            "command": "/ask", "text": "over the socket", "team_id": TEAM, "channel_id": "C1", "user_id": "U1",
            "user_name": "u1", "response_url": api.response_url("socket"), "trigger_id": "t1",
        })
        answer = await api.wait_for(lambda: api.responses("socket"))
        assert answer[0]["text"] == "echo: over the socket"
        assert [a["envelope_id"] for a in api.socket_acks] == [envelope]
    finally:
        client.cancel()
        await asyncio.gather(client, return_exceptions=True)


async def test_http_mode_without_a_signing_secret_refuses_to_start(config, engine):
    with pytest.raises(SlackConfigError, match="SLACK_SIGNING_SECRET"):
        create_slack_app(engine, config.model_copy(update={"slack_signing_secret": None}))


# -- formatting ---------------------------------------------------------------------------------------------


def test_markdown_becomes_mrkdwn_with_links_kept_and_brackets_escaped():
    assert to_mrkdwn("**Bold** [docs](https://x.y/a?b=1) if a < b & c") == "*Bold* <https://x.y/a?b=1|docs> if a &lt; b &amp; c"


def test_stream_holds_back_a_mention_that_may_be_incomplete():
    assert safe_to_send("ok <!chan") == 3
    assert safe_to_send("ok @ever") == 3
    assert safe_to_send("ok <https://x.y> done") == len("ok <https://x.y> done")
    assert safe_to_send("ok <") == 3
    assert safe_to_send("ok <!here and a < b") == 3


def test_stream_does_not_hold_back_a_plain_less_than_sign():
    assert safe_to_send("if a < b then") == len("if a < b then")


class _Registrations:
    """Takes bolt's registration calls, to read back what `SlackBot.register` listens to."""

    def __init__(self):
        self.commands: set[str] = set()
        self.events: set[str] = set()
        self.views: set[str] = set()

    def middleware(self, function):
        return function

    def view(self, callback_id: str):
        self.views.add(callback_id)
        return lambda listener: listener

    def command(self, name: str):
        self.commands.add(name)
        return lambda listener: listener

    def event(self, name: str):
        self.events.add(name)
        return lambda listener: listener

    def assistant(self, assistant):
        """bolt's Assistant middleware takes the assistant threads' events (and their DMs, message.im)."""
        self.events |= {"assistant_thread_started", "assistant_thread_context_changed"}


async def test_manifest_declares_exactly_the_commands_and_events_the_app_handles(engine):
    manifest = yaml.safe_load((Path(__file__).resolve().parent.parent / "slack-manifest.yml").read_text())
    registered = _Registrations()
    SlackBot(engine).register(registered)

    assert {c["command"] for c in manifest["features"]["slash_commands"]} == registered.commands
    events = manifest["settings"]["event_subscriptions"]["bot_events"]
    # A workspace's tokens are removed on these (bolt's revocation listeners with OAuth installs; see
    # test_slack_installs.py).
    revocations = {"tokens_revoked", "app_uninstalled"}
    assert {event.split(".")[0] for event in events} == registered.events | revocations
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    needed = {"app_mention": "app_mentions:read", "message.im": "im:history", "message.channels": "channels:history",
              "message.groups": "groups:history", "assistant_thread_started": "assistant:write",
              "assistant_thread_context_changed": "assistant:write", "tokens_revoked": None, "app_uninstalled": None}
    assert {needed[event] for event in events} - {None} | {"commands", "chat:write", "chat:write.customize"} <= scopes
    # Installs in many workspaces (SLACK_CLIENT_ID) come back to GET /slack/oauth_redirect.
    redirects = manifest["oauth_config"]["redirect_urls"]
    assert len(redirects) == 1 and redirects[0].endswith("/slack/oauth_redirect")
    # The persona forms come back as signed view_submission requests to the same URL.
    assert registered.views and manifest["settings"]["interactivity"]["is_enabled"]
    assert manifest["settings"]["interactivity"]["request_url"].endswith("/slack/events")
    assert "assistant_view" in manifest["features"]
