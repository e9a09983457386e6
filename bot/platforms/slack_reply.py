"""Rendering one streamed reply into a Slack thread without tripping Slack's rate limits.

Slack's streaming methods (chat.startStream/appendStream/stopStream) show the answer growing in place and
render Markdown themselves. Workspaces or channels where they are refused get the older way: one message
posted, then edited with chat.update. Either way writes to one channel are paced by a `ChannelPacer` shared
by every reply in flight, since Slack allows about one message write per second per channel.

Each write is defused on its own (`defuse_mentions`) and cut only where `safe_to_send` says no mention can be
split, so what the reader sees, the concatenation of the writes, pings nobody either.
"""
from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable

from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_chat_stream import AsyncChatStream
from slack_sdk.web.async_client import AsyncWebClient

from bot.personas import AVATAR_EMOJI, Persona, avatar_url
from bot.platforms.slack_format import MESSAGE_LIMIT, STREAM_LIMIT, defuse_mentions, safe_to_send, to_mrkdwn
from bot.render import EMPTY_REPLY, best_cut, open_fence, split_message

log = logging.getLogger(__name__)

USERNAME_LIMIT = 80  # Slack shows at most this much of a customized name


def persona_identity(persona: Persona, public_url: str | None) -> dict[str, str]:
    """The persona's name and face for a post or stream (needs chat:write.customize; without it Slack shows
    the app's own, which is still a delivered answer)."""
    identity = {"username": persona.display_name[:USERNAME_LIMIT]}
    if AVATAR_EMOJI.fullmatch(persona.avatar):
        identity["icon_emoji"] = persona.avatar
    elif url := avatar_url(persona, public_url):
        identity["icon_url"] = url
    return identity


class ChannelPacer:
    """Spaces writes to each channel `interval` seconds apart, across all the replies being written there.

    A channel is keyed by (workspace, channel), since channel ids are only unique within a workspace. Only
    channels whose next slot is still ahead are remembered (one whose slot has passed is as free as one never
    seen), and never more than `size` of them, so a bot in thousands of channels holds a handful of entries.
    """

    def __init__(self, interval: float = 1.0, clock: Callable[[], float] = time.monotonic, size: int = 10_000):
        self._interval = interval
        self._clock = clock
        self._size = size
        self._next: OrderedDict[Hashable, float] = OrderedDict()  # least recently written first

    def __len__(self) -> int:
        return len(self._next)

    def try_acquire(self, channel: Hashable) -> bool:
        """Take the channel's next slot if it is free now; a streaming update can simply wait for more text."""
        now = self._clock()
        if now < self._slot(channel, now):
            return False
        self._take(channel, now)
        return True

    async def acquire(self, channel: Hashable) -> None:
        """Wait for the channel's next slot; the last write of a reply must go out."""
        now = self._clock()
        at = max(now, self._slot(channel, now))
        self._take(channel, at)
        if at > now:
            await asyncio.sleep(at - now)

    def _slot(self, channel: Hashable, now: float) -> float:
        while self._next and next(iter(self._next.values())) <= now:
            self._next.popitem(last=False)
        return self._next.get(channel, now)

    def _take(self, channel: Hashable, at: float) -> None:
        self._next[channel] = at + self._interval
        self._next.move_to_end(channel)
        if len(self._next) > self._size:  # forgetting a busy channel costs at most one early write, which
            self._next.popitem(last=False)  # slack_sdk's rate-limit retry absorbs


class ThreadReply:
    """Collects a reply's text pieces and writes them to the thread, streaming where Slack allows it."""

    def __init__(
        self,
        client: AsyncWebClient,
        *,
        channel: str,
        thread_ts: str,
        team_id: str,
        user_id: str,
        pacer: ChannelPacer,
        identity: dict[str, str] | None = None,
    ):
        self._client = client
        self._identity = identity or {}
        self._channel = channel
        self._thread_ts = thread_ts
        self._team_id = team_id
        self._user_id = user_id
        self._pacer = pacer
        self._paced = (team_id, channel)
        self._pending = ""  # Markdown received and not yet sent
        self._wrote_any = False
        # streaming state
        self._stream: AsyncChatStream | None = None
        self._stream_text = ""
        self._reopen = ""  # a code block to reopen at the top of the next streamed message
        self._unsent = ""
        # chat.update state, once streaming was refused
        self._updating = False
        self._markdown = ""
        self._posted: list[tuple[str, str]] = []  # (ts, mrkdwn sent) per message

    async def write(self, text: str) -> None:
        self._pending += text
        if safe_to_send(self._pending) and self._pacer.try_acquire(self._paced):
            await self._flush(final=False)

    async def close(self) -> None:
        if not self._wrote_any and not self._pending.strip():
            self._pending = EMPTY_REPLY
        if self._pending:
            await self._pacer.acquire(self._paced)
            await self._flush(final=True)
        if self._stream is not None:
            await self._stream.stop()  # part of the reply's last write: Slack counts it with the append before
            self._stream = None

    async def _flush(self, *, final: bool) -> None:
        ready = len(self._pending) if final else safe_to_send(self._pending)
        out, self._pending = self._pending[:ready], self._pending[ready:]
        if not out:
            return
        self._wrote_any = True
        if not self._updating:
            try:
                await self._stream_out(defuse_mentions(out))
                return
            except SlackApiError as exc:
                # Streaming can be refused (a channel type or workspace that lacks it); fall back, lose nothing.
                log.info("chat streaming refused (%s); falling back to chat.update", exc.response.get("error"))
                self._updating = True
                self._stream = None
                out = self._unsent  # the part the failed call did not deliver
        await self._update_out(out)

    async def _stream_out(self, out: str) -> None:
        self._unsent = out
        while out:
            if self._stream is None:
                self._stream = await self._client.chat_stream(
                    channel=self._channel,
                    thread_ts=self._thread_ts,
                    recipient_team_id=self._team_id,
                    recipient_user_id=self._user_id,
                    buffer_size=1,  # we buffer and pace ourselves; every append goes out at once
                    **self._identity,
                )
                self._stream_text = ""
            room = STREAM_LIMIT - len(self._reopen) - len(self._stream_text) - 4
            at = best_cut(self._stream_text + self._reopen, out, room)
            piece = self._reopen + out[:at]
            await self._stream.append(markdown_text=piece)
            self._reopen = ""
            self._stream_text += piece
            out = out[at:]
            self._unsent = out
            if out:  # this message is full: close it (and any open code block) and continue in a new one
                fence = open_fence(self._stream_text)
                await self._stream.stop(markdown_text="\n```" if fence else None)
                self._stream = None
                self._reopen = f"{fence}\n" if fence else ""
        self._unsent = ""

    async def _update_out(self, out: str) -> None:
        self._markdown += out
        for index, part in enumerate(split_message(to_mrkdwn(self._markdown), MESSAGE_LIMIT)):
            if index < len(self._posted):
                ts, sent = self._posted[index]
                if sent != part:
                    await self._client.chat_update(channel=self._channel, ts=ts, text=part)
                    self._posted[index] = (ts, part)
            else:
                response = await self._client.chat_postMessage(
                    channel=self._channel, thread_ts=self._thread_ts, text=part, **self._identity
                )
                self._posted.append((response["ts"], part))
