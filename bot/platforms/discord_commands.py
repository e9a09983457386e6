"""The command table (bot/commands.py) rendered as Discord app commands, autocomplete and modals.

Discord only honours `default_permissions` on top-level commands, so it hides an all-admin group (/channel)
and admin commands (/usage) from members without Manage Server, while /persona and /knowledge mix public and
admin subcommands. Either way the engine checks every admin action again (server admins can re-grant any
command to anyone in Integrations settings); a refusal is ephemeral, says why, and changes nothing.
"""
from __future__ import annotations

import asyncio
import inspect
import logging
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot import commands
from bot.conversation import Incoming
from bot.engine import Engine
from bot.platforms.discord_reply import (
    DISCORD_LIMIT, ReplyStream, attachment, conv_key, make_incoming, safe_mentions,
)
from bot.render import clip, split_message

if TYPE_CHECKING:
    from bot.platforms.discord_bot import PersonaBot

log = logging.getLogger(__name__)

THREAD_NAME_LIMIT = 100  # Discord's cap on a channel or thread name
TITLE_LIMIT = 45  # Discord's cap on a modal's title and a text input's label
ANSWER_WITHIN = 2.0  # seconds a command may take before the answer is deferred (Discord allows three)
ADMIN_ONLY = discord.Permissions(manage_guild=True)


def add_commands(bot: "PersonaBot") -> None:
    for name, group in commands.groups().items():
        if len(group) == 1 and group[0].path == name:
            bot.tree.add_command(_app_command(bot, group[0], None))
            continue
        admin_only = all(cmd.admin for cmd in group)
        parent = app_commands.Group(name=name, description=commands.GROUPS[name], guild_only=admin_only,
                                    default_permissions=ADMIN_ONLY if admin_only else None)
        for cmd in group:
            _app_command(bot, cmd, parent)
        bot.tree.add_command(parent)
    bot.tree.add_command(app_commands.Command(name="thread", description=THREAD_HELP, callback=_thread_command(bot)))
    bot.tree.add_command(app_commands.ContextMenu(name=ASK_MENU, callback=_ask_menu(bot)))

    @bot.tree.error
    async def on_error(interaction: discord.Interaction, error: app_commands.AppCommandError) -> None:
        log.error("slash command failed", exc_info=error)
        try:
            await say(interaction, f"Sorry, that command failed ({type(getattr(error, 'original', error)).__name__}).")
        except discord.HTTPException:
            pass  # the interaction expired; the log has it


def _app_command(bot: "PersonaBot", cmd: commands.Command, parent: app_commands.Group | None) -> app_commands.Command:
    """One table entry as an app command whose options are the entry's arguments."""
    engine = bot.engine

    async def callback(interaction: discord.Interaction, **options: Any) -> None:
        args = {name: attachment(value) if isinstance(value, discord.Attachment) else value
                for name, value in options.items()}
        await render(bot, interaction, cmd, commands.run(engine, incoming_for(engine, interaction), cmd.path, args))

    parameters = [inspect.Parameter("interaction", inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                    annotation=discord.Interaction)]
    for arg in cmd.args:
        kind = discord.Attachment if arg.kind == "file" else str
        parameters.append(inspect.Parameter(
            arg.name, inspect.Parameter.KEYWORD_ONLY,
            annotation=kind if arg.required else kind | None, default=inspect.Parameter.empty if arg.required else None))
    callback.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    callback.__discord_app_commands_param_description__ = {a.name: a.help for a in cmd.args}  # type: ignore[attr-defined]
    name = cmd.path.split()[-1]
    command = app_commands.Command(
        name=name, description=cmd.help, callback=callback, parent=parent,
        extras={"path": cmd.path},
    )
    if parent is None and cmd.admin:
        command.default_permissions = ADMIN_ONLY
    for arg in cmd.args:
        if (complete := AUTOCOMPLETE.get(arg.kind)) is not None:
            command.autocomplete(arg.name)(_completer(engine, complete))
    if parent is not None:
        parent.add_command(command)
    return command


async def render(bot: "PersonaBot", interaction: discord.Interaction, cmd: commands.Command, running) -> None:
    """Shows what a command returned: a modal, a streamed answer, or text (ephemeral unless public)."""
    task = asyncio.ensure_future(running)
    # A modal must be the first response, so a command that may open one is never deferred (its checks are quick).
    done, _ = await asyncio.wait({task}, timeout=None if cmd.opens_form else ANSWER_WITHIN)
    if not done:  # an upload being indexed, the embedding model loading: keep the interaction alive
        await interaction.response.defer(ephemeral=True, thinking=True)
    result = await task
    if isinstance(result, commands.Form):
        await interaction.response.send_modal(CommandForm(bot.engine, result))
    elif isinstance(result, commands.Stream):
        await _stream(bot, interaction, result)
    else:
        await say(interaction, result.text, ephemeral=not result.public)


async def _stream(bot: "PersonaBot", interaction: discord.Interaction, result: commands.Stream) -> None:
    if not interaction.response.is_done():
        await interaction.response.defer(thinking=True)
    mentions = safe_mentions()

    async def first(content: str) -> discord.InteractionMessage:
        return await interaction.edit_original_response(content=content, allowed_mentions=mentions)

    async def more(content: str) -> discord.WebhookMessage:
        return await interaction.followup.send(content, wait=True, allowed_mentions=mentions)

    await ReplyStream(first, more, mentions=mentions, interval=bot.edit_interval).run(result.pieces)


