"""Slash commands: /persona, /reset, /ask, /knowledge, /channel.

Discord only honours `default_permissions` on top-level commands, so it hides /channel from members without
Manage Server, while /persona and /knowledge mix public and admin subcommands. Either way every admin action
is checked again here and in the engine (server admins can re-grant any command to anyone in Integrations
settings); a refusal is ephemeral, says why, and changes nothing. The engine writes the audit rows.
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import discord
import yaml
from discord import app_commands

from bot.conversation import Incoming
from bot.engine import Engine, KnowledgeDisabled, NotAdmin
from bot.personas import NAME_PATTERN, Persona, PersonaError, UnknownPersona, parse_persona
from bot.platforms.discord_reply import ReplyStream, conv_key, make_incoming, safe_mentions
from bot.platforms.discord_split import DISCORD_LIMIT, split_message

if TYPE_CHECKING:
    from bot.platforms.discord_bot import PersonaBot

log = logging.getLogger(__name__)

MODAL_TEXT_LIMIT = 4000  # Discord's cap on a text input
THREAD_NAME_LIMIT = 100  # Discord's cap on a channel or thread name
KNOWLEDGE_OFF = (
    "Knowledge is not enabled on this bot, so there are no documents to add or search. "
    "The operator can turn it on by installing the knowledge extras and restarting."
)


def add_commands(bot: "PersonaBot") -> None:
    engine = bot.engine
    tree = bot.tree
    tree.add_command(PersonaCommands(engine))
    tree.add_command(KnowledgeCommands(engine))
    tree.add_command(ChannelCommands(engine))

    @tree.command(name="reset", description="Start a fresh conversation in this channel (the log is kept).")
    async def reset(interaction: discord.Interaction) -> None:
        async with refusals(interaction):
            await engine.reset(incoming_for(engine, interaction))
            await say(interaction, "Context cleared: I start fresh from here.", ephemeral=False)

    @tree.command(name="ask", description="A one-off question, answered without this channel's history.")
    @app_commands.describe(question="What to ask")
    async def ask(interaction: discord.Interaction, question: str) -> None:
        await interaction.response.defer(thinking=True)
        mentions = safe_mentions()

        async def first(content: str) -> discord.InteractionMessage:
            return await interaction.edit_original_response(content=content, allowed_mentions=mentions)

        async def more(content: str) -> discord.WebhookMessage:
            return await interaction.followup.send(content, wait=True, allowed_mentions=mentions)

        stream = ReplyStream(first, more, mentions=mentions, interval=bot.edit_interval)
        await stream.run(engine.reply(incoming_for(engine, interaction, question), use_history=False))

    @tree.command(name="thread", description="Start a thread where I answer every message, with its own history.")
    @app_commands.describe(topic="What the thread is about (its name)")
    async def thread(interaction: discord.Interaction, topic: str | None = None) -> None:
        where = interaction.channel
        if not isinstance(where, discord.TextChannel):
            await say(interaction, "I can start threads only in a server's text channels.")
            return
        persona = await engine.active_persona(conv_key(where))
        try:
            started = await where.create_thread(
                name=_clip(topic or f"Chat with {persona.display_name}", THREAD_NAME_LIMIT),
                type=discord.ChannelType.public_thread, reason=f"/thread by {interaction.user}",
            )
        except discord.Forbidden:
            await say(interaction, "I'm not allowed to create threads here (the Create Public Threads permission).")
            return
        await started.send(f"{persona.display_name} here. Ask away: in this thread I answer every message, "
                           "no mention needed, and remember only what is said here.", allowed_mentions=safe_mentions())
        await say(interaction, f"Started {started.mention}.", ephemeral=False)

    @tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("slash command failed", exc_info=error)
        try:
            await say(interaction, f"Sorry, that command failed ({type(getattr(error, 'original', error)).__name__}).")
        except discord.HTTPException:
            pass  # the interaction expired; the log has it


# -- helpers ---------------------------------------------------------------------------------------


def incoming_for(engine: Engine, interaction: discord.Interaction, text: str = "") -> Incoming:
    return make_incoming(engine.is_admin, interaction.user, interaction.channel, text)


async def say(interaction: discord.Interaction, content: str, *, ephemeral: bool = True) -> None:
    """Answers the interaction, or follows up if it was already answered; long text goes out in parts."""
    for part in split_message(content, DISCORD_LIMIT):
        if interaction.response.is_done():
            await interaction.followup.send(part, ephemeral=ephemeral, allowed_mentions=safe_mentions())
        else:
            await interaction.response.send_message(part, ephemeral=ephemeral, allowed_mentions=safe_mentions())


@asynccontextmanager
async def refusals(interaction: discord.Interaction) -> AsyncIterator[None]:
    """Turns the engine's "no" into an ephemeral answer that says why."""
    try:
        yield
    except NotAdmin as exc:
        await say(interaction, str(exc))
    except UnknownPersona as exc:
        await say(interaction, f"There is {exc}.")
    except KnowledgeDisabled:
        await say(interaction, KNOWLEDGE_OFF)


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# -- /persona --------------------------------------------------------------------------------------


