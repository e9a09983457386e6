"""The Discord adapter: who the bot answers, and where (after llmcord: one `on_message`, one reply path).

It answers when mentioned (or replied to), in DMs, in threads it started, and in channels an admin enabled
with `/channel enable`. Everything it says comes from `Engine.reply`; this module only decides whether a
message is addressed to the bot and hands the stream to `ReplyStream`.

The bot needs the privileged MESSAGE_CONTENT intent (Developer Portal → Bot → Privileged Gateway Intents) to
read what people write; without it Discord refuses the connection, and `run_discord` says how to turn it on.

Sharding: the bot is an `AutoShardedBot`. With DISCORD_SHARD_COUNT and DISCORD_SHARD_IDS unset it asks Discord
for the recommended shard count and runs every shard in this process; set, it runs only the shards listed, so
several processes split them. A guild lives on exactly one shard (`(guild_id >> 22) % shard_count`) and DMs on
shard 0, so each conversation is always served by one process, and the webhook the bot remembers per channel is
correct per shard without any sharing. The note that it could not use one is said once per channel for good: it
is recorded in the database (bot/notices.py), so neither a restart nor a resharding says it again. The presence, if
one is ever set, belongs in the constructor (`activity=`, or the `activity` property): every shard sends it in
its IDENTIFY, also when it identifies again after a reconnect, which forgets a `change_presence` made since.
"""
from __future__ import annotations

import logging
import re

import discord
from discord.ext import commands

from bot.config import Settings
from bot.conversation import Incoming
from bot.engine import Engine
from bot.notices import SaidOnce
from bot.platforms.discord_commands import add_commands
from bot.platforms.discord_reply import (
    DM_NOTICE, EDIT_INTERVAL, NO_WEBHOOKS_NOTICE, PersonaWebhooks, ReplyStream, conv_key, make_incoming,
    persona_look, safe_mentions, send_with_retries, typing_in, webhook_channel,
)

log = logging.getLogger(__name__)

ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)
# Gateway close codes: https://discord.com/developers/docs/topics/opcodes-and-status-codes#gateway
INVALID_SHARD, SHARDING_REQUIRED = 4010, 4011
# How each once-per-channel note is recorded in the database (bot/notices.py): a name, not the wording, so
# rewording a note does not say it again everywhere.
NOTICE_NAMES = {NO_WEBHOOKS_NOTICE: "discord-no-webhooks", DM_NOTICE: "discord-dm-identity"}


