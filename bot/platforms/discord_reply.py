"""How a Discord event reaches the engine, and how the engine's stream of text reaches Discord.

Rate limits: Discord allows about 5 message sends or edits per 5 s per channel. A reply makes at most one
request (send or edit) per `EDIT_INTERVAL` (1.2 s), and edits only when its text changed; starting an
overflow message counts as a request too. So one streaming reply stays at ≤5 requests in any 5 s window
(bench/discord_stream.py measures it); discord.py waits out any 429 that overlapping replies still hit.

Resilience: replies go out over REST, not the gateway. A gateway reconnect (RESUME or a fresh IDENTIFY) does
not touch the task that is streaming a reply, and REST keeps working while the websocket is down, so no reply
queued in the engine is lost. discord.py already retries a 5xx five times (about 25 s); `send_with_retries`
adds longer backoff on top for server errors and dropped connections (a network blip that takes the gateway
down usually takes in-flight HTTP with it), so a reply survives roughly a minute of Discord trouble.
"""
from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import AbstractAsyncContextManager, asynccontextmanager, nullcontext
from typing import TYPE_CHECKING, Protocol, TypeVar

import aiohttp
import discord

from bot.conversation import Attachment, ConvKey, Incoming
from bot.personas import Persona, avatar_url
from bot.render import EMPTY_REPLY, FAILURE_NOTICE, close_open_fence, split_message

if TYPE_CHECKING:
    from bot.engine import Engine

log = logging.getLogger(__name__)

DISCORD_LIMIT = 2000  # characters of content Discord accepts in one message
EDIT_INTERVAL = 1.2  # seconds between edits of one reply; see the module docstring
RETRY_DELAYS = (2.0, 4.0, 8.0, 16.0, 32.0)
TYPING_REFRESH = 8.0

T = TypeVar("T")


def safe_mentions(asker: discord.abc.Snowflake | None = None) -> discord.AllowedMentions:
    """Whatever the model writes, nobody is pinged except the asker (by the reply itself)."""
    return discord.AllowedMentions(
        everyone=False, roles=False, users=[asker] if asker is not None else False, replied_user=asker is not None
    )


# -- Discord → engine --------------------------------------------------------------------------------


def conv_key(channel: discord.abc.Messageable) -> ConvKey:
    """History lives per channel, and per thread inside it; DMs have no guild, so their workspace is "dm"."""
    guild = getattr(channel, "guild", None)
    workspace = str(guild.id) if guild is not None else "dm"
    if isinstance(channel, discord.Thread):
        return ConvKey("discord", workspace, str(channel.parent_id), str(channel.id))
    return ConvKey("discord", workspace, str(getattr(channel, "id", "")))


def make_incoming(engine: "Engine", user: discord.abc.User, channel: discord.abc.Messageable, text: str,
                  files: Sequence[discord.Attachment] = ()) -> Incoming:
    """Who is asking: an owner (PERSONABOT_ADMINS), this server's admin (Manage Server here), or a member."""
    permissions = getattr(user, "guild_permissions", None)
    return Incoming(
        key=conv_key(channel),
        user_id=str(user.id),
        text=text,
        attachments=tuple(map(attachment, files)),
        user_name=getattr(user, "display_name", user.name),
        role=engine.role("discord", str(user.id), workspace_admin=bool(permissions and permissions.manage_guild)),
        is_private=getattr(channel, "guild", None) is None,  # a DM (also when it arrives as a partial channel)
    )


def attachment(file: discord.Attachment) -> Attachment:
    """A Discord attachment as the engine takes it, fetched from the CDN only if the engine reads it. Its size
    is the one Discord measured when it stored the upload, which the engine checks against the limit before
    the download, so discord.py's whole-body `read()` holds no more than that."""
    return Attachment(file.filename, file.size, lambda limit: file.read(), file.content_type or "")


# -- engine → Discord --------------------------------------------------------------------------------


