"""One bot, two Slack workspaces: T1 and T2 both have a channel C1, each has its own admin, and nothing one
workspace does (personas made or edited in chat, channel state, spend, uploaded knowledge) shows in the other.

The real bolt app over HTTP on 127.0.0.1, signed requests as Slack sends them (tests/slack_api.py), the model
played by tests/openai_server.py, history in a real SQLite file; as in test_slack.py.
"""
from __future__ import annotations

import itertools
import time
from dataclasses import dataclass

import aiohttp
import pytest

from bot.config import Settings
from bot.conversation import ConvKey
from bot.engine import Engine
from openai_server import OpenAIServer, Reply, openai_server  # noqa: F401  (fixture)
from slack_api import BOT_USER, FakeSlackApi, SlackApp, served, sign, slack_settings

T1, T2 = "T1", "T2"
ADMIN1, ADMIN2 = "UADMIN1", "UADMIN2"  # T1's admin, T2's admin
MEMBER = "UMEMBER1"  # a member of T1, admin nowhere

ASSISTANT = "You are a helpful assistant."
COMIC = "You are a stand-up comic."
PERSONAS = {
    "assistant": f"name: assistant\nsystem: {ASSISTANT}\n",
    "comic": f"name: comic\ndisplay_name: Comic\ndescription: Tells jokes.\nsystem: {COMIC}\n",
}
PIRATE = {"display_name": "Captain Redbeard", "description": "Talks like a pirate.",
          "system": "You are Captain Redbeard. Speak like a pirate.", "extra": ""}
HANDBOOK = b"# Handbook\n\n## Holidays\n\nEvery employee gets 27 days of paid holiday a year.\n"


@dataclass
class Rig:
    slack: SlackApp
    api: FakeSlackApi
    model: OpenAIServer
    engine: Engine
    config: Settings


@pytest.fixture
async def api():
    async with FakeSlackApi(admins={ADMIN1, ADMIN2}) as api:
        yield api


@pytest.fixture
def config(tmp_path, settings, openai_server, api) -> Settings:  # `settings` clears the host's environment
    return slack_settings(tmp_path, PERSONAS, openai_server.base_url, api,
                          PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge",
                          PERSONABOT_ALLOWED_MODELS="gpt-4o-mini,gpt-4o", PERSONABOT_MAX_REPLY_TOKENS=2048)


async def serve(engine: Engine, config: Settings, api: FakeSlackApi, model: OpenAIServer):
    try:
        async with served(engine, config) as url, aiohttp.ClientSession() as session:
            yield Rig(SlackApp(f"{url}/slack/events", session), api, model, engine, config)
    finally:
        await engine.close()


@pytest.fixture
async def rig(config, api, openai_server):
    async for rig in serve(await Engine.create(config, knowledge=False), config, api, openai_server):
        yield rig


@pytest.fixture
async def knowledge_rig(config, api, openai_server):
    async for rig in serve(await Engine.create(config, knowledge=True), config, api, openai_server):
        yield rig


# -- what a user does, and what they see --------------------------------------------------------------------

_names = itertools.count(1)
_stamps = itertools.count(1)


async def say(rig: Rig, command: str, text: str, *, team: str, user: str, channel: str = "C1") -> str:
    """Run a slash command; the bot's first answer to it, as the user sees it."""
    name = f"r{next(_names)}"
    await rig.slack.command(command, text, team=team, user=user, channel=channel,
                            response_url=rig.api.response_url(name))
    return (await rig.api.wait_for(lambda: rig.api.responses(name)))[0]["text"]


async def open_form(rig: Rig, text: str, *, team: str, user: str, channel: str = "C1") -> dict:
    """Run `/persona create|edit …`; the modal Slack shows for it."""
    opened = len(rig.api.opened_views())
    await rig.slack.command("/persona", text, team=team, user=user, channel=channel,
                            response_url=rig.api.response_url("form"))
    return (await rig.api.wait_for(lambda: rig.api.opened_views()[opened:]))[0]


async def save_form(rig: Rig, view: dict, values: dict[str, str], *, team: str, user: str) -> tuple[int, dict | None]:
    """Press Save: the HTTP status and the body Slack gets back (`response_action: errors` or empty)."""
    response = await rig.slack.submit_view(view, values, user=user, team=team)
    return response.status, response.acked or None


async def create_pirate(rig: Rig) -> None:
    view = await open_form(rig, "create pirate", team=T1, user=ADMIN1)
    status, body = await save_form(rig, view, PIRATE, team=T1, user=ADMIN1)
    assert (status, body) == (200, None)
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.postEphemeral"))


