"""The Discord adapter: who the bot answers, and where (after llmcord: one `on_message`, one reply path).

It answers when mentioned (or replied to), in DMs, in threads it started, and in channels an admin enabled
with `/channel enable`. Everything it says comes from `Engine.reply`; this module only decides whether a
message is addressed to the bot and hands the stream to `ReplyStream`.

The bot needs the privileged MESSAGE_CONTENT intent (Developer Portal → Bot → Privileged Gateway Intents) to
read what people write; without it Discord refuses the connection, and `run_discord` says how to turn it on.
"""
from __future__ import annotations

import logging
import re

import discord
from discord.ext import commands

from bot.config import Settings
from bot.conversation import Incoming
from bot.engine import Engine
from bot.platforms.discord_commands import add_commands
from bot.platforms.discord_reply import (
    DM_NOTICE, EDIT_INTERVAL, NO_WEBHOOKS_NOTICE, PersonaWebhooks, ReplyStream, conv_key, make_incoming,
    persona_look, safe_mentions, send_with_retries, typing_in, webhook_channel,
)

log = logging.getLogger(__name__)

ANSWERED_TYPES = (discord.MessageType.default, discord.MessageType.reply)


class PersonaBot(commands.Bot):
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
        )
        self.engine = engine
        self.settings = settings
        self.edit_interval = edit_interval
        self.webhooks = PersonaWebhooks()
        add_commands(self)

    async def setup_hook(self) -> None:
        # Bulk overwrite is idempotent and cheap when nothing changed; new commands show up within a minute.
        await self.tree.sync()

    async def on_ready(self) -> None:
        log.info("connected to Discord as %s in %d servers", self.user, len(self.guilds))

    async def on_message(self, message: discord.Message) -> None:
        # Nothing a bot or a webhook writes is answered (a webhook's author need not be marked a bot): two
        # bots answering each other would talk forever.
        if message.author.bot or message.webhook_id or message.type not in ANSWERED_TYPES:
            return
        if not await self.is_addressed(message):
            return
        text = self.strip_own_mention(message.content, message.guild)
        incoming = make_incoming(self.engine, message.author, message.channel, text)
        if not text:
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
            if hook is None and notice and self.webhooks.first_time_without((parent or channel).id):
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