async def send_with_retries(call: Callable[[], Awaitable[T]], what: str = "request") -> T:
    """Runs a REST call, retrying Discord 5xx errors and dropped connections with backoff."""
    for delay in (*RETRY_DELAYS, None):
        try:
            return await call()
        except discord.HTTPException as exc:
            if exc.status < 500 or delay is None:
                raise
            log.warning("discord %s failed with %s; retrying in %.0fs", what, exc.status, delay)
        except (aiohttp.ClientError, OSError, asyncio.TimeoutError) as exc:
            if delay is None:
                raise
            log.warning("discord %s failed (%s); retrying in %.0fs", what, exc, delay)
        await asyncio.sleep(delay)
    raise AssertionError("unreachable")


@asynccontextmanager
async def typing_in(channel: discord.abc.Messageable) -> AsyncIterator[None]:
    """Shows "typing…" until the block ends; a failure to show it never costs the reply."""

    async def keep_typing() -> None:
        while True:
            try:
                await channel.typing()  # one trigger lasts about 10 s
            except (discord.HTTPException, aiohttp.ClientError, OSError) as exc:
                log.debug("typing indicator failed: %s", exc)
            await asyncio.sleep(TYPING_REFRESH)

    task = asyncio.create_task(keep_typing())
    try:
        yield
    finally:
        task.cancel()


# -- the persona's own name and face: a channel webhook -----------------------------------------------

WEBHOOK_NAME = "personabot"
USERNAME_LIMIT = 80  # Discord's cap on a webhook message's username
NO_WEBHOOKS_NOTICE = ("_(I'm answering under my own name here. Give me the **Manage Webhooks** permission in this "
                      "channel's settings and each persona answers with its own name and avatar.)_")
DM_NOTICE = ("_(In DMs I answer under my own name; in a server channel where I have the **Manage Webhooks** "
             "permission, each persona answers with its own name and avatar.)_")


class PersonaWebhooks:
    """One webhook per text channel, made by the bot once and reused (a thread posts through its parent's).

    Discord allows 15 webhooks a channel and rate-limits creating them, so the bot looks for its own before
    making one, and remembers the most recent `size` channels' (a handful of bytes each), keyed by channel id,
    which belongs to one guild and so to one shard: a process running several shards keeps them apart, and
    processes running other shards never see those channels. (Where it could not use one, the note saying so
    is said once per channel for good, through bot/notices.py.)
    """

    def __init__(self, size: int = 1024):
        self.size = size
        self._hooks: OrderedDict[int, discord.Webhook] = OrderedDict()
        # Two first replies in one channel must not make two webhooks; other channels (thousands, across the
        # shards) must not wait for this one's lookup, so the lock is per channel, gone when nobody holds it.
        self._locks: weakref.WeakValueDictionary[int, asyncio.Lock] = weakref.WeakValueDictionary()

    async def get(self, channel: discord.TextChannel, *, create: bool = True) -> discord.Webhook | None:
        """The bot's webhook in `channel`, or None where it may not manage webhooks."""
        if (hook := self._hooks.get(channel.id)) is not None:
            self._hooks.move_to_end(channel.id)
            return hook
        if not channel.permissions_for(channel.guild.me).manage_webhooks:
            return None
        lock = self._locks.get(channel.id)
        if lock is None:
            lock = self._locks[channel.id] = asyncio.Lock()
        async with lock:
            if (hook := self._hooks.get(channel.id)) is None:
                me = channel.guild.me
                mine = [h for h in await channel.webhooks()
                        if h.user is not None and h.user.id == me.id and h.name == WEBHOOK_NAME and h.token]
                if mine:
                    hook = mine[0]
                elif create:
                    hook = await channel.create_webhook(name=WEBHOOK_NAME, reason="replies in each persona's name")
                else:
                    return None
                self._remember(self._hooks, channel.id, hook)
        return hook

    def forget(self, channel_id: int) -> None:
        """The webhook was deleted or the permission taken away: look again next time."""
        self._hooks.pop(channel_id, None)

    def _remember(self, cache: OrderedDict, key: int, value: object) -> None:
        cache[key] = value
        cache.move_to_end(key)
        while len(cache) > self.size:
            cache.popitem(last=False)


