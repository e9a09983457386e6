"""In-memory copies of what the history store reads on every message.

The database always holds the truth: these caches are written through and may forget anything at any time,
which only costs a read next time.
"""
from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from bot.models.base import Message

MISSING = object()


class Recent:
    """A least-recently-used map of small values (personas, settings, context numbers)."""

    def __init__(self, size: int = 50_000):
        self.size = size
        self._items: OrderedDict[Hashable, Any] = OrderedDict()

    def get(self, key: Hashable) -> Any:
        value = self._items.get(key, MISSING)
        if value is not MISSING:
            self._items.move_to_end(key)
        return value

    def put(self, key: Hashable, value: Any) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        if len(self._items) > self.size:
            self._items.popitem(last=False)

    def fill(self, key: Hashable, value: Any) -> Any:
        """Store a value read from disk unless a write raced ahead of the read; return what is now cached."""
        current = self.get(key)
        if current is MISSING:
            self.put(key, value)
            return value
        return current

    def forget(self, key: Hashable) -> None:
        self._items.pop(key, None)

    def forget_where(self, matches) -> None:
        """Drop every cached key `matches(key)` accepts: a scan, fine for rare admin actions."""
        for key in [key for key in self._items if matches(key)]:
            del self._items[key]


# id, the turn as a model reads it, tokens. The message dict is built once and handed out by every window
# that includes it, so windows must be treated as read-only.
Turn = tuple[int, Message, int]


@dataclass
class Conversation:
    """The newest turns of one context of one conversation, oldest first."""

    context: int
    turns: deque[Turn]
    whole: bool  # holds every turn of the context, so a window that takes them all was not cut short
    chars: int = field(default=0)

    def __post_init__(self) -> None:
        self.chars = sum(len(turn[1]["content"]) for turn in self.turns)


class RecentTurns:
    """Conversations' newest turns, bounded by total characters so long replies cannot exhaust memory."""

    def __init__(self, max_turns: int, max_chars: int):
        self.max_turns = max_turns
        self.max_chars = max_chars
        self.chars = 0
        self._items: OrderedDict[Hashable, Conversation] = OrderedDict()

    def get(self, key: Hashable, context: int) -> Conversation | None:
        conversation = self._items.get(key)
        if conversation is None or conversation.context != context:
            return None
        self._items.move_to_end(key)
        return conversation

    def put(self, key: Hashable, context: int, turns: list[Turn]) -> Conversation:
        """Cache `turns` (oldest first), read from disk while no write could land in between."""
        self.forget(key)
        conversation = Conversation(context, deque(turns), whole=len(turns) < self.max_turns)
        self._items[key] = conversation
        self.chars += conversation.chars
        self._evict()
        return conversation

    def add(self, key: Hashable, context: int, turn: Turn) -> None:
        """A committed turn joins its conversation, if that conversation is cached."""
        conversation = self.get(key, context)
        if conversation is None or (conversation.turns and conversation.turns[-1][0] >= turn[0]):
            return
        conversation.turns.append(turn)
        conversation.chars += len(turn[1]["content"])
        self.chars += len(turn[1]["content"])
        if len(conversation.turns) > self.max_turns:
            dropped = conversation.turns.popleft()
            conversation.chars -= len(dropped[1]["content"])
            self.chars -= len(dropped[1]["content"])
            conversation.whole = False
        self._evict()

    def forget(self, key: Hashable) -> None:
        if (conversation := self._items.pop(key, None)) is not None:
            self.chars -= conversation.chars

    def _evict(self) -> None:
        while self.chars > self.max_chars and self._items:
            _, conversation = self._items.popitem(last=False)
            self.chars -= conversation.chars
