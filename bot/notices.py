"""Notes the bot says once per channel, for good: remembered in the bot's database, not in the process.

Some notes are worth saying once and never again in that channel, such as Discord's "give me Manage Webhooks
and each persona answers under its own name": said on every reply it is noise, said once per process it comes
back after every restart and once from every process serving the channel. So each is claimed with one row in
`notices_said` (migration m007), inserted with `ON CONFLICT DO NOTHING` through the history store's writer;
on SQLite and PostgreSQL alike, whichever process inserts the row is the one that speaks. A small cache in
front keeps a channel already told from costing a write per reply.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from datetime import datetime, timezone
from typing import Any

from bot.conversation import ConvKey

log = logging.getLogger(__name__)

CLAIM = ("INSERT INTO notices_said (platform, workspace, channel, notice, said_at) VALUES (?, ?, ?, ?, ?)"
         " ON CONFLICT DO NOTHING")


class SaidOnce:
    """`first_time(key, notice)` is True exactly once per (channel, notice), across restarts and processes."""

    def __init__(self, history: Any, size: int = 4096):
        self.history = history  # HistoryStore or PostgresHistoryStore: both have execute(sql, params)
        self.size = size
        self._known: OrderedDict[tuple[ConvKey, str], None] = OrderedDict()

    async def first_time(self, key: ConvKey, notice: str) -> bool:
        """Whether to say `notice` in the channel of `key` (its threads share the channel's). A database that
        cannot be written is taken as "already said": a missing note costs less than a failed reply."""
        channel = key.channel_key
        if (channel, notice) in self._known:
            self._known.move_to_end((channel, notice))
            return False
        try:
            claimed = await self.history.execute(
                CLAIM, (*channel[:3], notice, datetime.now(timezone.utc).isoformat(timespec="seconds")))
        except Exception as exc:
            log.warning("could not record notice %s in %s: %s", notice, channel, exc)
            return False
        self._known[(channel, notice)] = None
        while len(self._known) > self.size:
            self._known.popitem(last=False)
        return claimed == 1