class PersonaCommands(app_commands.Group, name="persona", description="The bot's voice in this channel"):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    async def persona_names(self, interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        current = current.lower()
        return [
            app_commands.Choice(name=f"{p.display_name} ({p.name})"[:100], value=p.name)
            for p in self.engine.personas.all()
            if current in p.name or current in p.display_name.lower()
        ][:25]

    @app_commands.command(name="list", description="Personas this bot can speak as")
    async def list_(self, interaction: discord.Interaction) -> None:
        active = await self.engine.active_persona(incoming_for(self.engine, interaction).key)
        lines = [
            f"{'▶' if p.name == active.name else '•'} **{p.display_name}** (`{p.name}`)"
            + (f": {p.description}" if p.description else "")
            for p in self.engine.personas.all()
        ]
        await say(interaction, "\n".join(lines) + "\n\n▶ = active here. Admins switch with `/persona set`.")

    @app_commands.command(name="show", description="A persona's prompt and settings (default: the active one)")
    @app_commands.describe(name="Persona name")
    async def show(self, interaction: discord.Interaction, name: str | None = None) -> None:
        async with refusals(interaction):
            key = incoming_for(self.engine, interaction).key
            persona = self.engine.personas.get(name) if name else await self.engine.active_persona(key)
            model = persona.model.model_dump(exclude_none=True)
            header = "\n".join(
                line
                for line in (
                    f"**{persona.display_name}** (`{persona.name}`)",
                    persona.description,
                    f"Model: `{model}`" if model else "",
                    f"Knowledge: {', '.join(persona.knowledge)}" if persona.knowledge else "",
                    f"Few-shot examples: {len(persona.examples)}" if persona.examples else "",
                )
                if line
            )
            prompt = persona.system.replace("```", "`\u200b``")
            room = DISCORD_LIMIT - len(header) - len("\n```\n\n```")
            await say(interaction, f"{header}\n```\n{_clip(prompt, room)}\n```")

    @app_commands.command(name="set", description="Switch this channel's persona (admins; clears the context)")
    @app_commands.describe(name="Persona name")
    async def set_(self, interaction: discord.Interaction, name: str) -> None:
        async with refusals(interaction):
            incoming = incoming_for(self.engine, interaction)
            if incoming.is_private:
                # A DM is the asker's own conversation: choosing its voice touches nobody else.
                incoming = dataclasses.replace(incoming, is_admin=True)
            persona = await self.engine.set_persona(incoming, name)
            await say(
                interaction,
                f"Now speaking as **{persona.display_name}** here. Fresh context from this message on.",
                ephemeral=False,
            )

    @app_commands.command(name="create", description="Write a new persona in a form (admins)")
    @app_commands.describe(name="Lowercase letters, digits and '-'; also the file name")
    async def create(self, interaction: discord.Interaction, name: str) -> None:
        async with refusals(interaction):
            # Checked before the form opens, so nobody types a whole prompt only to be refused.
            self.engine.require_admin(incoming_for(self.engine, interaction), "create personas")
            if not NAME_PATTERN.fullmatch(name):
                await say(interaction, "Persona names are lowercase letters, digits and '-' (it is the file name too).")
                return
            if name in self.engine.personas.names():
                await say(interaction, f"`{name}` already exists; use `/persona edit {name}`.")
                return
            await interaction.response.send_modal(PersonaForm(self.engine, name, None))

    @app_commands.command(name="edit", description="Edit a persona's prompt in a form (admins)")
    @app_commands.describe(name="Persona name")
    async def edit(self, interaction: discord.Interaction, name: str) -> None:
        async with refusals(interaction):
            self.engine.require_admin(incoming_for(self.engine, interaction), "edit personas")
            persona = self.engine.personas.get(name)
            form = PersonaForm(self.engine, name, persona)
            # Discord refuses a whole form whose prefilled field is longer than that field may be.
            if any(len(item.default or "") > item.max_length for item in form.inputs):
                await say(interaction, f"`{name}` is longer than a Discord form holds; edit its YAML file instead.")
                return
            await interaction.response.send_modal(form)

    show.autocomplete("name")(persona_names)
    set_.autocomplete("name")(persona_names)
    edit.autocomplete("name")(persona_names)


class PersonaForm(discord.ui.Modal):
    """The persona file's fields as a form; what it builds is validated by `parse_persona`, like any file."""

    def __init__(self, engine: Engine, name: str, persona: Persona | None):
        super().__init__(title=_clip(f"{'Edit' if persona else 'New'} persona: {name}", 45), timeout=30 * 60)
        self.engine = engine
        self.name = name
        self.creating = persona is None
        extra = ""
        if persona is not None:
            rest = {
                key: value
                for key, value in (
                    ("examples", [dict(turn) for turn in persona.examples]),
                    ("model", persona.model.model_dump(exclude_none=True)),
                    ("knowledge", list(persona.knowledge)),
                )
                if value
            }
            extra = yaml.safe_dump(rest, sort_keys=False, allow_unicode=True) if rest else ""
        self.display_name = discord.ui.TextInput(
            label="Display name", required=False, max_length=100, default=persona.display_name if persona else None
        )
        self.description = discord.ui.TextInput(
            label="Description", required=False, max_length=300, default=persona.description if persona else None
        )
        self.system = discord.ui.TextInput(
            label="System prompt", style=discord.TextStyle.paragraph, max_length=MODAL_TEXT_LIMIT,
            default=persona.system if persona else None,
            placeholder="You are … Speak in … Never …",
        )
        self.extra = discord.ui.TextInput(
            label="Examples, model, knowledge (YAML, optional)", style=discord.TextStyle.paragraph, required=False,
            max_length=MODAL_TEXT_LIMIT, default=extra or None,
            placeholder="model: {temperature: 0.9}\nknowledge: [handbook]",
        )
        self.inputs = [self.display_name, self.description, self.system, self.extra]
        for item in self.inputs:
            self.add_item(item)

    def persona_yaml(self) -> str:
        """The form as a persona file; the free YAML goes first so its line numbers match what was typed."""
        fields = {"name": self.name, "display_name": self.display_name.value, "description": self.description.value,
                  "system": self.system.value}
        fields = {key: value for key, value in fields.items() if value.strip()}
        extra = self.extra.value.rstrip()
        return (extra + "\n" if extra else "") + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)

    async def on_submit(self, interaction: discord.Interaction) -> None:
        async with refusals(interaction):
            try:
                persona = parse_persona(self.persona_yaml(), "form")
            except PersonaError as exc:
                problems = "\n".join(f"- {error}" for error in exc.errors)
                await say(interaction, f"Not saved; fix these and try again:\n{problems}")
                return
            if self.creating and self.name in self.engine.personas.names():
                # Another admin saved this name while the form was open; theirs is not silently replaced.
                await say(
                    interaction, f"Not saved: `{self.name}` was created meanwhile. Use `/persona edit {self.name}`."
                )
                return
            path = await self.engine.save_persona(incoming_for(self.engine, interaction), persona)
            await say(
                interaction,
                f"Saved **{persona.display_name}** to `{path.name}`. Use it with `/persona set {persona.name}`.",
            )

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        # Without this a failed save (disk full, read-only folder) shows only Discord's generic failure.
        log.error("persona form failed", exc_info=error)
        try:
            await say(interaction, f"Not saved: {type(error).__name__}: {error}")
        except discord.HTTPException:
            pass  # the interaction expired; the log has it