async def mention(rig: Rig, text: str, *, team: str, channel: str = "C1", user: str = "U1",
                  thread_ts: str | None = None, ts: str | None = None) -> dict:
    """Mention the bot and wait for its reply to finish; the model request it made."""
    ts = ts or f"1700000{next(_stamps):03d}.000001"
    event = {"type": "app_mention", "user": user, "text": f"<@{BOT_USER}> {text}", "ts": ts, "channel": channel,
             "event_ts": ts, **({"thread_ts": thread_ts} if thread_ts else {})}
    finished = len(rig.api.calls_to("chat.stopStream"))
    await rig.slack.event(event, team=team)
    await rig.api.wait_for(lambda: len(rig.api.calls_to("chat.stopStream")) > finished)
    return next(r for r in reversed(rig.model.requests) if r["messages"][-1]["content"] == text)


async def dm(rig: Rig, text: str, *, ts: str, thread_ts: str | None = None, user: str = MEMBER) -> dict:
    """A message to the bot in D1 of T1 (a reply in its thread when `thread_ts`); the model request it made."""
    finished = len(rig.api.calls_to("chat.stopStream"))
    await rig.slack.event({"type": "message", "channel_type": "im", "channel": "D1", "user": user, "text": text,
                           "ts": ts, **({"thread_ts": thread_ts} if thread_ts else {})}, team=T1)
    await rig.api.wait_for(lambda: len(rig.api.calls_to("chat.stopStream")) > finished)
    return rig.model.requests[-1]


def system_prompt(request: dict) -> str:
    return request["messages"][0]["content"]


def seen_by_model(request: dict) -> str:
    return "\n".join(m["content"] for m in request["messages"])


# -- personas made in chat stay in their workspace -------------------------------------------------------


async def test_admin_creates_a_persona_in_a_form_and_switches_their_channel_to_it(rig):
    await create_pirate(rig)

    saved = rig.api.calls_to("chat.postEphemeral")[0].params
    assert (saved["channel"], saved["user"]) == ("C1", ADMIN1) and "Saved *Captain Redbeard*" in saved["text"]
    assert "Now speaking as *Captain Redbeard*" in await say(rig, "/persona", "set pirate", team=T1, user=ADMIN1)
    assert system_prompt(await mention(rig, "ahoy?", team=T1)) == PIRATE["system"]


async def test_persona_made_in_one_workspace_does_not_exist_in_another(rig):
    await create_pirate(rig)

    listing = await say(rig, "/persona", "list", team=T2, user=ADMIN2)
    shown = await say(rig, "/persona", "show pirate", team=T2, user=ADMIN2)
    switched = await say(rig, "/persona", "set pirate", team=T2, user=ADMIN2)

    assert "pirate" not in listing and "Redbeard" not in listing
    assert shown.startswith("There is no persona named 'pirate'") and "Redbeard" not in shown
    assert switched.startswith("There is no persona named 'pirate' (available: assistant, comic)")
    assert "pirate" in await say(rig, "/persona", "list", team=T1, user=ADMIN1)


async def test_editing_a_shipped_persona_changes_it_in_that_workspace_only(rig, config):
    shipped = (config.personas_dir / "assistant.yaml").read_text()
    view = await open_form(rig, "edit assistant", team=T1, user=ADMIN1)
    assert [b["element"].get("initial_value") for b in view["blocks"] if b["block_id"] == "system"] == [ASSISTANT]

    status, body = await save_form(rig, view, {"system": "You answer only in haiku."}, team=T1, user=ADMIN1)

    assert (status, body) == (200, None)
    saved = await rig.api.wait_for(lambda: rig.api.calls_to("chat.postEphemeral"))
    assert "own copy (the shipped one is unchanged elsewhere)" in saved[0].params["text"]
    assert system_prompt(await mention(rig, "spring?", team=T1)) == "You answer only in haiku."
    assert system_prompt(await mention(rig, "summer?", team=T2)) == ASSISTANT
    assert (config.personas_dir / "assistant.yaml").read_text() == shipped


async def test_another_workspaces_admin_cannot_edit_or_delete_its_persona(rig):
    await create_pirate(rig)

    edited = await say(rig, "/persona", "edit pirate", team=T2, user=ADMIN2)
    deleted = await say(rig, "/persona", "delete pirate", team=T2, user=ADMIN2)

    assert edited.startswith("There is no persona named 'pirate'")
    assert deleted.startswith("There is no persona named 'pirate'")
    assert len(rig.api.opened_views()) == 1  # only T1's own create form ever opened
    assert "Captain Redbeard" in await say(rig, "/persona", "show pirate", team=T1, user=ADMIN1)