class CommandForm(discord.ui.Modal):
    """A core form as a modal; what comes back goes to `commands.submit`, which validates it like a file."""

    def __init__(self, engine: Engine, form: commands.Form):
        super().__init__(title=clip(form.title, TITLE_LIMIT), timeout=30 * 60)
        self.engine = engine
        self.form = form
        self.inputs: dict[str, discord.ui.TextInput] = {}
        for field in form.fields:
            self.inputs[field.id] = discord.ui.TextInput(
                label=clip(field.label, TITLE_LIMIT), default=field.value or None, required=field.required,
                max_length=field.max_length, placeholder=field.placeholder[:100] or None,
                style=discord.TextStyle.paragraph if field.multiline else discord.TextStyle.short,
            )
            self.add_item(self.inputs[field.id])

    async def on_submit(self, interaction: discord.Interaction) -> None:
        values = {name: item.value for name, item in self.inputs.items()}
        reply = await commands.submit(self.engine, incoming_for(self.engine, interaction), self.form.id,
                                      self.form.state, values)
        await say(interaction, reply.text, ephemeral=not reply.public)

    async def on_error(self, interaction: discord.Interaction, error: Exception) -> None:
        # Without this a failed save (a dead database) shows only Discord's generic failure.
        log.error("form failed", exc_info=error)
        try:
            await say(interaction, f"Not saved: {type(error).__name__}: {error}")
        except discord.HTTPException:
            pass  # the interaction expired; the log has it


# -- autocomplete ------------------------------------------------------------------------------------


async def _persona_choices(engine: Engine, incoming: Incoming, current: str) -> list[app_commands.Choice[str]]:
    entries = await engine.personas_in(incoming.workspace)
    return [app_commands.Choice(name=clip(f"{e.persona.display_name} ({name})", 100), value=name)
            for name, e in entries.items() if current in name or current in e.persona.display_name.lower()]


async def _collection_choices(engine: Engine, incoming: Incoming, current: str) -> list[app_commands.Choice[str]]:
    if not engine.knowledge_enabled:
        return []
    names, _ = await engine.knowledge_collections(incoming)
    return [app_commands.Choice(name=name, value=name) for name in names if current in name]


async def _source_choices(engine: Engine, incoming: Incoming, current: str) -> list[app_commands.Choice[str]]:
    if not engine.knowledge_enabled or not incoming.is_admin:
        return []
    return [app_commands.Choice(name=clip(source, 100), value=source)
            for source in engine.removable_documents(incoming) if current in source.lower()]


AUTOCOMPLETE = {"persona": _persona_choices, "collection": _collection_choices, "source": _source_choices}


def _completer(engine: Engine, choices):
    async def complete(interaction: discord.Interaction, current: str) -> list[app_commands.Choice[str]]:
        return (await choices(engine, incoming_for(engine, interaction), current.lower()))[:25]

    return complete


# -- Discord's own: /thread ----------------------------------------------------------------------------

THREAD_HELP = "Start a thread where I answer every message, with its own history."


def _thread_command(bot: "PersonaBot"):
    engine = bot.engine

    @app_commands.describe(topic="What the thread is about (its name)")
    async def thread(interaction: discord.Interaction, topic: str | None = None) -> None:
        where = interaction.channel
        if not isinstance(where, discord.TextChannel):
            await say(interaction, "I can start threads only in a server's text channels.")
            return
        persona = await engine.active_persona(conv_key(where))
        try:
            started = await where.create_thread(
                name=clip(topic or f"Chat with {persona.display_name}", THREAD_NAME_LIMIT),
                type=discord.ChannelType.public_thread, reason=f"/thread by {interaction.user}",
            )
        except discord.Forbidden:
            await say(interaction, "I'm not allowed to create threads here (the Create Public Threads permission).")
            return
        await started.send(f"{persona.display_name} here. Ask away: in this thread I answer every message, "
                           "no mention needed, and remember only what is said here.", allowed_mentions=safe_mentions())
        await say(interaction, f"Started {started.mention}.", ephemeral=False)

    return thread


# -- Discord's own: the message menu's "Ask the persona" --------------------------------------------

ASK_MENU = "Ask the persona"  # a menu item's name is fixed when it is registered, so it cannot name the persona
NOTHING_TO_ASK = "That message has no text or files for me to answer."


def _ask_menu(bot: "PersonaBot"):
    """Right-click → Apps → Ask the persona: `/ask` with that message's text as the question and its files
    attached, read by the same rules as a message's (bot/attachments.py)."""

    async def ask_about(interaction: discord.Interaction, message: discord.Message) -> None:
        if not message.content.strip() and not message.attachments:
            await say(interaction, NOTHING_TO_ASK)
            return
        ask = commands.COMMANDS["ask"]
        incoming = make_incoming(bot.engine, interaction.user, interaction.channel, "", message.attachments)
        await render(bot, interaction, ask, commands.run(bot.engine, incoming, ask.path, {"question": message.content}))

    return ask_about


# -- helpers ---------------------------------------------------------------------------------------


def incoming_for(engine: Engine, interaction: discord.Interaction, text: str = "") -> Incoming:
    return make_incoming(engine, interaction.user, interaction.channel, text)


async def say(interaction: discord.Interaction, content: str, *, ephemeral: bool = True) -> None:
    """Answers the interaction, or follows up if it was already answered; long text goes out in parts."""
    for part in split_message(content, DISCORD_LIMIT):
        if interaction.response.is_done():
            await interaction.followup.send(part, ephemeral=ephemeral, allowed_mentions=safe_mentions())
        else:
            await interaction.response.send_message(part, ephemeral=ephemeral, allowed_mentions=safe_mentions())
