"""What an adapter hands the engine: one platform message, already translated, and who sent it."""
from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import NamedTuple

PLATFORMS = ("discord", "slack", "terminal")
_WORKSPACE_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")  # guild ids, Slack team ids, terminal names; never a path


class Workspace(NamedTuple):
    """A tenant: one Discord server, one Slack workspace, or one terminal workspace (`--workspace`).

    Everything that is not a shipped file (channel state, chat-made personas, uploaded knowledge, budgets,
    usage, audit rows) belongs to exactly one of these. Written `platform:id`, as the CLI takes it.
    """

    platform: str
    id: str

    def __str__(self) -> str:
        return f"{self.platform}:{self.id}"

    @classmethod
    def parse(cls, text: str) -> "Workspace":
        platform, sep, ident = text.partition(":")
        if not sep or platform not in PLATFORMS or not _WORKSPACE_ID.fullmatch(ident) or set(ident) == {"."}:
            raise ValueError(f"{text!r} is not a workspace: write discord:GUILD_ID, slack:TEAM_ID or terminal:NAME")
        return cls(platform, ident)


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

    @property
    def tenant(self) -> Workspace:
        return Workspace(self.platform, self.workspace)


class Role(IntEnum):
    """What the sender may do. Ordered, so `role >= Role.ADMIN` reads as "at least a workspace admin"."""

    MEMBER = 0
    ADMIN = 1  # Manage Server in this guild, admin or owner of this Slack workspace: powers here only
    OWNER = 2  # listed in PERSONABOT_ADMINS, or the person at the terminal: powers everywhere


@dataclass(frozen=True)
class Attachment:
    """A file that came with a command or a message; `read(limit)` downloads it, so a refusal on name or size
    costs nothing. `size` and `content_type` are what the platform declared (0 and "" when it said nothing):
    hints for which files to fetch, never trusted over the bytes. `read(limit)` stops one byte past `limit`
    where it can (`attachments.read_capped`), so a file larger than declared, or declared as nothing, holds
    at most the limit in memory; a caller treats more than `limit` bytes as too big."""

    name: str
    size: int
    read: Callable[[int], Awaitable[bytes]]
    content_type: str = ""


@dataclass(frozen=True)
class Incoming:
    key: ConvKey
    user_id: str
    text: str
    user_name: str = ""
    role: Role = Role.MEMBER
    is_private: bool = False  # a DM or the terminal: the asker owns the whole conversation
    attachments: tuple[Attachment, ...] = ()  # images and files sent with the message (bot/attachments.py)

    @property
    def workspace(self) -> Workspace:
        return self.key.tenant

    @property
    def is_admin(self) -> bool:
        return self.role >= Role.ADMIN

    @property
    def is_owner(self) -> bool:
        return self.role >= Role.OWNER