class PersonaBot(commands.AutoShardedBot):
    """Chat happens in `on_message`; everything else is a slash command (discord_commands.py)."""

    def __init__(self, engine: Engine, settings: Settings, *, edit_interval: float = EDIT_INTERVAL):
        intents = discord.Intents.default()
        intents.message_content = True
        super().__init__(
            # No prefix commands: on_message below replaces the one that would parse them.
            command_prefix=commands.when_mentioned,
            intents=intents,
            allowed_mentions=safe_mentions(),
            help_command=None,
            shard_count=settings.discord_shard_count,
            shard_ids=list(settings.discord_shard_ids) if settings.discord_shard_ids else None,
        )
        self.engine = engine
        self.settings = settings
        self.edit_interval = edit_interval
        self.webhooks = PersonaWebhooks()
        self.said_once = SaidOnce(engine.history)
        add_commands(self)

    @property
    def runs_first_shard(self) -> bool:
        """Shard 0 gets the DMs; its process also registers the slash commands, once for every process."""
        return self.shard_ids is None or 0 in self.shard_ids

    def describe_shards(self) -> str:
        ids = self.shard_ids if self.shard_ids is not None else sorted(self.shards) or None
        shards = ",".join(map(str, ids)) if ids is not None else "all"
        total = self.shard_count if self.shard_count is not None else "Discord's recommended count"
        return f"shards {shards} of {total}"

    async def setup_hook(self) -> None:
        # Bulk overwrite is idempotent and cheap when nothing changed; new commands show up within a minute.
        # Commands are global, so one process syncing them is enough (and N processes would spend N rate limits).
        if self.runs_first_shard:
            await self.tree.sync()

    async def on_ready(self) -> None:
        # Once every shard of this process is ready; its servers are those shards' only.
        log.info("connected to Discord as %s: %s, %d servers", self.user, self.describe_shards(), len(self.guilds))

    async def on_shard_ready(self, shard_id: int) -> None:
        log.info("Discord shard %d of %s ready: %d servers", shard_id, self.shard_count,
                 sum(1 for guild in self.guilds if guild.shard_id == shard_id))

    async def on_shard_disconnect(self, shard_id: int) -> None:
        log.info("Discord shard %d disconnected; discord.py reconnects it", shard_id)

    async def on_shard_resumed(self, shard_id: int) -> None:
        log.info("Discord shard %d resumed", shard_id)

    async def on_message(self, message: discord.Message) -> None:
        # Nothing a bot or a webhook writes is answered (a webhook's author need not be marked a bot): two
        # bots answering each other would talk forever.
        if message.author.bot or message.webhook_id or message.type not in ANSWERED_TYPES:
            return
        if not await self.is_addressed(message):
            return
        text = self.strip_own_mention(message.content, message.guild)
        # Attachments go to the engine as they are: it decides which to download (images, text files).
        incoming = make_incoming(self.engine, message.author, message.channel, text, message.attachments)
        if not text and not message.attachments:
            if isinstance(message.channel, discord.DMChannel) or self.user in message.mentions:
                await self.introduce(message, incoming)
            return
        await self.answer(message, incoming)

    async def introduce(self, message: discord.Message, incoming: Incoming) -> None:
        persona = await self.engine.active_persona(incoming.key)
        await send_with_retries(
            lambda: message.channel.send(
                f"**{persona.display_name}** here. {persona.description} Ask me anything.",
                reference=message.to_reference(fail_if_not_exists=False),
                allowed_mentions=safe_mentions(message.author),
            ),
            "send",
        )

    async def answer(self, message: discord.Message, incoming: Incoming) -> None:
        """Streams the reply as the persona (name and avatar, through the channel's webhook) where the bot may
        manage webhooks, else under its own identity, saying once per channel how to change that."""
        mentions = safe_mentions(message.author)
        channel = message.channel
        parent = webhook_channel(channel)
        hook = await self._webhook(parent)
        look = persona_look(await self.engine.active_persona(incoming.key), self.user.display_avatar.url,
                            self.engine.settings.public_url)
        thread = channel if isinstance(channel, discord.Thread) else discord.utils.MISSING

        async def send(content: str, reference: discord.MessageReference | None = None) -> discord.Message:
            nonlocal hook
            if hook is not None and parent is not None:
                try:
                    return await hook.send(content, thread=thread, wait=True, allowed_mentions=mentions, **look)
                except (discord.NotFound, discord.Forbidden) as exc:  # deleted, or the permission taken away
                    log.info("webhook in %s unusable (%s); answering under the bot's own name", parent.id, exc)
                    self.webhooks.forget(parent.id)
                    hook = None
            return await channel.send(content, reference=reference, allowed_mentions=mentions)

        async def first(content: str) -> discord.Message:
            return await send(content, message.to_reference(fail_if_not_exists=False))

        stream = ReplyStream(first, send, mentions=mentions, typing=typing_in(channel), interval=self.edit_interval)
        try:
            await stream.run(self.engine.reply(incoming))
            # Said in DMs and text channels; a forum's or voice channel's threads have no webhook to enable here.
            notice = DM_NOTICE if incoming.is_private else NO_WEBHOOKS_NOTICE if parent is not None else None
            if hook is None and notice and await self.said_once.first_time(incoming.key, NOTICE_NAMES[notice]):
                await channel.send(notice, allowed_mentions=safe_mentions())
        except discord.HTTPException as exc:
            # Missing permissions, or the message was deleted mid-reply: nothing left to show it in.
            log.warning("could not deliver a reply in %s: %s", incoming.key, exc)

    async def _webhook(self, parent: discord.TextChannel | None, *, create: bool = True) -> discord.Webhook | None:
        if parent is None:
            return None
        try:
            return await self.webhooks.get(parent, create=create)
        except discord.HTTPException as exc:  # e.g. the channel already has Discord's 15 webhooks
            log.warning("no webhook in channel %s: %s", parent.id, exc)
            return None

    async def is_addressed(self, message: discord.Message) -> bool:
        me = self.user
        channel = message.channel
        if isinstance(channel, discord.DMChannel) or me in message.mentions:
            return True
        guild = message.guild
        if guild is not None and guild.self_role is not None and guild.self_role in message.role_mentions:
            return True
        reference = message.reference
        replied_to = reference.resolved if reference is not None else None
        if isinstance(replied_to, discord.Message) and replied_to.author == me:
            return True
        if isinstance(replied_to, discord.Message) and replied_to.webhook_id is not None:
            # A reply to a persona's message (sent through the bot's webhook) carries on the conversation.
            hook = await self._webhook(webhook_channel(channel), create=False)
            if hook is not None and hook.id == replied_to.webhook_id:
                return True
        if isinstance(channel, discord.Thread) and channel.owner_id == me.id:
            return True
        # A thread inherits its parent channel's setting: the key's channel is the parent.
        return await self.engine.channel_enabled(conv_key(channel))

    def strip_own_mention(self, content: str, guild: discord.Guild | None) -> str:
        pattern = rf"<@!?{self.user.id}>"
        if guild is not None and guild.self_role is not None:
            pattern += rf"|<@&{guild.self_role.id}>"
        return re.sub(pattern, "", content).strip()


def create_bot(engine: Engine, settings: Settings, *, edit_interval: float = EDIT_INTERVAL) -> PersonaBot:
    """The bot, fully wired but not connected: `run_discord` starts it, tests drive it with dpytest."""
    return PersonaBot(engine, settings, edit_interval=edit_interval)


async def run_discord(engine: Engine, settings: Settings) -> None:
    """Connects with DISCORD_TOKEN and serves until cancelled; discord.py reconnects the gateway on its own."""
    if not settings.discord_token:
        raise ValueError("DISCORD_TOKEN is not set")
    bot = create_bot(engine, settings)
    log.info("starting Discord: %s", bot.describe_shards())
    try:
        async with bot:
            await bot.start(settings.discord_token)
    except discord.PrivilegedIntentsRequired:
        raise RuntimeError(
            "Discord refused the Message Content intent. Turn it on at https://discord.com/developers/applications"
            " → your app → Bot → Privileged Gateway Intents → Message Content Intent, then restart."
        ) from None
    except discord.LoginFailure:
        raise RuntimeError(
            "Discord rejected DISCORD_TOKEN; copy it again from the Developer Portal (Bot → Reset Token)."
        ) from None
    except discord.ConnectionClosed as exc:
        if exc.code == SHARDING_REQUIRED:
            raise RuntimeError(
                f"Discord requires more shards for this bot's servers than DISCORD_SHARD_COUNT="
                f"{settings.discord_shard_count}: raise it in every process, or unset DISCORD_SHARD_COUNT and "
                "DISCORD_SHARD_IDS to run Discord's recommended count in one process."
            ) from None
        if exc.code == INVALID_SHARD:
            raise RuntimeError(
                f"Discord refused the shard settings ({bot.describe_shards()}): check DISCORD_SHARD_COUNT and "
                "DISCORD_SHARD_IDS."
            ) from None
        raise
