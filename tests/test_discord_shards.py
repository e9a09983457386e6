"""Discord at scale: the bot is an AutoShardedBot, and DISCORD_SHARD_COUNT / DISCORD_SHARD_IDS split its shards
over processes. Settings are checked at start; a bot built with them carries them to discord.py and still
answers (dpytest, the real engine, the local OpenAI-compatible server)."""
from __future__ import annotations

import asyncio
import logging
import re
from types import SimpleNamespace

import discord
import discord.ext.test as dpytest
import pytest
from discord.ext import commands
from pydantic import ValidationError
from typer.testing import CliRunner

from bot.config import Settings
from bot.platforms.discord_bot import PersonaBot, create_bot, run_discord
from bot.platforms.discord_reply import PersonaWebhooks
from dpytest_harness import configure_dpytest
from openai_server import openai_server  # noqa: F401  (fixture)
from test_discord import bot_messages, channel, engine, say_to_bot  # noqa: F401  (fixture)


def shard_settings(**env: object) -> Settings:
    return Settings(_env_file=None, **env)


# -- settings ----------------------------------------------------------------------------------------


def test_shard_settings_are_read_from_the_environment(monkeypatch):
    monkeypatch.setenv("DISCORD_SHARD_COUNT", "8")
    monkeypatch.setenv("DISCORD_SHARD_IDS", "4, 5,6,7")
    settings = Settings(_env_file=None)
    assert (settings.discord_shard_count, settings.discord_shard_ids) == (8, (4, 5, 6, 7))


def test_unset_or_blank_shard_settings_leave_the_choice_to_discord():
    for settings in (shard_settings(), shard_settings(DISCORD_SHARD_COUNT="", DISCORD_SHARD_IDS="")):
        assert settings.discord_shard_count is None and settings.discord_shard_ids is None


@pytest.mark.parametrize(("env", "says"), [
    ({"DISCORD_SHARD_IDS": "0,1"}, "DISCORD_SHARD_IDS needs DISCORD_SHARD_COUNT"),
    ({"DISCORD_SHARD_COUNT": "2", "DISCORD_SHARD_IDS": "1,2"}, "shard ids run from 0 to DISCORD_SHARD_COUNT - 1 = 1"),
    ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARD_IDS": "1,1"}, "lists a shard twice"),
    ({"DISCORD_SHARD_COUNT": "4", "DISCORD_SHARD_IDS": "0;-1"}, "shard numbers separated by commas"),
    ({"DISCORD_SHARD_COUNT": "0"}, "greater than 0"),
], ids=["ids without count", "id past count", "duplicate", "not numbers", "zero shards"])
def test_bad_shard_settings_are_refused(env, says):
    with pytest.raises(ValidationError, match=says):
        shard_settings(**env)


def test_bad_shard_settings_stop_the_command_line_with_the_reason_only(monkeypatch, tmp_path):
    from bot.cli import app

    monkeypatch.chdir(tmp_path)  # no .env
    result = CliRunner().invoke(app, ["personas", "list"], env={
        "DISCORD_SHARD_COUNT": "2", "DISCORD_SHARD_IDS": "3", "DISCORD_TOKEN": "secret-token-123"})
    assert result.exit_code == 2
    assert "DISCORD_SHARD_IDS 3: shard ids run from 0 to DISCORD_SHARD_COUNT - 1 = 1" in result.output
    assert "secret-token-123" not in result.output and "Traceback" not in result.output


# -- the bot -----------------------------------------------------------------------------------------


@pytest.fixture
async def bot(engine):
    """The bot of the second of two processes: shards 1 and 3 of 4."""
    settings = engine.settings.model_copy(update={"discord_shard_count": 4, "discord_shard_ids": (1, 3)})
    bot = create_bot(engine, settings, edit_interval=0.01)
    await configure_dpytest(bot, guilds=["Guild"], text_channels=["general", "random"], voice_channels=0,
                            members=["alice", "bob"])
    yield bot
    await dpytest.empty_queue()