async def test_member_is_told_only_admins_manage_personas_and_nothing_changes(rig):
    await create_pirate(rig)

    refusals = [await say(rig, "/persona", text, team=T1, user=MEMBER)
                for text in ("create parrot", "edit pirate", "delete pirate")]

    for action, refusal in zip(("create", "edit", "delete"), refusals):
        assert refusal.startswith(f"Only this workspace's admins can {action} personas")
        assert refusal.endswith("Nothing was changed.")
    assert len(rig.api.opened_views()) == 1
    assert "Captain Redbeard" in await say(rig, "/persona", "show pirate", team=T1, user=MEMBER)


async def test_member_who_submits_an_admins_form_is_refused_on_the_form(rig):
    view = await open_form(rig, "create parrot", team=T1, user=ADMIN1)

    status, body = await save_form(rig, view, {**PIRATE, "system": "Squawk."}, team=T1, user=MEMBER)

    assert status == 200 and body["response_action"] == "errors"
    assert "Only this workspace's admins can create or edit personas" in " ".join(body["errors"].values())
    assert "parrot" not in await say(rig, "/persona", "list", team=T1, user=ADMIN1)


# -- the persona form refuses what it may not save, on the form ------------------------------------------


async def test_invalid_yaml_in_the_form_is_shown_on_the_form_and_nothing_is_saved(rig):
    view = await open_form(rig, "create pirate", team=T1, user=ADMIN1)

    status, body = await save_form(rig, view, {**PIRATE, "extra": "model: {temperature: 0.9\nknowledge: ["},
                                   team=T1, user=ADMIN1)

    assert status == 200 and body["response_action"] == "errors"
    assert list(body["errors"]) == ["extra"] and body["errors"]["extra"].startswith("Not saved")
    assert rig.api.calls_to("chat.postEphemeral") == []
    assert "pirate" not in await say(rig, "/persona", "list", team=T1, user=ADMIN1)


@pytest.mark.parametrize("extra, reason", [
    ("model: {name: gpt-some-unlisted}",
     "model.name: 'gpt-some-unlisted' is not a model this bot allows; choose one of: gpt-4o, gpt-4o-mini"),
    ("model: {max_tokens: 1000000}", "model.max_tokens: 1000000 is above this bot's cap of 2048"),
])
async def test_form_refuses_model_settings_outside_the_operators_bounds_and_says_why(rig, extra, reason):
    view = await open_form(rig, "create pirate", team=T1, user=ADMIN1)

    status, body = await save_form(rig, view, {**PIRATE, "extra": extra}, team=T1, user=ADMIN1)

    assert status == 200 and body["response_action"] == "errors"
    assert reason in " ".join(body["errors"].values())
    assert "pirate" not in await say(rig, "/persona", "list", team=T1, user=ADMIN1)


# -- channel state belongs to the workspace, whatever the channel id -------------------------------------


async def test_switching_a_channels_persona_leaves_the_same_channel_id_in_another_workspace_alone(rig):
    await say(rig, "/persona", "set comic", team=T1, user=ADMIN1)

    assert system_prompt(await mention(rig, "knock knock", team=T1)) == COMIC
    assert system_prompt(await mention(rig, "who is there?", team=T2)) == ASSISTANT


async def test_switching_persona_gives_a_thread_already_going_on_a_clean_slate(rig):
    await mention(rig, "my codeword is FIG-8", team=T1, ts="1700000940.000001")

    await say(rig, "/persona", "set comic", team=T1, user=ADMIN1)

    after = await mention(rig, "the codeword?", team=T1, thread_ts="1700000940.000001")
    assert system_prompt(after) == COMIC and "FIG" not in seen_by_model(after)


async def test_enabling_a_channel_leaves_the_same_channel_id_in_another_workspace_alone(rig):
    assert (await say(rig, "/channel", "enable", team=T1, user=ADMIN1)).startswith("I'll answer every message")

    assert await rig.engine.channel_enabled(ConvKey("slack", T1, "C1"))
    assert not await rig.engine.channel_enabled(ConvKey("slack", T2, "C1"))


async def test_a_message_in_an_enabled_channel_is_answered_only_in_that_workspace(rig):
    await say(rig, "/channel", "enable", team=T1, user=ADMIN1)

    for team, ts in ((T2, "1700000900.000001"), (T1, "1700000901.000001")):
        await rig.slack.event({"type": "message", "channel_type": "channel", "channel": "C1", "user": "U1",
                               "text": f"unmentioned in {team}", "ts": ts}, team=team)
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.stopStream"))
    await mention(rig, "and now a mention in T2", team=T2)  # T2's plain message was handled before this

    asked = [r["messages"][-1]["content"] for r in rig.model.requests]
    assert asked == ["unmentioned in T1", "and now a mention in T2"]


