"""What an adapter hands the engine: one platform message, already translated."""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple


class ConvKey(NamedTuple):
    """Where a conversation lives; history, ordering and the active persona hang off this.

    A tuple rather than a dataclass: every message looks it up in several dicts, and tuples hash in C.
    """

    platform: str
    workspace: str
    channel: str
    thread: str = ""

    @property
    def channel_key(self) -> "ConvKey":
        return ConvKey(self.platform, self.workspace, self.channel, "")


@dataclass(frozen=True)
class Incoming:
    key: ConvKey
    user_id: str
    text: str
    user_name: str = ""
    is_admin: bool = False
    is_private: bool = False  # a DM or the terminal: the asker owns the whole conversation
