"""The Discord adapter, driven through dpytest with the real engine, SQLite history and the OpenAI client
talking to a local OpenAI-compatible server.

Slash commands run their real handlers; only the `Interaction` is a stand-in (dpytest has no interactions),
recording what the handler answered. Modal submissions go through discord.py's own submit path.
"""
from __future__ import annotations

import asyncio
import collections
import shutil
import sqlite3
import sys
from pathlib import Path

import discord
import discord.ext.test as dpytest
import discord.ext.test.backend as dpy_backend
import pytest
from discord import app_commands
from discord.ext.test import callbacks

from bot.config import Settings
from bot.conversation import ConvKey
from bot.engine import Engine
from bot.notices import SaidOnce
from bot.personas import Persona
from bot.platforms import discord_reply
from bot.platforms.discord_bot import create_bot
from bot.platforms.discord_reply import ReplyStream, conv_key
from bot.render import open_fence
from bot.retrieval import uploads
from dpytest_harness import configure_dpytest
from openai_server import OpenAIServer, Reply, openai_server  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parent.parent
WITH_KNOWLEDGE = pytest.mark.parametrize("engine", ["knowledge"], indirect=True)


# -- fixtures ----------------------------------------------------------------------------------------


@pytest.fixture
async def engine(request, tmp_path, openai_server, monkeypatch):
    """The real engine; tests that ask for it (WITH_KNOWLEDGE) also get the real retriever (FAISS + MiniLM)."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PERSONABOT_ADMINS", "PERSONABOT_BACKEND", "DISCORD_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    personas = tmp_path / "personas"
    shutil.copytree(REPO / "personas", personas)
    settings = Settings(
        _env_file=None,
        PERSONABOT_DATA_DIR=tmp_path / "data",
        PERSONABOT_PERSONAS_DIR=personas,
        PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge",
        OPENAI_API_KEY="sk-test",
        OPENAI_BASE_URL=openai_server.base_url,
    )
    engine = await Engine.create(settings, knowledge=getattr(request, "param", "") == "knowledge")
    yield engine
    await engine.close()


@pytest.fixture
async def bot(engine):
    bot = create_bot(engine, engine.settings, edit_interval=0.01)
    await configure_dpytest(bot, guilds=["Guild"], text_channels=["general", "random"], voice_channels=0,
                            members=["alice", "bob"])
    yield bot
    await dpytest.empty_queue()


@pytest.fixture
def payloads(monkeypatch):
    """Every message payload discord.py builds for the REST API (sends and edits), as it would go on the wire."""
    sent: list[dict] = []
    original = discord.http.handle_message_parameters

    def recording(*args, **kwargs):
        params = original(*args, **kwargs)
        sent.append(params.payload or {})
        return params

    for module in (discord.abc, discord.message, discord.interactions):
        monkeypatch.setattr(module, "handle_message_parameters", recording)
    return sent


def channel(name: str) -> discord.TextChannel:
    return next(c for c in dpytest.get_config().channels if c.name == name)


def member(name: str) -> discord.Member:
    return next(m for m in dpytest.get_config().members if m.name == name)


async def make_admin(who: discord.Member) -> None:
    guild = who.guild
    role = dpy_backend.make_role("Mods", guild, permissions=discord.Permissions(manage_guild=True).value)
    await dpytest.add_role(who, role)


async def say_to_bot(bot, text: str, where: str = "general", who: str = "alice") -> discord.Message:
    return await dpytest.message(f"<@{bot.user.id}> {text}", channel=channel(where), member=member(who))


async def bot_messages(where: discord.abc.Messageable, bot, *, notices: bool = False) -> list[str]:
    """What the channel shows now (edits applied), oldest first, from dpytest's record of the channel; without
    the once-per-channel note on how to let personas use their own name (its own tests look at it)."""
    shown = dpy_backend._cur_config.messages.get(where.id, [])
    return [m["content"] for m in shown if int(m["author"]["id"]) == bot.user.id
            and (notices or m["content"] not in (discord_reply.NO_WEBHOOKS_NOTICE, discord_reply.DM_NOTICE))]


class Recorder:
    def __init__(self, content: str, ephemeral: bool):
        self.content, self.ephemeral = content, ephemeral

    async def edit(self, *, content: str, **_: object) -> "Recorder":
        self.content = content
        return self


class Response:
    def __init__(self, interaction: "FakeInteraction"):
        self.interaction, self.done = interaction, False

    def is_done(self) -> bool:
        return self.done

    async def send_message(self, content: str, *, ephemeral: bool = False, **_: object) -> None:
        assert not self.done, "an interaction is answered once"
        self.done = True
        self.interaction.answers.append(Recorder(content, ephemeral))

    async def defer(self, *, ephemeral: bool = False, thinking: bool = False) -> None:
        assert not self.done
        self.done = True
        self.interaction.deferred_ephemeral = ephemeral

    async def send_modal(self, modal: discord.ui.Modal) -> None:
        assert not self.done
        self.done = True
        self.interaction.modal = modal


class Followup:
    def __init__(self, interaction: "FakeInteraction"):
        self.interaction = interaction

    async def send(self, content: str, *, ephemeral: bool = False, wait: bool = False, **_: object) -> Recorder:
        answer = Recorder(content, ephemeral)
        self.interaction.answers.append(answer)
        return answer


class FakeInteraction:
    """Stands in for `discord.Interaction` only: dpytest has none. User, channel and guild are dpytest's."""

    def __init__(self, bot, user: discord.Member, where: discord.abc.Messageable):
        self.client, self.user, self.channel = bot, user, where
        self.guild = getattr(where, "guild", None)
        self.response = Response(self)
        self.followup = Followup(self)
        self.answers: list[Recorder] = []
        self.modal: discord.ui.Modal | None = None
        self.deferred_ephemeral = False

    async def edit_original_response(self, *, content: str, **_: object) -> Recorder:
        answer = Recorder(content, self.deferred_ephemeral)
        self.answers.append(answer)
        return answer

    @property
    def text(self) -> str:
        return "\n".join(answer.content for answer in self.answers)