def webhook_channel(channel: discord.abc.Messageable) -> discord.TextChannel | None:
    """The text channel whose webhook would carry a reply here (a thread's parent), or None (DMs, voice chats)."""
    parent = channel.parent if isinstance(channel, discord.Thread) else channel
    return parent if isinstance(parent, discord.TextChannel) else None


def persona_look(persona: Persona, fallback_avatar: str | None, public_url: str | None) -> dict[str, str]:
    """`username` and `avatar_url` for `Webhook.send`; without a usable image URL, the bot's own avatar."""
    return {"username": persona.display_name[:USERNAME_LIMIT],
            "avatar_url": avatar_url(persona, public_url) or fallback_avatar or discord.utils.MISSING}


class Editable(Protocol):
    async def edit(self, *, content: str, allowed_mentions: discord.AllowedMentions) -> object: ...


SendFn = Callable[[str], Awaitable[Editable]]


class ReplyStream:
    """Renders a stream of text into Discord messages: typing until the first text, then throttled edits.

    `send_first` posts the first message (a reply to the asker, or an interaction's response) and
    `send_more` each overflow message of a reply longer than 2000 characters.
    """

    def __init__(
        self,
        send_first: SendFn,
        send_more: SendFn,
        *,
        mentions: discord.AllowedMentions,
        typing: AbstractAsyncContextManager | None = None,
        interval: float = EDIT_INTERVAL,
    ):
        self.send_first = send_first
        self.send_more = send_more
        self.mentions = mentions
        self.typing = typing or nullcontext()
        self.interval = interval
        self.messages: list[Editable] = []
        self.shown: list[str] = []
        self.edits = 0
        self._last_request = float("-inf")

    async def run(self, pieces: AsyncIterator[str]) -> list[str]:
        """Streams `pieces` into Discord and returns the messages' final texts."""
        text = ""
        done = asyncio.Event()
        changed = asyncio.Event()

        async def consume() -> None:
            nonlocal text
            try:
                async for piece in pieces:
                    text += piece
                    changed.set()
            except Exception as exc:  # a bug or a dead database must still end in words, not a frozen reply
                log.exception("reply failed")
                text += ("\n\n" if text else "") + FAILURE_NOTICE.format(error=type(exc).__name__)
            finally:
                done.set()
                changed.set()

        consumer = asyncio.create_task(consume())
        try:
            async with self.typing:
                while not text.strip() and not done.is_set():
                    await changed.wait()
                    changed.clear()
            while True:
                changed.clear()
                finished = done.is_set()
                await self._show(text or EMPTY_REPLY)
                if finished:
                    return self.shown
                await changed.wait()
                await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - self._last_request)))
        finally:
            consumer.cancel()

    async def _show(self, text: str) -> None:
        """Brings the messages up to date with `text`, one request per interval at most.

        The last message's code block is closed while the reply streams and also once it ends: a reply cut off
        by the length limit mid-code would otherwise flip from a rendered block to raw backticks on its final
        edit.
        """
        parts = split_message(text, DISCORD_LIMIT) or [EMPTY_REPLY]
        parts[-1] = close_open_fence(parts[-1], DISCORD_LIMIT)
        for index, part in enumerate(parts):
            if index < len(self.messages):
                if self.shown[index] != part:
                    message = self.messages[index]
                    await self._pace()
                    await send_with_retries(lambda: message.edit(content=part, allowed_mentions=self.mentions), "edit")
                    self._last_request = time.monotonic()
                    self.shown[index] = part
                    self.edits += 1
                continue
            send = self.send_first if index == 0 else self.send_more
            await self._pace()
            self.messages.append(await send_with_retries(lambda: send(part), "send"))
            self._last_request = time.monotonic()
            self.shown.append(part)

    async def _pace(self) -> None:
        await asyncio.sleep(max(0.0, self.interval - (time.monotonic() - self._last_request)))
