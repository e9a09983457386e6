"""The conversation engine: the one path every message takes, whatever platform it came from.

Adapters translate platform events into `Incoming` and render the text this yields; everything that decides
what the bot says (persona, history window, knowledge, model, budgets, notices) happens here, so the
terminal, Discord and Slack answer the same history the same way.
"""
from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import time
import uuid
from datetime import datetime, timedelta, timezone
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import TYPE_CHECKING

from bot import metrics
from bot.attachments import read_turn, sees_images
from bot.config import Settings
from bot.conversation import ConvKey, Incoming, Role, Workspace
from bot.history import HistoryStore, open_history
from bot.history_cache import MISSING, Recent
from bot.models.base import ChatModel, ContextLengthError, GenParams, Message, ModelError
from bot.models.registry import ModelRegistry
from bot.persona_catalog import Entry, Origin, PersonaCatalog
from bot.render import BUDGET_NOTICE, CONTENT_FILTER_NOTICE, CUT_OFF_NOTICE, ERROR_NOTICE, UNFINISHED_NOTICE
from bot.personas import ModelSpec, Persona, PersonaLibrary, UnknownPersona
from bot.turns import Turn

if TYPE_CHECKING:
    from bot.retrieval import Hit, Retriever

log = logging.getLogger(__name__)

SHORT_QUERY_WORDS = 6
ONE_OFF_THREAD = "one-off:"  # the thread of a stored `/ask` exchange, never read back as context
GLOBAL_PREFIX = "global:"  # names a global collection from chat (owners only)
OUTCOMES = {"length": "cut_off", "content_filter": "content_filter", "error": "error"}
# Token counts of persona prompts, per (model, prompt): bounded, since every persona edit is a new prompt.
PREFIX_TOKENS_CACHED = 256


class NotAdmin(PermissionError):
    """Raised with a message fit to show the user; nothing was changed."""


class KnowledgeDisabled(RuntimeError):
    pass