async def test_bot_built_with_shard_settings_carries_them_and_still_answers(bot):
    assert isinstance(bot, commands.AutoShardedBot)
    assert (bot.shard_count, bot.shard_ids) == (4, [1, 3])
    assert bot.describe_shards() == "shards 1,3 of 4"
    guild = channel("general").guild
    assert guild.shard_id == (guild.id >> 22) % 4  # as Discord routes the guild's events

    await say_to_bot(bot, "hello from a shard")

    assert await bot_messages(channel("general"), bot) == ["echo: hello from a shard"]


async def test_logs_say_which_shards_this_process_runs(bot, caplog):
    caplog.set_level(logging.INFO, logger="bot.platforms.discord_bot")
    guild = channel("general").guild
    await bot.on_shard_ready(guild.shard_id)
    await bot.on_ready()
    assert f"Discord shard {guild.shard_id} of 4 ready: 1 servers" in caplog.text
    assert "shards 1,3 of 4, 1 servers" in caplog.text


async def test_unsharded_settings_let_discord_py_pick_the_count(engine):
    bot = create_bot(engine, engine.settings)
    assert isinstance(bot, commands.AutoShardedBot)
    assert (bot.shard_count, bot.shard_ids) == (None, None)  # launch_shards asks Discord's /gateway/bot
    assert bot.describe_shards() == "shards all of Discord's recommended count"


@pytest.mark.parametrize(("code", "says"), [
    (4011, "Discord requires more shards for this bot's servers than DISCORD_SHARD_COUNT=2"),
    (4010, "Discord refused the shard settings (shards 1 of 2)"),
])
async def test_discord_refusing_the_shard_count_stops_with_what_to_change(engine, monkeypatch, code, says):
    settings = engine.settings.model_copy(update={"discord_token": "token", "discord_shard_count": 2,
                                                  "discord_shard_ids": (1,)})

    async def start(self, token: str, **_: object) -> None:
        raise discord.ConnectionClosed(SimpleNamespace(close_code=code), shard_id=1)

    monkeypatch.setattr(PersonaBot, "start", start)
    with pytest.raises(RuntimeError, match=re.escape(says)):
        await run_discord(engine, settings)


@pytest.mark.parametrize(("ids", "syncs"), [(None, True), ((0, 2), True), ((1, 3), False)])
async def test_only_the_process_running_shard_0_registers_the_slash_commands(engine, monkeypatch, ids, syncs):
    update = {"discord_shard_count": 4, "discord_shard_ids": ids} if ids else {}
    bot = create_bot(engine, engine.settings.model_copy(update=update))
    synced = []

    async def sync(*args, **kwargs):
        synced.append(True)
        return []

    monkeypatch.setattr(bot.tree, "sync", sync)
    await bot.setup_hook()
    assert bool(synced) is syncs


class SlowChannel:
    """A text channel whose webhook list takes until `released` to come back (a slow or rate-limited shard)."""

    def __init__(self, channel_id: int, released: asyncio.Event):
        self.id, self.released = channel_id, released
        self.guild = type("Guild", (), {"me": type("Me", (), {"id": 1})()})()

    def permissions_for(self, member) -> discord.Permissions:
        return discord.Permissions(manage_webhooks=True)

    async def webhooks(self) -> list:
        await self.released.wait()
        return []

    async def create_webhook(self, *, name: str, reason: str) -> object:
        return type("Hook", (), {"id": self.id, "name": name})()


async def test_a_slow_webhook_lookup_in_one_channel_does_not_hold_up_another():
    hooks = PersonaWebhooks()
    stuck, free = asyncio.Event(), asyncio.Event()
    free.set()
    slow = asyncio.create_task(hooks.get(SlowChannel(1, stuck)))
    await asyncio.sleep(0)
    fast = await asyncio.wait_for(hooks.get(SlowChannel(2, free)), 2)  # not queued behind channel 1
    assert fast.id == 2 and not slow.done()
    stuck.set()
    assert (await slow).id == 1
