"""The personas one workspace sees: the shipped library (files in personas/) plus its own, made in chat.

A workspace's own persona shadows a shipped one of the same name there and nowhere else, so "editing" the
shipped `assistant` in one server gives that server its own copy. Workspace personas live in the history
database as YAML and are validated by the same `parse_persona` as files; nothing here ever writes a file.

Each workspace's parsed personas are cached. When other processes share the store (PostgreSQL), the cache is
checked on every use against the workspace's newest persona row (one index lookup; a message's turn reads it in
the statement that starts the turn), so a persona saved in another process is used from that workspace's next
message on.
"""
from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from enum import Enum

from bot.conversation import Workspace
from bot.history import HistoryStore
from bot.history_cache import MISSING, Recent
from bot.personas import Persona, PersonaError, PersonaLibrary, UnknownPersona, dump_persona, parse_persona

log = logging.getLogger(__name__)

CACHED_WORKSPACES = 10_000
NEWEST_ROW = "SELECT max(id) FROM personas WHERE platform = ? AND workspace = ?"


class Origin(str, Enum):
    SHIPPED = "shipped"  # a file in personas/: every workspace may use it, only owners change it
    OWN = "own"  # made in this workspace
    COPY = "own copy"  # made in this workspace under a shipped persona's name, which it shadows here


@dataclass(frozen=True)
class Entry:
    persona: Persona
    origin: Origin
    by_owner: bool  # saved by an owner: may use models outside PERSONABOT_ALLOWED_MODELS


class PersonaCatalog:
    def __init__(self, library: PersonaLibrary, history: HistoryStore):
        self.library = library
        self.history = history
        # Workspace -> its own personas, least recently used first out: a bot in thousands of servers keeps
        # only the active ones in memory.
        self._own = Recent(CACHED_WORKSPACES)
        self._lock = asyncio.Lock()

    async def entries(self, workspace: Workspace, *, version: object = MISSING) -> dict[str, Entry]:
        """Every persona the workspace may use, by name.

        `version`: the workspace's newest persona row as the caller already read it (a message's turn does);
        MISSING: read here when other processes share the store."""
        own = await self._own_personas(workspace, version)
        await self.library.refresh()  # parses changed files on a worker thread, never on the event loop
        found = {p.name: Entry(p, Origin.SHIPPED, True) for p in self.library.all()}
        for name, (persona, by_owner) in own.items():
            found[name] = Entry(persona, Origin.COPY if name in found else Origin.OWN, by_owner)
        return dict(sorted(found.items()))

    async def entry(self, workspace: Workspace, name: str, *, version: object = MISSING) -> Entry:
        entries = await self.entries(workspace, version=version)
        try:
            return entries[name]
        except KeyError:
            raise UnknownPersona(name, list(entries)) from None

    async def get(self, workspace: Workspace, name: str) -> Persona:
        return (await self.entry(workspace, name)).persona

    async def save(self, workspace: Workspace, persona: Persona, *, saved_by: str, by_owner: bool) -> None:
        text = dump_persona(persona)
        parse_persona(text, f"{workspace}:{persona.name}")  # never store what would then refuse to load
        await self.history.save_workspace_persona(workspace, persona.name, text, saved_by=saved_by, by_owner=by_owner)
        self._own.forget(workspace)

    async def delete(self, workspace: Workspace, name: str, *, saved_by: str) -> None:
        await self.history.save_workspace_persona(workspace, name, None, saved_by=saved_by, by_owner=False)
        self._own.forget(workspace)

    async def own(self, workspace: Workspace) -> list[Persona]:
        """The personas the workspace made itself (for export), by name."""
        return [persona for _, (persona, _) in sorted((await self._own_personas(workspace)).items())]

    async def _own_personas(self, workspace: Workspace, version: object = MISSING) -> dict[str, tuple[Persona, bool]]:
        newest = None if version is MISSING else version
        if version is MISSING and getattr(self.history, "shared", False):
            newest = (await self.history.fetch(NEWEST_ROW, tuple(workspace)))[0][0]
        cached = self._own.get(workspace)
        if cached is not MISSING and cached[0] == newest:
            return cached[1]
        async with self._lock:
            if (cached := self._own.get(workspace)) is not MISSING and cached[0] == newest:
                return cached[1]
            own: dict[str, tuple[Persona, bool]] = {}
            for name, (text, by_owner) in (await self.history.workspace_personas(workspace)).items():
                try:
                    own[name] = (parse_persona(text, f"{workspace}:{name}"), by_owner)
                except PersonaError as exc:  # stored by an older version with looser rules: skip, say why
                    log.error("workspace persona %s:%s no longer validates:\n%s", workspace, name, exc)
            # Rows saved after `newest` only make the next check read again.
            self._own.put(workspace, (newest, own))
            return own