# -- /knowledge ------------------------------------------------------------------------------------


class KnowledgeCommands(app_commands.Group, name="knowledge", description="Documents the personas answer from"):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    @app_commands.command(name="add", description="Add a document (admins): PDF, Markdown, text, HTML")
    @app_commands.describe(file="The document", collection="Collection to add it to (default: the persona's)")
    async def add(
        self, interaction: discord.Interaction, file: discord.Attachment, collection: str | None = None
    ) -> None:
        async with refusals(interaction):
            incoming = incoming_for(self.engine, interaction)
            try:
                self.engine.check_upload(incoming, file.filename, file.size)
            except ValueError as exc:  # UploadRefused: too large
                await say(interaction, f"Not added: {exc}")
                return
            await interaction.response.defer(ephemeral=True, thinking=True)
            data = await file.read()
            try:
                report = await self.engine.add_knowledge(incoming, file.filename, data, collection)
            except ValueError as exc:  # UploadRefused: wrong type, empty, too large — the reason is user-facing
                report = f"Not added: {exc}"
            await say(interaction, report)

    @app_commands.command(name="search", description="What the active persona's documents say about something")
    @app_commands.describe(query="What to look for")
    async def search(self, interaction: discord.Interaction, query: str) -> None:
        async with refusals(interaction):
            hits = await self.engine.search_knowledge(query, incoming_for(self.engine, interaction).key)
            if not hits:
                await say(interaction, "Nothing in the knowledge base matches that.")
                return
            lines = [f"**{hit.source}** § {hit.locator} ({hit.score:.2f})\n> {_clip(' '.join(hit.text.split()), 300)}"
                     for hit in hits]
            await say(interaction, "\n".join(lines))

    @app_commands.command(name="list", description="Knowledge collections, and the ones the active persona uses")
    async def list_(self, interaction: discord.Interaction) -> None:
        async with refusals(interaction):
            retriever = self.engine.require_knowledge()
            persona = await self.engine.active_persona(incoming_for(self.engine, interaction).key)
            names = retriever.collections()
            used = ", ".join(persona.knowledge) or "none"
            await say(
                interaction, f"Collections: {', '.join(names) or 'none yet'}\n{persona.display_name} uses: {used}"
            )


# -- /channel --------------------------------------------------------------------------------------


class ChannelCommands(
    app_commands.Group,
    name="channel",
    description="Where the bot answers without being mentioned (admins)",
    guild_only=True,
    default_permissions=discord.Permissions(manage_guild=True),
):
    def __init__(self, engine: Engine):
        super().__init__()
        self.engine = engine

    @app_commands.command(name="enable", description="Answer every message in this channel and its threads")
    async def enable(self, interaction: discord.Interaction) -> None:
        async with refusals(interaction):
            await self.engine.set_channel_enabled(incoming_for(self.engine, interaction), True)
            await say(
                interaction, "I'll answer every message in this channel now. `/channel disable` to stop.",
                ephemeral=False,
            )

    @app_commands.command(name="disable", description="Only answer here when mentioned")
    async def disable(self, interaction: discord.Interaction) -> None:
        async with refusals(interaction):
            await self.engine.set_channel_enabled(incoming_for(self.engine, interaction), False)
            await say(interaction, "I'll only answer here when mentioned.", ephemeral=False)