async def slash(bot, path: str, who: str = "alice", where: str = "general", **options) -> FakeInteraction:
    """Runs `/path` through the registered command's own callback, as the command tree would."""
    names = path.split()
    command = bot.tree.get_command(names[0])
    for name in names[1:]:
        command = command.get_command(name)
    assert isinstance(command, app_commands.Command), path
    interaction = FakeInteraction(bot, member(who), channel(where))
    if command.binding is not None:
        await command.callback(command.binding, interaction, **options)
    else:
        await command.callback(interaction, **options)
    return interaction


async def submit(modal: discord.ui.Modal, interaction: FakeInteraction, **values: str) -> None:
    """Submits a modal the way discord.py does when Discord delivers the form."""
    components = [
        {"type": 1, "components": [{"type": 4, "custom_id": modal.inputs[field].custom_id, "value": value}]}
        for field, value in values.items()
    ]
    await modal._scheduled_task(interaction, components, {})


class FakeWebhookMessage:
    def __init__(self, content: str, **sent: object):
        self.content, self.sent, self.edits = content, sent, 0

    async def edit(self, *, content: str, allowed_mentions: discord.AllowedMentions) -> "FakeWebhookMessage":
        self.content, self.edits = content, self.edits + 1
        self.sent["allowed_mentions"] = allowed_mentions
        return self


class FakeWebhook:
    """Stands in for `discord.Webhook` at discord.py's boundary: dpytest has no webhooks."""

    def __init__(self, channel: discord.TextChannel, name: str):
        self.id, self.name, self.token, self.user = dpy_backend.facts.make_id(), name, "token", channel.guild.me
        self.messages: list[FakeWebhookMessage] = []

    async def send(self, content: str, *, username: str, avatar_url: str, wait: bool,
                   allowed_mentions: discord.AllowedMentions, thread=discord.utils.MISSING) -> FakeWebhookMessage:
        assert wait, "a streamed reply edits the message it sent, so it needs it back"
        message = FakeWebhookMessage(content, username=username, avatar_url=avatar_url, thread=thread,
                                     allowed_mentions=allowed_mentions)
        self.messages.append(message)
        return message


@pytest.fixture
async def webhooks(bot, monkeypatch):
    """The bot holds Manage Webhooks; each channel's webhooks are FakeWebhooks, by channel id."""
    hooks: dict[int, list[FakeWebhook]] = {}

    async def listed(self: discord.TextChannel) -> list[FakeWebhook]:
        return list(hooks.get(self.id, []))

    async def create(self: discord.TextChannel, *, name: str, reason: str | None = None) -> FakeWebhook:
        hook = FakeWebhook(self, name)
        hooks.setdefault(self.id, []).append(hook)
        return hook

    monkeypatch.setattr(discord.TextChannel, "webhooks", listed)
    monkeypatch.setattr(discord.TextChannel, "create_webhook", create)
    guild = channel("general").guild
    role = dpy_backend.make_role("Hooks", guild, permissions=discord.Permissions(manage_webhooks=True).value)
    await dpytest.add_role(guild.me, role)
    return hooks


async def use_persona(engine, name: str, where: str = "general") -> None:
    await engine.history.set_persona(conv_key(channel(where)).channel_key, name)


def webhook_message(where: discord.TextChannel, webhook_id: int, content: str) -> dict:
    """A message some webhook posted, as Discord's payload (dpytest cannot post through webhooks)."""
    return dpy_backend.facts.make_message_dict(where, dpy_backend.make_user("Assistant", "0007"), content=content,
                                               webhook_id=webhook_id)


async def reply_to(replied: dict, where: discord.TextChannel, content: str, who: str = "alice") -> None:
    """A reply to the message `replied`, as Discord delivers one (dpytest's messages carry no reference)."""
    data = dpy_backend.facts.make_message_dict(where, member(who), content=content, type=19,
                                               mentions=dpy_backend.find_user_mentions(content, where.guild))
    data["message_reference"] = {"message_id": replied["id"], "channel_id": where.id, "guild_id": where.guild.id}
    data["referenced_message"] = replied
    dpy_backend.get_state().parse_message_create(data)
    await dpytest.run_all_events()


# -- chat --------------------------------------------------------------------------------------------


async def test_mention_gets_persona_reply_in_channel(bot, engine, openai_server):
    await say_to_bot(bot, "hello there")

    assert await bot_messages(channel("general"), bot) == ["echo: hello there"]
    request = openai_server.last
    assert request["messages"][0] == {"role": "system", "content": engine.personas.library.get("assistant").system}
    assert request["messages"][-1] == {"role": "user", "content": "hello there"}