class Engine:
    def __init__(
        self,
        settings: Settings,
        personas: PersonaLibrary,
        history: HistoryStore,
        models: ModelRegistry,
        retriever: "Retriever | None" = None,
    ):
        self.settings = settings
        self.history = history
        self.models = models
        self.retriever = retriever
        self.personas = PersonaCatalog(personas, history)
        self._prefix_tokens = Recent(PREFIX_TOKENS_CACHED)
        # Tokens promised to this process's replies still being written, by channel: a budget counts them as
        # spent, or every thread of a channel asking at once would pass the same reading of today's spend.
        self._promised: collections.Counter[tuple] = collections.Counter()

    @classmethod
    async def create(cls, settings: Settings, *, knowledge: bool = True) -> "Engine":
        history = await open_history(settings)
        retriever = None
        if knowledge:
            from bot.retrieval import Retriever

            retriever = await Retriever.open(settings)
        return cls(settings, PersonaLibrary(settings.personas_dir), history, ModelRegistry(settings), retriever)

    async def close(self) -> None:
        if self.retriever is not None:
            await self.retriever.close()
        await self.models.close()
        await self.history.close()

    # -- the reply path ------------------------------------------------------------------------------

    async def reply(self, incoming: Incoming, *, use_history: bool = True) -> AsyncIterator[str]:
        """Stream the active persona's answer to `incoming`, after every earlier message in its conversation.

        `use_history=False` is a one-off (`/ask`): it neither reads the conversation nor joins it; its turns
        are stored as a conversation of their own, so usage, budgets and export still count them.
        """
        platform = incoming.key.platform
        began, answered = time.perf_counter(), False
        # A reader that stops early closes each generator in turn, so the reply's own `finally` (which stores
        # what was shown) runs now, inside the conversation's turn, not whenever the garbage collector gets to it.
        # The store holds the conversation's turn: across processes too, when they share PostgreSQL.
        # What the reply reads (persona, spend, window) comes with the turn: on PostgreSQL in the same round trip.
        async with self.history.turn(incoming.key, spend=bool(self.settings.daily_token_budget)) as turn, \
                aclosing(self._reply(incoming, turn, use_history)) as pieces:
            async for piece in pieces:
                if not answered:
                    answered = True
                    metrics.FIRST_TEXT.labels(platform).observe(time.perf_counter() - began)
                yield piece
        metrics.REPLY.labels(platform).observe(time.perf_counter() - began)

    async def _reply(self, incoming: Incoming, turn: Turn, use_history: bool) -> AsyncIterator[str]:
        key = incoming.key
        entry = await self.active_entry(key, turn)
        spec, params = self._bounded(entry)
        budget, channel = self.settings.daily_token_budget, key.channel_key
        if budget and (turn.spent_today or 0) + self._promised[channel] >= budget:
            metrics.REPLIES.labels(key.platform, "over_budget").inc()
            yield BUDGET_NOTICE.format(budget=budget)
            return
        promise = params.max_tokens if budget else 0  # until its real spend is stored, with the reply
        if promise:
            self._promised[channel] += promise
        try:
            async with self.models.use(spec) as model, \
                    aclosing(self._answer(incoming, turn, entry.persona, model, params, use_history,
                                         sees_images(spec, self.settings))) as pieces:
                async for piece in pieces:
                    yield piece
        finally:
            if promise:
                self._promised[channel] -= promise
                if self._promised[channel] <= 0:
                    del self._promised[channel]

    async def _answer(self, incoming: Incoming, turn: Turn, persona: Persona, model: ChatModel, params: GenParams,
                      use_history: bool, vision: bool = False) -> AsyncIterator[str]:
        key = incoming.key
        # Images and files in (bot/attachments.py): images as content parts only for a model that sees them,
        # text files inlined; history keeps `said.text`, which holds a reference per image, never its bytes.
        said = await read_turn(incoming, self.settings, vision=vision)
        if not said.answerable:  # nothing but files nobody can read: say why, and ask the model nothing
            yield said.notice.rstrip("\n")
            return
        user: Message = {"role": "user", "content": said.content}
        user_tokens = model.count_tokens([user])
        budget_tokens = self._history_budget(model, persona, params, user_tokens)
        history = await turn.window(budget_tokens) if use_history else []

        prefix = persona.prefix()
        grounding = None
        if persona.knowledge and self.retriever is not None:
            grounding = await self.retriever.ground(
                _retrieval_query(incoming.text, history), persona.knowledge, workspace=key.tenant)
            if grounding is not None:
                block = f"\n\n{grounding.system_block}"
                prefix[0] = {"role": "system", "content": prefix[0]["content"] + block}
                if use_history:
                    # The passages share the window with the history, which gives up the room they take, counted
                    # in this model's tokens (the retriever budgets in the embedding model's).
                    block_tokens = model.count_tokens([{"role": "system", "content": block}])
                    history = await turn.window(budget_tokens - block_tokens)

        # The user's turn is queued before the model is called and committed while it thinks (the writer
        # group-commits every channel's turns together), and the first visible text waits for that commit:
        # nothing the bot has begun to answer can be lost to a crash, and a failure never loses what they said.
        stored_as = key if use_history else key._replace(thread=f"{ONE_OFF_THREAD}{uuid.uuid4().hex}")
        saved = asyncio.ensure_future(self.history.append(
            stored_as, "user", said.text, author=incoming.user_id, persona=persona.name,
            # priced as later turns re-send it: the text and references, not the images
            tokens=model.count_tokens([{"role": "user", "content": said.text}]) if said.images else user_tokens))
        text: list[str] = []
        finish, usage, failure = None, None, None
        try:
            if said.notices:
                await asyncio.shield(saved)
                yield said.notice + "\n"
            messages = prefix + history + [user]
            for attempt in (1, 2):
                try:
                    async for chunk in model.stream(messages, params):
                        if chunk.text:
                            if not text:
                                await asyncio.shield(saved)  # a reply cancelled here still stores the turn
                            text.append(chunk.text)
                            yield chunk.text
                        if chunk.finish_reason:
                            finish, usage = chunk.finish_reason, chunk.usage
                    break
                except ContextLengthError as exc:
                    if attempt == 2 or text:
                        finish, failure = "error", exc
                        break
                    # Our token count disagreed with the server's: keep only the newest half of the history.
                    log.warning("context length exceeded; retrying with half the history", extra={"key": str(key)})
                    messages = prefix + _newest_half(history) + [user]
                except ModelError as exc:
                    log.warning("model failed: %s", exc)
                    finish, failure = "error", exc
                    break
        finally:
            await saved
            reply = "".join(text)
            if reply:
                # Stored as far as the reader saw it even when it broke off (the model failed, or the reply was
                # cancelled); such a reply is marked `error`, never passed off as a whole `stop` answer.
                await self.history.append(
                    stored_as, "assistant", reply, author="bot", persona=persona.name,
                    tokens=model.count_tokens([{"role": "assistant", "content": reply}]),
                    finish_reason=finish or "error",
                    prompt_tokens=usage.prompt_tokens if usage else 0,
                    completion_tokens=usage.completion_tokens if usage else 0,
                    ending=turn,  # the reply's last write ends the conversation's turn (PostgreSQL: same statement)
                )

        metrics.REPLIES.labels(key.platform, OUTCOMES.get(finish, "ok")).inc()
        if usage:
            metrics.TOKENS.labels(key.platform, "prompt").inc(usage.prompt_tokens)
            metrics.TOKENS.labels(key.platform, "completion").inc(usage.completion_tokens)
        if failure is not None:
            yield (UNFINISHED_NOTICE if reply else ERROR_NOTICE).format(error=failure)
            return
        if finish == "content_filter" and not reply:
            yield CONTENT_FILTER_NOTICE
        if finish == "length":
            yield CUT_OFF_NOTICE
        footer = grounding.footer(reply) if grounding is not None and reply else ""
        if footer:  # only passages the model was shown, and of those the ones the reply cites
            yield f"\n\n{footer}"

    def _history_budget(self, model: ChatModel, persona: Persona, params: GenParams, user_tokens: int) -> int:
        cache_key = (model.name, persona.system + repr(persona.examples))
        prefix_tokens = self._prefix_tokens.get(cache_key)
        if prefix_tokens is MISSING:
            prefix_tokens = model.count_tokens(persona.prefix())
            self._prefix_tokens.put(cache_key, prefix_tokens)
        # Million-token windows exist; resending that much history on every message would cost a fortune.
        window = min(model.context_window, self.settings.max_context_tokens)
        return window - params.max_tokens - prefix_tokens - user_tokens

    # -- bounds the operator sets ---------------------------------------------------------------------

    def _bounded(self, entry: Entry) -> tuple[ModelSpec, GenParams]:
        """The persona's model and settings within the operator's bounds, whoever wrote the persona.

        A workspace persona saved by a workspace admin keeps to the allow-list even if the list shrank after
        it was saved: it then answers on the default model rather than on one nobody allows any more.
        """
        spec = entry.persona.model
        if not entry.by_owner and self._unlisted(spec):
            log.warning("persona %s names a model outside PERSONABOT_ALLOWED_MODELS; using the default",
                        entry.persona.name)
            spec = spec.model_copy(update={"name": None, "path": None, "vision": None})
        params = entry.persona.gen_params(GenParams())
        return spec, dataclasses.replace(params, max_tokens=min(params.max_tokens, self.settings.max_reply_tokens))

    def model_refusals(self, spec: ModelSpec, *, owner: bool) -> list[str]:
        """Why a persona's model settings are out of bounds, in the words the form shows; empty when they fit."""
        problems = []
        cap = self.settings.max_reply_tokens
        if spec.max_tokens is not None and spec.max_tokens > cap:
            problems.append(f"model.max_tokens: {spec.max_tokens} is above this bot's cap of {cap} "
                            "(PERSONABOT_MAX_REPLY_TOKENS)")
        if not owner:
            allowed = ", ".join(sorted(self.settings.model_allow_list))
            problems += [f"model.{field}: {value!r} is not a model this bot allows; choose one of: {allowed} "
                         "(the operator sets PERSONABOT_ALLOWED_MODELS)" for field, value in self._unlisted(spec)]
        return problems

    def _unlisted(self, spec: ModelSpec) -> list[tuple[str, str]]:
        allowed = self.settings.model_allow_list
        return [(field, value) for field in ("name", "path")
                if (value := getattr(spec, field)) is not None and value not in allowed]

    # -- who may do what ------------------------------------------------------------------------------

    def role(self, platform: str, user_id: str, *, workspace_admin: bool) -> Role:
        """Owners are the ids in PERSONABOT_ADMINS, bare or prefixed with the platform (`discord:123`)."""
        if user_id in self.settings.admins or f"{platform}:{user_id}" in self.settings.admins:
            return Role.OWNER
        return Role.ADMIN if workspace_admin else Role.MEMBER

    def require_admin(self, incoming: Incoming, action: str) -> None:
        if not incoming.is_admin:
            raise NotAdmin(
                f"Only this workspace's admins can {action}: people with Manage Server (Discord) or workspace "
                "admins and owners (Slack), plus the bot's owners (PERSONABOT_ADMINS). Nothing was changed."
            )

    def require_owner(self, incoming: Incoming, action: str) -> None:
        if not incoming.is_owner:
            raise NotAdmin(f"Only the bot's owners (PERSONABOT_ADMINS) can {action}. Nothing was changed.")

    async def _audit(self, incoming: Incoming, action: str, detail: str = "") -> None:
        await self.history.audit(incoming.key, incoming.user_id, action, detail)

    # -- channel state -------------------------------------------------------------------------------

    async def personas_in(self, workspace: Workspace) -> dict[str, Entry]:
        """Every persona the workspace may use, by name: the shipped ones and its own."""
        return await self.personas.entries(workspace)

    async def persona_in(self, workspace: Workspace, name: str) -> Entry:
        return await self.personas.entry(workspace, name)

    async def active_entry(self, key: ConvKey, turn: Turn | None = None) -> Entry:
        """The channel's persona; inside a message's turn, from what the turn read as it began."""
        name = turn.persona if turn is not None else await self.history.get_persona(key.channel_key)
        name = name or self.settings.default_persona
        version = turn.personas_version if turn is not None else MISSING
        try:
            return await self.personas.entry(key.tenant, name, version=version)
        except UnknownPersona:
            log.warning("persona %r is gone from %s; using the default", name, key.tenant)
            return await self.personas.entry(key.tenant, self.settings.default_persona, version=version)

    async def active_persona(self, key: ConvKey) -> Persona:
        return (await self.active_entry(key)).persona

    async def channel_enabled(self, key: ConvKey) -> bool:
        return await self.history.get_setting(key.channel_key, "enabled") == "1"

    async def set_persona(self, incoming: Incoming, name: str) -> Persona:
        if not incoming.is_private:  # a DM is its asker's own: choosing its voice touches nobody else
            self.require_admin(incoming, "switch personas")
        persona = await self.personas.get(incoming.workspace, name)
        await self.history.set_persona(incoming.key.channel_key, persona.name)
        # A new voice gets a clean slate everywhere it now speaks: the channel and the threads that inherit it.
        await self.history.reset_channel(incoming.key)
        await self._audit(incoming, "set_persona", persona.name)
        return persona

    async def reset(self, incoming: Incoming) -> None:
        """In a thread, that thread starts afresh; anywhere else the channel and every thread in it do."""
        if not incoming.is_private:
            self.require_admin(incoming, "reset a shared channel's context")
        if incoming.key.thread:
            await self.history.reset(incoming.key)
        else:
            await self.history.reset_channel(incoming.key)
        await self._audit(incoming, "reset")

    async def set_channel_enabled(self, incoming: Incoming, enabled: bool) -> None:
        self.require_admin(incoming, "enable or disable the bot in a channel")
        await self.history.set_setting(incoming.key.channel_key, "enabled", "1" if enabled else None)
        await self._audit(incoming, "enable_channel" if enabled else "disable_channel")

    async def usage(self, incoming: Incoming, days: int = 14) -> list[dict]:
        self.require_admin(incoming, "see this workspace's usage")
        since = datetime.now(timezone.utc).date() - timedelta(days=days - 1)
        return await self.history.usage(since, incoming.workspace)

    # -- workspace personas --------------------------------------------------------------------------

    async def save_persona(self, incoming: Incoming, persona: Persona, *, creating: bool) -> Origin:
        """Saves a persona made or edited in chat as this workspace's own; returns what it was before."""
        self.require_admin(incoming, "create or edit personas")
        entries = await self.personas.entries(incoming.workspace)
        before = entries.get(persona.name)
        if creating and before is not None:
            hint = ("it ships with the bot; editing it makes this workspace's own copy"
                    if before.origin is Origin.SHIPPED else "someone saved it meanwhile")
            raise PersonaRefused([f"`{persona.name}` already exists ({hint}). Use `/persona edit {persona.name}`."])
        if problems := self.model_refusals(persona.model, owner=incoming.is_owner):
            raise PersonaRefused(problems)
        await self.personas.save(incoming.workspace, persona, saved_by=incoming.user_id, by_owner=incoming.is_owner)
        await self._audit(incoming, "edit_persona" if before else "create_persona", persona.name)
        return before.origin if before else Origin.OWN

    async def delete_persona(self, incoming: Incoming, name: str) -> Origin:
        """Deletes this workspace's own persona (or its copy of a shipped one, which then serves again)."""
        self.require_admin(incoming, "delete personas")
        entry = await self.personas.entry(incoming.workspace, name)
        if entry.origin is Origin.SHIPPED:
            raise NotAdmin(f"`{name}` ships with the bot, so it cannot be deleted from chat; the bot's owners "
                           "change shipped personas in its personas/ folder. Nothing was changed.")
        await self.personas.delete(incoming.workspace, name, saved_by=incoming.user_id)
        await self._audit(incoming, "delete_persona", name)
        return entry.origin

    # -- knowledge -----------------------------------------------------------------------------------

    def require_knowledge(self) -> "Retriever":
        if self.retriever is None:
            raise KnowledgeDisabled("Knowledge is not enabled on this bot.")
        return self.retriever

    def _knowledge_scope(self, incoming: Incoming, name: str, action: str) -> tuple[str, Workspace | None]:
        """`global:NAME` is the owners' way to reach a global collection from chat; anything else is the
        workspace's own."""
        if name.startswith(GLOBAL_PREFIX):
            self.require_owner(incoming, f"{action} global knowledge")
            return name.removeprefix(GLOBAL_PREFIX), None
        return name, incoming.workspace

    def check_upload(self, incoming: Incoming, filename: str, size: int) -> None:
        """The refusals `add_knowledge` would give that need only the name and size, so an adapter can refuse
        a file before downloading it (attachments can be hundreds of MB)."""
        self.require_admin(incoming, "add knowledge")
        self.require_knowledge().check_upload_size(filename, size)

    async def add_knowledge(self, incoming: Incoming, filename: str, data: bytes, collection: str | None = None) -> str:
        self.require_admin(incoming, "add knowledge")
        retriever = self.require_knowledge()
        if collection is None:
            persona = await self.active_persona(incoming.key)
            collection = persona.knowledge[0] if persona.knowledge else "general"
        name, workspace = self._knowledge_scope(incoming, collection, "add")
        report = await retriever.add_upload(filename, data, name, workspace=workspace)
        await self._audit(incoming, "add_knowledge", f"{collection}/{filename}")
        return report

    async def remove_knowledge(self, incoming: Incoming, source: str) -> bool:
        self.require_admin(incoming, "remove knowledge")
        name, workspace = self._knowledge_scope(incoming, source, "remove")
        removed = await self.require_knowledge().remove(name, workspace=workspace)
        if removed:
            await self._audit(incoming, "remove_knowledge", source)
        return removed

    async def search_knowledge(self, incoming: Incoming, query: str, k: int = 5) -> list["Hit"]:
        retriever = self.require_knowledge()
        persona = await self.active_persona(incoming.key)
        return await retriever.search(query, persona.knowledge or None, k, workspace=incoming.workspace)

    @property
    def knowledge_enabled(self) -> bool:
        return self.retriever is not None

    def removable_documents(self, incoming: Incoming) -> list[str]:
        """The documents `/knowledge remove` may name here: the workspace's own, and for owners the global ones."""
        rows = self.require_knowledge().files(workspace=incoming.workspace)
        return [row.source if row.own else f"{GLOBAL_PREFIX}{row.source}" for row in rows
                if row.own or incoming.is_owner]

    async def knowledge_collections(self, incoming: Incoming) -> tuple[list[str], Persona]:
        """The collections this workspace sees (global and its own), and the active persona, which cites some."""
        retriever = self.require_knowledge()
        return retriever.collections(incoming.workspace), await self.active_persona(incoming.key)


class PersonaRefused(ValueError):
    """A persona that may not be saved here; `.errors` are the reasons, in the form's words."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


def _newest_half(history: list[Message]) -> list[Message]:
    half = history[len(history) // 2 :]
    return half[1:] if half and half[0]["role"] == "assistant" else half


def _retrieval_query(text: str, history: list[Message]) -> str:
    """A follow-up like "and in 2019?" means nothing alone, so short turns borrow the previous user turn."""
    if len(text.split()) >= SHORT_QUERY_WORDS:
        return text
    previous = next((m["content"] for m in reversed(history) if m["role"] == "user"), "")
    return f"{previous}\n{text}".strip()