async def test_same_channel_and_timestamp_in_two_workspaces_are_two_messages(rig):
    await mention(rig, "hello from T1", team=T1, ts="1700000950.000001")
    await mention(rig, "hello from T2", team=T2, ts="1700000950.000001")

    assert [r["messages"][-1]["content"] for r in rig.model.requests] == ["hello from T1", "hello from T2"]
    assert [c.params["recipient_team_id"] for c in rig.api.calls_to("chat.startStream")] == [T1, T2]


async def test_replies_in_the_same_channel_id_of_two_workspaces_are_not_paced_as_one_channel(rig):
    # Slack's one-write-a-second is per channel of a workspace; T1's busy C1 must not hold back T2's C1.
    for team, ts in ((T1, "1700000955.000001"), (T2, "1700000956.000001")):
        event = {"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> hi from {team}", "ts": ts,
                 "channel": "C1", "event_ts": ts}
        await rig.slack.event(event, team=team)
    done = await rig.api.wait_for(lambda: (stops := rig.api.calls_to("chat.stopStream"))[1:] and stops)

    assert abs(done[1].at - done[0].at) < 0.5  # one shared pacer puts a full second between them


# -- /ask is a one-off --------------------------------------------------------------------------------------


async def test_ask_never_sees_a_mention_threads_history(rig):
    await mention(rig, "my codeword is PAPAYA-42", team=T1, ts="1700000960.000001")
    await mention(rig, "got it?", team=T1, thread_ts="1700000960.000001")

    answer = await say(rig, "/ask", "what is my codeword?", team=T1, user="U1")

    assert answer == "echo: what is my codeword?"
    assert "PAPAYA" not in seen_by_model(rig.model.requests[-1])


async def test_the_next_mention_never_sees_an_ask_exchange(rig):
    rig.model.script(Reply(text="Noted: MANGO-7."))
    await say(rig, "/ask", "remember MANGO-7", team=T1, user="U1")

    request = await mention(rig, "what did I ask you to remember?", team=T1)

    assert "MANGO" not in seen_by_model(request)


# -- a DM is its asker's own --------------------------------------------------------------------------------


async def test_member_switches_and_resets_their_own_dm(rig):
    switched = await say(rig, "/persona", "set comic", team=T1, user=MEMBER, channel="D1")
    request = await dm(rig, "tell me one", ts="1700000970.000001")
    reset = await say(rig, "/reset", "", team=T1, user=MEMBER, channel="D1")

    assert switched.startswith("Now speaking as *Comic* here")
    assert system_prompt(request) == COMIC
    assert reset.startswith("Context cleared")


async def test_reset_in_a_dm_clears_the_conversation_already_going_on_there(rig):
    await dm(rig, "my codeword is KIWI-3", ts="1700000975.000001")
    before = await dm(rig, "the codeword?", ts="1700000975.000002", thread_ts="1700000975.000001")
    assert "KIWI" in seen_by_model(before)

    assert (await say(rig, "/reset", "", team=T1, user=MEMBER, channel="D1")).startswith("Context cleared")

    after = await dm(rig, "the codeword now?", ts="1700000975.000003", thread_ts="1700000975.000001")
    assert "KIWI" not in seen_by_model(after)


async def test_member_may_not_switch_or_reset_a_shared_channel(rig):
    switched = await say(rig, "/persona", "set comic", team=T1, user=MEMBER)
    reset = await say(rig, "/reset", "", team=T1, user=MEMBER)

    assert switched.startswith("Only this workspace's admins can switch personas")
    assert reset.startswith("Only this workspace's admins can reset a shared channel's context")
    assert (await rig.engine.active_persona(ConvKey("slack", T1, "C1"))).name == "assistant"


# -- /usage -------------------------------------------------------------------------------------------------


async def test_usage_shows_an_admin_only_their_workspaces_tokens(rig):
    rig.model.script(Reply(text="one", usage={"prompt_tokens": 1000, "completion_tokens": 234}),
                     Reply(text="two", usage={"prompt_tokens": 50000, "completion_tokens": 5678}))
    await mention(rig, "spend in T1", team=T1)
    await mention(rig, "spend in T2", team=T2)

    report = await say(rig, "/usage", "", team=T1, user=ADMIN1)

    assert "1,234 in all" in report and report.endswith("By persona: assistant 1,234")
    assert "55,678" not in report and "56,912" not in report