async def test_unaddressed_message_in_plain_channel_is_ignored(bot, openai_server):
    await dpytest.message("just chatting among humans", channel=channel("general"), member=member("alice"))

    assert openai_server.requests == []
    assert await bot_messages(channel("general"), bot) == []


async def test_other_bots_are_ignored(bot, openai_server):
    robot = dpy_backend.make_member(dpy_backend.make_user("robot", "0042"), channel("general").guild)
    robot._user.bot = True

    await dpytest.message(f"<@{bot.user.id}> ping", channel=channel("general"), member=robot)

    assert openai_server.requests == []


async def test_webhook_messages_are_ignored(bot, openai_server):
    """A relay or another bot posting through a webhook, its author carrying no bot flag."""
    relay = dpy_backend.make_user("relay", "0001")
    where = channel("general")
    content = f"<@{bot.user.id}> ping"
    data = dpy_backend.facts.make_message_dict(where, relay, content=content, webhook_id=dpy_backend.facts.make_id(),
                                               mentions=dpy_backend.find_user_mentions(content, where.guild))
    dpy_backend.get_state().parse_message_create(data)
    await dpytest.run_all_events()

    assert openai_server.requests == []


# -- the persona's own name and avatar ----------------------------------------------------------------


async def test_reply_is_posted_under_the_personas_name_and_avatar(bot, engine, webhooks):
    engine.settings = engine.settings.model_copy(update={"public_url": "https://bot.example.com"})
    (engine.settings.personas_dir / "comic.yaml").write_text(
        (engine.settings.personas_dir / "comic.yaml").read_text() + "avatar: comic.png\n")
    await engine.personas.library.refresh()
    await use_persona(engine, "comic")

    await say_to_bot(bot, "hello there")

    (hook,) = webhooks[channel("general").id]
    (message,) = hook.messages
    comic = engine.personas.library.get("comic")
    assert (message.content, message.sent["username"], message.sent["avatar_url"]) == (
        "echo: hello there", comic.display_name, "https://bot.example.com/avatars/comic.png")
    assert await bot_messages(channel("general"), bot, notices=True) == []


async def test_persona_made_in_the_form_answers_with_its_avatar(bot, webhooks):
    await make_admin(member("alice"))
    form = (await slash(bot, "persona create", who="alice", name="pirate")).modal
    await submit(form, FakeInteraction(bot, member("alice"), channel("general")), display_name="Captain",
                 system="You are a pirate.", extra="avatar: https://cdn.example.com/captain.png\n")
    await slash(bot, "persona set", who="alice", name="pirate")

    await say_to_bot(bot, "ahoy")

    message = webhooks[channel("general").id][0].messages[-1]
    assert (message.sent["username"], message.sent["avatar_url"]) == ("Captain", "https://cdn.example.com/captain.png")


async def test_persona_without_avatar_borrows_the_bots_own(bot, webhooks):
    await say_to_bot(bot, "hello there")

    (message,) = webhooks[channel("general").id][0].messages
    assert (message.sent["username"], message.sent["avatar_url"]) == ("Assistant", bot.user.display_avatar.url)


async def test_webhook_is_made_once_per_channel_and_reused(bot, webhooks):
    await say_to_bot(bot, "one")
    await say_to_bot(bot, "two")
    bot.webhooks.forget(channel("general").id)  # as after a restart: found again, not made again
    await say_to_bot(bot, "three")

    (hook,) = webhooks[channel("general").id]
    assert [m.content for m in hook.messages] == ["echo: one", "echo: two", "echo: three"]


async def test_webhook_reply_streams_by_edits_and_pings_nobody(bot, webhooks, openai_server):
    openai_server.script(Reply(text="Hello @everyone, and <@&123>!", chunks=["Hello ", "@everyone, ", "and <@&123>!"],
                               chunk_delay=0.05))
    await say_to_bot(bot, "announce")

    (message,) = webhooks[channel("general").id][0].messages
    mentions = message.sent["allowed_mentions"]
    assert message.content == "Hello @everyone, and <@&123>!" and message.edits >= 1
    assert (mentions.everyone, mentions.roles) == (False, False)


async def test_long_webhook_reply_is_split_at_discords_limit(bot, webhooks, openai_server):
    openai_server.script(Reply(text="word " * 900))
    await say_to_bot(bot, "talk a lot")

    messages = webhooks[channel("general").id][0].messages
    assert len(messages) > 1 and all(len(m.content) <= 2000 for m in messages)


async def test_reply_in_a_thread_goes_through_the_parents_webhook_into_the_thread(bot, webhooks):
    thread = make_thread(bot, channel("general"), owner_id=bot.user.id)

    await dpytest.message("hello in the thread", channel=thread, member=member("alice"))

    (message,) = webhooks[channel("general").id][0].messages
    assert (message.content, message.sent["thread"]) == ("echo: hello in the thread", thread)


async def test_reply_to_a_personas_webhook_message_continues_the_conversation(bot, webhooks, openai_server):
    await say_to_bot(bot, "remember the codeword swordfish")
    hook = webhooks[channel("general").id][0]

    await reply_to(webhook_message(channel("general"), hook.id, "echo: remember the codeword swordfish"),
                   channel("general"), "what was the codeword?")

    assert hook.messages[-1].content == "echo: what was the codeword?"
    assert "swordfish" in str(openai_server.last["messages"])


