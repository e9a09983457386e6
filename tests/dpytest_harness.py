"""Puts a `PersonaBot` under dpytest, the way the Discord tests and bench/discord_stream.py drive it.

dpytest 0.7's `configure` refuses any `AutoShardedClient` with an isinstance check ("Sharded clients not yet
supported"), though nothing it does needs one shard: it swaps the client's connection state for its own fake
one (which copies the client's `shard_count`, so `guild.shard_id` still comes out as Discord computes it) and
delivers every event through it, the gateway never involved. `configure_dpytest` lets that check pass for the
one call and does the other set-up every test repeated.

    bot = create_bot(engine, engine.settings, edit_interval=0.01)
    await configure_dpytest(bot, guilds=["Guild"], text_channels=["general"], voice_channels=0, members=["alice"])
"""
from __future__ import annotations

import discord
import discord.ext.test as dpytest


class _NotSharded:
    """Nothing is an instance of this, so dpytest's `isinstance(client, discord.AutoShardedClient)` is False."""


async def configure_dpytest(bot: discord.Client, **config: object) -> None:
    await bot._async_setup_hook()
    # The bot needs no privileged members intent (authors come with their messages), but dpytest builds its
    # fake guilds' rosters through the member cache.
    bot._connection._intents.members = True
    bot._connection.member_cache_flags = discord.MemberCacheFlags.from_intents(bot._connection._intents)
    sharded = discord.AutoShardedClient
    discord.AutoShardedClient = _NotSharded
    try:
        dpytest.configure(bot, **config)
    finally:
        discord.AutoShardedClient = sharded