async def test_usage_is_refused_to_a_member(rig):
    refusal = await say(rig, "/usage", "", team=T1, user=MEMBER)

    assert refusal.startswith("Only this workspace's admins can see this workspace's usage")


# -- the form's Save is signed like everything else ------------------------------------------------------


@pytest.mark.parametrize("tamper", ["forged", "replayed"])
async def test_a_form_submission_with_a_bad_signature_is_refused(rig, tamper):
    view = await open_form(rig, "create pirate", team=T1, user=ADMIN1)
    body = rig.slack.view_submission_body(view, PIRATE, user=ADMIN1, team=T1)
    stale = int(time.time()) - 6 * 60
    if tamper == "forged":
        sent = dict(signature=sign(body, int(time.time()), secret="not-the-secret"))
    else:  # a genuine submission captured and sent again after Slack's five minutes
        sent = dict(timestamp=stale, signature=sign(body, stale))

    response = await rig.slack.post(body, "application/x-www-form-urlencoded", **sent)

    assert response.status == 401
    assert "pirate" not in await say(rig, "/persona", "list", team=T1, user=ADMIN1)


# -- knowledge shared in chat belongs to the workspace ---------------------------------------------------


async def test_a_file_shared_in_one_workspace_is_found_there_and_not_in_another(knowledge_rig):
    rig = knowledge_rig
    rig.api.files["F1"] = ("handbook.md", HANDBOOK)
    await rig.slack.event({"type": "message", "subtype": "file_share", "channel_type": "im", "channel": "D1",
                           "user": ADMIN1, "text": "", "ts": "1700000980.000001",
                           "files": [{"id": "F1", "name": "handbook.md"}]}, team=T1)
    added = await rig.api.wait_for(lambda: rig.api.calls_to("chat.postMessage"))
    assert added[0].params["text"].startswith("Added handbook.md")

    found = await say(rig, "/knowledge", "search paid holiday days", team=T1, user="U1")
    elsewhere = await say(rig, "/knowledge", "search paid holiday days", team=T2, user="U1")

    assert "27 days of paid holiday" in found
    assert elsewhere == "Nothing in the knowledge base matches that."


async def test_a_shared_file_larger_than_the_upload_limit_is_refused_mid_download(knowledge_rig):
    rig = knowledge_rig
    rig.api.files["F2"] = ("handbook.md", b"# Handbook\n" + b"Refunds take 5 days. " * 3000)
    rig.api.endless.add("F2")  # declares no size, and its body never ends
    await rig.slack.event({"type": "message", "subtype": "file_share", "channel_type": "im", "channel": "D1",
                           "user": ADMIN1, "text": "", "ts": "1700000981.000001",
                           "files": [{"id": "F2", "name": "handbook.md"}]}, team=T1)
    refused = await rig.api.wait_for(lambda: rig.api.calls_to("chat.postMessage"))

    limit = rig.engine.settings.knowledge_max_upload_mb * 1024 * 1024
    assert refused[0].params["text"] == "Not done: handbook.md is more than 10.0 MB, the limit. Nothing was saved."
    assert rig.api.bytes_sent["F2"] < limit + 8 * 1024 * 1024
    assert await say(rig, "/knowledge", "search refunds", team=T1, user="U1") == (
        "Nothing in the knowledge base matches that.")


async def test_a_question_with_a_file_in_an_enabled_channel_is_answered_with_the_file_and_never_uploaded(
        knowledge_rig):
    rig = knowledge_rig
    await say(rig, "/channel", "enable", team=T1, user=ADMIN1)
    rig.api.files["F3"] = ("notes.txt", b"The codeword is FIG.")
    rig.api.files["F4"] = ("dropped.md", b"# Dropped\nNot for the bot.")
    share = {"type": "message", "subtype": "file_share", "channel_type": "channel", "channel": "C1", "user": ADMIN1}
    await rig.slack.event({**share, "text": "", "ts": "1700000982.000001",
                           "files": [{"id": "F4", "name": "dropped.md"}]}, team=T1)
    await rig.slack.event({**share, "text": "add what does this say?", "ts": "1700000983.000001",
                           "files": [{"id": "F3", "name": "notes.txt"}]}, team=T1)
    await rig.api.wait_for(lambda: rig.api.calls_to("chat.stopStream"))

    assert rig.model.requests[-1]["messages"][-1]["content"] == (
        "add what does this say?\n\nnotes.txt:\n```\nThe codeword is FIG.\n```")
    assert rig.api.downloads == ["F3"]  # the wordless drop was left alone
    assert await say(rig, "/knowledge", "search codeword", team=T1, user="U1") == (
        "Nothing in the knowledge base matches that.")