async def test_reply_to_someone_elses_webhook_is_not_addressed_to_the_bot(bot, webhooks, openai_server):
    relayed = webhook_message(channel("general"), dpy_backend.facts.make_id(), "news")

    await reply_to(relayed, channel("general"), "interesting")

    assert openai_server.requests == []


async def test_without_manage_webhooks_replies_under_the_bots_name_and_says_once_how_to_change_it(bot):
    await say_to_bot(bot, "one")
    await say_to_bot(bot, "two")

    assert await bot_messages(channel("general"), bot, notices=True) == [
        "echo: one", discord_reply.NO_WEBHOOKS_NOTICE, "echo: two"]


async def test_direct_message_replies_under_the_bots_name_and_says_so_once(bot):
    dm = await member("alice").create_dm()
    await dpytest.message("hi", channel=dm, member=member("alice"))
    await dpytest.message("again", channel=dm, member=member("alice"))

    assert await bot_messages(dm, bot, notices=True) == ["echo: hi", discord_reply.DM_NOTICE, "echo: again"]


async def restart(bot, engine) -> Engine:
    """The bot's process restarted: a new engine on the same database, nothing remembered in memory; Discord's
    channels are the same ones."""
    await engine.close()
    again = await Engine.create(engine.settings, knowledge=False)
    bot.engine, bot.webhooks, bot.said_once = again, discord_reply.PersonaWebhooks(), SaidOnce(again.history)
    return again


async def test_how_to_enable_personas_is_said_once_per_channel_also_across_a_restart(bot, engine):
    await say_to_bot(bot, "one")
    again = await restart(bot, engine)
    try:
        await say_to_bot(bot, "two")
        await say_to_bot(bot, "elsewhere", where="random")
    finally:
        await again.close()

    assert await bot_messages(channel("general"), bot, notices=True) == [
        "echo: one", discord_reply.NO_WEBHOOKS_NOTICE, "echo: two"]
    assert await bot_messages(channel("random"), bot, notices=True) == [
        "echo: elsewhere", discord_reply.NO_WEBHOOKS_NOTICE]


async def test_a_once_per_channel_note_is_said_by_one_of_two_processes_on_either_store(settings, store_url):
    settings.database_url = store_url
    first, second = await Engine.create(settings, knowledge=False), await Engine.create(settings, knowledge=False)
    key, thread = ConvKey("discord", "1", "10"), ConvKey("discord", "1", "10", "11")
    try:
        claims = await asyncio.gather(*(SaidOnce(e.history).first_time(key, "note") for e in (first, second)))
        later = [await SaidOnce(e.history).first_time(thread, "note") for e in (first, second)]
        other = await SaidOnce(second.history).first_time(key, "another note")
    finally:
        await first.close()
        await second.close()

    assert sorted(claims) == [False, True] and later == [False, False] and other is True


# -- what one streamed reply costs in Discord calls (README: Discord → Personas' names and avatars) -------------

STREAMED = Reply(chunks=["One, ", "two, ", "three, ", "four."], chunk_delay=0.15)  # a send, then 3 edits


def count_calls(bot, monkeypatch, hooks: dict | None = None) -> collections.Counter:
    """Every REST call the bot makes, by route: dpytest's HTTP client for the bot's own messages, the fake
    webhooks (and the channel's webhook list and create) for the persona's."""
    calls: collections.Counter = collections.Counter()
    dispatch = callbacks.dispatch_event

    async def counted(event: str, *args, **kwargs) -> None:  # dpytest's HTTP client reports each call here
        calls[event] += 1
        await dispatch(event, *args, **kwargs)

    monkeypatch.setattr(callbacks, "dispatch_event", counted)
    if hooks is not None:
        for attr, name in (("webhooks", "GET channel webhooks"), ("create_webhook", "POST channel webhook")):
            async def counted_hook(self, *args, _name=name, _original=getattr(discord.TextChannel, attr), **kwargs):
                calls[_name] += 1
                return await _original(self, *args, **kwargs)

            monkeypatch.setattr(discord.TextChannel, attr, counted_hook)
        original_send = FakeWebhook.send

        async def counted_send(self, *args, **kwargs):
            calls["execute webhook"] += 1
            message = await original_send(self, *args, **kwargs)
            original_edit = message.edit

            async def counted_edit(**edit):
                calls["edit webhook message"] += 1
                return await original_edit(**edit)

            message.edit = counted_edit
            return message

        monkeypatch.setattr(FakeWebhook, "send", counted_send)
    return calls


async def replies_cost(bot, openai_server, calls: collections.Counter) -> list[dict]:
    """The calls of a channel's first streamed reply and of its second, each streamed as a send and 3 edits."""
    costs = []
    for text in ("first", "second"):
        openai_server.script(STREAMED)
        calls.clear()
        await say_to_bot(bot, text)
        costs.append(dict(calls))
    return costs


async def test_a_streamed_reply_under_the_bots_own_name_costs_a_send_and_an_edit_per_update(bot, openai_server,
                                                                                          monkeypatch):
    calls = count_calls(bot, monkeypatch)

    first, second = await replies_cost(bot, openai_server, calls)

    # The first reply in a channel without Manage Webhooks also says (once, for good) how to enable personas.
    assert first == {"send_typing": 1, "send_message": 2, "edit_message": 3}
    assert second == {"send_typing": 1, "send_message": 1, "edit_message": 3}


async def test_a_streamed_reply_as_the_persona_costs_the_same_through_the_webhook(bot, webhooks, openai_server,
                                                                                monkeypatch):
    calls = count_calls(bot, monkeypatch, webhooks)

    first, second = await replies_cost(bot, openai_server, calls)

    assert first == {"GET channel webhooks": 1, "POST channel webhook": 1, "send_typing": 1, "execute webhook": 1,
                     "edit webhook message": 3}
    assert second == {"send_typing": 1, "execute webhook": 1, "edit webhook message": 3}


async def test_history_is_kept_per_channel_and_not_shared(bot, openai_server):
    await say_to_bot(bot, "remember the codeword swordfish", where="general")
    await say_to_bot(bot, "what was the codeword?", where="general")
    same_channel = str(openai_server.last["messages"])
    await say_to_bot(bot, "what was the codeword?", where="random")
    other_channel = str(openai_server.last["messages"])

    assert "swordfish" in same_channel
    assert "swordfish" not in other_channel


def make_thread(bot, parent: discord.TextChannel, owner_id: int) -> discord.Thread:
    """dpytest has no threads; this registers one with discord.py's own state, as a THREAD_CREATE would."""
    thread = discord.Thread(guild=parent.guild, state=bot._connection, data={
        "id": dpy_backend.facts.make_id(), "guild_id": parent.guild.id, "parent_id": parent.id, "owner_id": owner_id,
        "name": "a thread", "type": 11, "message_count": 0, "member_count": 1, "rate_limit_per_user": 0,
        "thread_metadata": {"archived": False, "auto_archive_duration": 1440, "archive_timestamp": None,
                            "locked": False},
    })
    parent.guild._add_thread(thread)
    return thread


async def test_thread_the_bot_started_is_answered_with_its_own_history(bot, openai_server):
    await say_to_bot(bot, "remember the codeword swordfish")
    thread = make_thread(bot, channel("general"), owner_id=bot.user.id)

    await dpytest.message("what was the codeword?", channel=thread, member=member("alice"))

    assert await bot_messages(thread, bot) == ["echo: what was the codeword?"]
    assert "swordfish" not in str(openai_server.last["messages"])


async def test_thread_command_starts_a_thread_the_bot_then_answers_without_a_mention(bot, openai_server, monkeypatch):
    created = []

    async def start_thread_without_message(channel_id, *, name, type, **_):  # Discord's side of create_thread
        data = {"id": dpy_backend.facts.make_id(), "guild_id": channel("general").guild.id, "parent_id": channel_id,
                "owner_id": bot.user.id, "name": name, "type": type, "message_count": 0, "member_count": 1,
                "rate_limit_per_user": 0, "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                                              "archive_timestamp": None, "locked": False}}
        created.append(data)
        return data

    monkeypatch.setattr(bot.http, "start_thread_without_message", start_thread_without_message, raising=False)
    interaction = await slash(bot, "thread", topic="gradient descent")

    assert [(c["name"], c["type"]) for c in created] == [("gradient descent", discord.ChannelType.public_thread.value)]
    guild = channel("general").guild
    thread = discord.Thread(guild=guild, state=bot._connection, data=created[0])
    guild._add_thread(thread)  # as the gateway's THREAD_CREATE would
    assert interaction.text == f"Started {thread.mention}." and not interaction.answers[0].ephemeral
    assert "no mention needed" in (await bot_messages(thread, bot))[0]
    await dpytest.message("which way is down?", channel=thread, member=member("alice"))
    assert (await bot_messages(thread, bot))[-1] == "echo: which way is down?"


async def test_thread_someone_else_started_needs_a_mention(bot, openai_server):
    thread = make_thread(bot, channel("general"), owner_id=member("bob").id)

    await dpytest.message("anyone?", channel=thread, member=member("alice"))

    assert openai_server.requests == []


async def test_direct_message_is_answered_without_mention(bot, openai_server):
    dm = await member("alice").create_dm()

    await dpytest.message("hi in private", channel=dm, member=member("alice"))

    assert await bot_messages(dm, bot) == ["echo: hi in private"]


async def test_enabled_channel_answers_without_mention(bot, openai_server):
    await make_admin(member("alice"))
    answer = await slash(bot, "channel enable", who="alice", where="random")
    await dpytest.message("no mention needed", channel=channel("random"), member=member("bob"))

    assert "every message" in answer.text
    assert await bot_messages(channel("random"), bot) == ["echo: no mention needed"]


async def test_non_admin_cannot_enable_channel(bot, openai_server):
    answer = await slash(bot, "channel enable", who="bob", where="random")
    await dpytest.message("anyone there?", channel=channel("random"), member=member("bob"))

    assert answer.answers[0].ephemeral and "Only this workspace's admins" in answer.text
    assert openai_server.requests == []


async def test_long_reply_arrives_as_valid_discord_messages(bot, openai_server):
    prose = " ".join(f"Sentence number {i} says something useful." for i in range(60))
    code = "\n".join(f"    total += values[{i}]  # step {i}" for i in range(60))
    reply = f"{prose}\n\n```python\ndef total(values):\n    total = 0\n{code}\n    return total\n```\n\n{prose}"
    assert len(reply) >= 5000
    openai_server.script(reply)

    await say_to_bot(bot, "write a lot")

    messages = await bot_messages(channel("general"), bot)
    assert len(messages) >= 3
    assert all(0 < len(m) <= 2000 for m in messages)
    assert all(open_fence(m) is None for m in messages)  # no message leaves a code block open
    shown = " ".join(messages)
    assert all(f"Sentence number {i} " in shown and f"# step {i}\n" in shown for i in range(60))


async def test_everyone_in_model_reply_pings_nobody(bot, openai_server, payloads):
    openai_server.script("@everyone @here <@&123456789012345678> wake up!")

    await say_to_bot(bot, "announce something")

    alice = member("alice")
    assert payloads, "the reply was sent"
    for payload in payloads:
        allowed = payload["allowed_mentions"]
        assert allowed["parse"] == []
        assert allowed.get("users", []) in ([], [alice.id])


async def test_client_default_mentions_never_ping_everyone_or_roles(engine):
    default = create_bot(engine, engine.settings).allowed_mentions

    assert default.everyone is False and default.roles is False and default.users is False


async def test_mention_of_bot_is_stripped_from_text(bot, openai_server):
    await dpytest.message(f"hey <@{bot.user.id}>, what is 2+2?", channel=channel("general"), member=member("alice"))

    assert openai_server.last["messages"][-1]["content"] == "hey , what is 2+2?"


async def test_model_failure_edits_reply_into_clear_error(bot, openai_server):
    openai_server.reply_with(lambda messages: Reply.error(400, "The model `gpt-4o-mini` does not exist",
                                                          type="invalid_request_error", code="model_not_found"))

    await say_to_bot(bot, "hello?")

    (message,) = await bot_messages(channel("general"), bot)
    assert message.startswith("Sorry, I couldn't answer that")


async def test_typing_shows_until_the_first_text(bot, openai_server, monkeypatch):
    monkeypatch.setattr(discord_reply, "TYPING_REFRESH", 0.05)
    openai_server.script(Reply(text="one two three four five six", delay=0.3, chunk_delay=0.1))
    events: list[str] = []
    queue_message = callbacks.get_callback("send_message")

    async def on_typing(channel) -> None:
        events.append("typing")

    async def on_send(message) -> None:
        events.append("send")
        await queue_message(message)

    monkeypatch.setitem(callbacks._callbacks, "send_typing", on_typing)
    monkeypatch.setitem(callbacks._callbacks, "send_message", on_send)

    await say_to_bot(bot, "take your time")

    first_text = events.index("send")
    assert first_text >= 2 and set(events[:first_text]) == {"typing"}  # kept up while the model thinks
    assert "typing" not in events[first_text:]  # and stopped once words show


async def test_reply_cut_off_inside_code_block_ends_closed(bot, openai_server):
    openai_server.script(Reply(text="Here:\n```python\nfor i in range(3):\n    print(i)", finish_reason="length"))

    await say_to_bot(bot, "write a loop")

    (message,) = await bot_messages(channel("general"), bot)
    assert "print(i)" in message and open_fence(message) is None


async def test_reply_survives_discord_server_error(bot, openai_server, monkeypatch):
    monkeypatch.setattr(discord_reply, "RETRY_DELAYS", (0.0, 0.0))
    original = bot.http.send_message
    failures = []

    async def flaky(channel_id, *, params):
        if not failures:
            failures.append(channel_id)
            raise discord.DiscordServerError(dpy_backend.FakeRequest(503, "Service Unavailable"), "upstream down")
        channel = sys._getframe(1).f_locals["channel"]  # noqa: F841  dpytest reads it from its caller's frame
        return await original(channel_id, params=params)

    monkeypatch.setattr(bot.http, "send_message", flaky)

    await say_to_bot(bot, "are you there")

    assert failures
    assert await bot_messages(channel("general"), bot) == ["echo: are you there"]


# -- slash commands ----------------------------------------------------------------------------------


async def test_non_admin_cannot_switch_persona(bot, engine, openai_server):
    answer = await slash(bot, "persona set", who="bob", name="comic")
    await say_to_bot(bot, "tell me something", who="bob")

    assert answer.answers[0].ephemeral
    assert "Only this workspace's admins" in answer.text and "Nothing was changed" in answer.text
    assert (await engine.active_persona(conv_key(channel("general")))).name == "assistant"
    assert openai_server.last["messages"][0]["content"] == engine.personas.library.get("assistant").system


async def test_admin_switch_changes_next_reply_system_prompt(bot, engine, openai_server):
    await make_admin(member("alice"))

    answer = await slash(bot, "persona set", who="alice", name="comic")
    await say_to_bot(bot, "tell me a joke", who="bob")

    assert not answer.answers[0].ephemeral and "Stand-up Comic" in answer.text
    assert openai_server.last["messages"][0]["content"] == engine.personas.library.get("comic").system


async def test_personabot_admins_can_switch_without_manage_server(bot, engine, openai_server):
    engine.settings = engine.settings.model_copy(update={"admins": frozenset({f"discord:{member('bob').id}"})})

    await slash(bot, "persona set", who="bob", name="sre")
    await say_to_bot(bot, "disk is full")

    assert openai_server.last["messages"][0]["content"] == engine.personas.library.get("sre").system


async def test_admin_slash_commands_are_audited_and_refusals_are_not(bot, engine):
    await make_admin(member("alice"))

    await slash(bot, "persona set", who="alice", name="comic")
    await slash(bot, "channel enable", who="alice", where="random")
    await slash(bot, "persona set", who="bob", name="sre")

    with sqlite3.connect(engine.settings.db_path) as db:
        rows = db.execute("SELECT user_id, channel, action, detail FROM audit ORDER BY id").fetchall()
    alice = str(member("alice").id)
    assert rows == [(alice, str(channel("general").id), "set_persona", "comic"),
                    (alice, str(channel("random").id), "enable_channel", "")]


async def test_persona_autocomplete_offers_matching_names(bot):
    group = bot.tree.get_command("persona")
    complete = group.get_command("set")._params["name"].autocomplete
    choices = await complete(FakeInteraction(bot, member("bob"), channel("general")), "com")

    assert [choice.value for choice in choices] == ["comic"]
    for name in ("show", "set", "edit", "delete"):
        assert group.get_command(name).parameters[0].autocomplete


async def test_persona_list_marks_active_persona(bot):
    answer = await slash(bot, "persona list")

    assert "▶ **Assistant** (`assistant`)" in answer.text and "`comic`" in answer.text


async def test_reset_forgets_channel_context(bot, openai_server):
    await make_admin(member("alice"))
    await say_to_bot(bot, "remember the codeword swordfish")

    await slash(bot, "reset", who="alice")
    await say_to_bot(bot, "what was the codeword?")

    assert "swordfish" not in str(openai_server.last["messages"])


async def test_ask_answers_without_channel_history(bot, openai_server):
    await say_to_bot(bot, "remember the codeword swordfish")

    answer = await slash(bot, "ask", who="bob", question="what was the codeword?")

    assert "swordfish" not in str(openai_server.last["messages"])
    assert answer.text == "echo: what was the codeword?"


async def ask_the_persona(bot, about: discord.Message, who: str = "bob") -> FakeInteraction:
    """Right-click on `about` → Apps → Ask the persona, through the registered menu item's own callback."""
    menu = bot.tree.get_command("Ask the persona", type=discord.AppCommandType.message)
    interaction = FakeInteraction(bot, member(who), about.channel)
    await menu.callback(interaction, about)
    return interaction


async def test_ask_the_persona_on_a_message_answers_its_text_as_a_one_off(bot, engine, openai_server):
    await use_persona(engine, "comic")
    await say_to_bot(bot, "remember the codeword swordfish")
    question = await dpytest.message("why do statisticians love the beach?", channel=channel("general"),
                                     member=member("alice"))

    answer = await ask_the_persona(bot, question)

    assert answer.text == "echo: why do statisticians love the beach?"
    sent = openai_server.last["messages"]
    assert sent[0]["content"] == engine.personas.library.get("comic").system and "swordfish" not in str(sent)


async def test_ask_the_persona_on_a_message_without_text_or_files_says_so(bot, openai_server):
    empty = await dpytest.message("", channel=channel("general"), member=member("alice"))

    answer = await ask_the_persona(bot, empty)

    assert answer.text == "That message has no text or files for me to answer." and openai_server.requests == []


async def test_admin_creates_persona_through_form(bot, engine, openai_server):
    await make_admin(member("alice"))
    started = await slash(bot, "persona create", who="alice", name="pirate")
    form = started.modal

    submitted = FakeInteraction(bot, member("alice"), channel("general"))
    await submit(form, submitted, display_name="Captain", system="You are a pirate. Arr.",
                 extra="model: {temperature: 1.1}\n")
    await slash(bot, "persona set", who="alice", name="pirate")
    await say_to_bot(bot, "ahoy")

    assert "Saved **Captain**" in submitted.text
    assert not (engine.settings.personas_dir / "pirate.yaml").exists()  # the workspace's own, not a shipped file
    assert openai_server.last["messages"][0]["content"] == "You are a pirate. Arr."
    assert openai_server.last["temperature"] == 1.1


async def test_invalid_persona_form_is_refused_with_errors(bot, engine):
    await make_admin(member("alice"))
    started = await slash(bot, "persona create", who="alice", name="pirate")

    submitted = FakeInteraction(bot, member("alice"), channel("general"))
    await submit(started.modal, submitted, system="You are a pirate.", extra="modle: {temperature: 0.5}\n")

    assert "Not saved" in submitted.text and "did you mean 'model'" in submitted.text
    assert "pirate" not in engine.personas.library.names()


async def test_non_admin_gets_no_persona_form(bot):
    answer = await slash(bot, "persona create", who="bob", name="pirate")

    assert answer.modal is None and answer.answers[0].ephemeral and "Nothing was changed" in answer.text


async def test_edit_form_is_prefilled_with_current_persona(bot, engine):
    await make_admin(member("alice"))

    answer = await slash(bot, "persona edit", who="alice", name="comic")

    comic = engine.personas.library.get("comic")
    assert answer.modal.inputs["system"].default == comic.system
    assert "temperature: 0.9" in answer.modal.inputs["extra"].default


async def test_persona_too_long_for_the_form_is_not_opened_in_one(bot, engine):
    await make_admin(member("alice"))
    engine.personas.library.save(Persona(name="verbose", description="A rambling voice. " * 30, system="You ramble."))

    answer = await slash(bot, "persona edit", who="alice", name="verbose")

    assert answer.modal is None and "longer than a form holds" in answer.text


async def test_create_form_does_not_overwrite_persona_saved_meanwhile(bot, engine):
    await make_admin(member("alice"))
    started = await slash(bot, "persona create", who="alice", name="pirate")
    engine.personas.library.save(Persona(name="pirate", system="Bob's pirate."))

    submitted = FakeInteraction(bot, member("alice"), channel("general"))
    await submit(started.modal, submitted, system="Alice's pirate.")

    assert "Not saved" in submitted.text
    assert engine.personas.library.get("pirate").system == "Bob's pirate."


@WITH_KNOWLEDGE
async def test_admin_uploads_document_and_anyone_can_search_it(bot, tmp_path):
    await make_admin(member("alice"))
    document = tmp_path / "handbook.md"
    document.write_text("# On-call\n\nThe pager rotation hands over every Tuesday at 10:00 UTC.\n")

    added = await slash(bot, "knowledge add", who="alice", file=dpy_backend.make_attachment(document),
                        collection="handbook")
    found = await slash(bot, "knowledge search", who="bob", query="when does the pager rotation hand over?")
    listed = await slash(bot, "knowledge list", who="bob")

    assert "handbook.md" in added.text and added.answers[-1].ephemeral
    assert "handbook/handbook.md" in found.text and "Tuesday" in found.text
    assert "handbook" in listed.text


@WITH_KNOWLEDGE
async def test_non_admin_cannot_add_knowledge(bot, engine, tmp_path):
    document = tmp_path / "handbook.md"
    document.write_text("# Secrets\n")

    answer = await slash(bot, "knowledge add", who="bob", file=dpy_backend.make_attachment(document))

    assert "Nothing was changed" in answer.text and engine.retriever.collections() == []


@WITH_KNOWLEDGE
async def test_oversized_upload_is_refused_before_download(bot, engine, tmp_path, monkeypatch):
    await make_admin(member("alice"))
    engine.retriever.max_upload_bytes = 100
    document = tmp_path / "handbook.md"
    document.write_text("# Handbook\n\n" + "Be kind to the on-call engineer. " * 10)

    async def no_download(self, **_: object) -> bytes:
        raise AssertionError("the attachment was downloaded")

    monkeypatch.setattr(discord.Attachment, "read", no_download)
    answer = await slash(bot, "knowledge add", who="alice", file=dpy_backend.make_attachment(document))

    assert answer.answers[0].ephemeral and "the limit is" in answer.text and "Nothing was saved" in answer.text
    assert engine.retriever.collections() == []


@WITH_KNOWLEDGE
async def test_an_upload_whose_download_stalls_is_given_up_and_nothing_saved(bot, engine, tmp_path, monkeypatch):
    await make_admin(member("alice"))
    monkeypatch.setattr(uploads, "DOWNLOAD_SECONDS", 0.2)
    document = tmp_path / "handbook.md"
    document.write_text("# Handbook\n\nBe kind to the on-call engineer.\n")

    async def stalls(self, **_: object) -> bytes:
        await asyncio.Event().wait()
        return b""

    monkeypatch.setattr(discord.Attachment, "read", stalls)
    answer = await asyncio.wait_for(
        slash(bot, "knowledge add", who="alice", file=dpy_backend.make_attachment(document)), 10)

    assert answer.text == "Not done: handbook.md did not finish downloading in 0.2 s. Nothing was saved."
    assert engine.retriever.collections() == []


async def test_knowledge_add_when_disabled_says_not_enabled(bot, tmp_path):
    await make_admin(member("alice"))
    document = tmp_path / "handbook.md"
    document.write_text("# Handbook\nBe kind.\n")

    answer = await slash(bot, "knowledge add", who="alice", file=dpy_backend.make_attachment(document))

    assert answer.answers[0].ephemeral and "not enabled" in answer.text


async def test_persona_name_is_checked_before_the_form(bot):
    await make_admin(member("alice"))

    answer = await slash(bot, "persona create", who="alice", name="Pirate King")

    assert answer.modal is None and "lowercase letters" in answer.text


# -- streaming into messages ------------------------------------------------------------------------


async def _pieces(*pieces: str):
    """Pieces a model streams, with time between them for the reply to be shown in between."""
    for piece in pieces:
        await asyncio.sleep(0.02)
        yield piece


async def test_stream_edits_only_when_text_changed():
    sent: list[Recorder] = []

    async def send(content: str) -> Recorder:
        sent.append(Recorder(content, False))
        return sent[-1]

    stream = ReplyStream(send, send, mentions=discord.AllowedMentions.none(), interval=0)
    await stream.run(_pieces("Hello", "", "", "", " world"))

    assert [m.content for m in sent] == ["Hello world"]
    assert stream.edits == 1  # "Hello" sent, " world" edited in; the empty pieces cost no request


async def test_stream_failure_ends_in_words():
    async def broken():
        yield "Half an answer"
        raise RuntimeError("database is locked")

    sent: list[Recorder] = []

    async def send(content: str) -> Recorder:
        sent.append(Recorder(content, False))
        return sent[-1]

    await ReplyStream(send, send, mentions=discord.AllowedMentions.none(), interval=0).run(broken())

    assert sent[0].content.startswith("Half an answer\n\nSorry, something went wrong on my side")
