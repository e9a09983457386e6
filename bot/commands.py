"""The one command table every platform renders (after errbot's plugins: a command is written once).

Each command has its arguments, whether it is an admin command, and a handler that returns text, a reply
stream or a form to fill. Discord renders the table as app_commands and modals, Slack as slash commands and
modals, the terminal as typed lines; none of them holds a rule of its own, so a command cannot mean two things
on two platforms. Every refusal is worded here, once; the engine does the checks and writes the audit rows.
"""
from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import yaml

from bot.conversation import Attachment, Incoming
from bot.engine import GLOBAL_PREFIX, KnowledgeDisabled, NotAdmin, PersonaRefused
from bot.persona_catalog import Origin
from bot.personas import NAME_PATTERN, Persona, PersonaError, UnknownPersona, parse_persona
from bot.render import KNOWLEDGE_OFF, describe_persona, format_hits, usage_chart

if TYPE_CHECKING:
    from bot.engine import Engine

FORM_TEXT_LIMIT = 3000  # Slack's cap on a modal text input (Discord's is 4000): one form fits both


@dataclass(frozen=True)
class Arg:
    name: str
    help: str
    kind: str = "text"  # text | persona | collection | source (autocompleted where a platform can) | file
    required: bool = True


@dataclass
class Reply:
    text: str
    public: bool = False  # shown to the channel rather than only to the person who ran the command
    ok: bool = True  # False for a refusal: a platform may show it differently (an error on a form)


@dataclass
class Stream:
    """The persona's answer, streamed; always public."""

    pieces: AsyncIterator[str]


@dataclass(frozen=True)
class FormField:
    id: str
    label: str
    value: str = ""
    multiline: bool = False
    required: bool = False
    max_length: int = FORM_TEXT_LIMIT
    placeholder: str = ""


@dataclass
class Form:
    """Fields to fill; the platform shows them and hands the values to `submit` with `id` and `state`."""

    id: str
    title: str
    fields: list[FormField]
    state: dict[str, Any] = field(default_factory=dict)


Result = Reply | Stream | Form
Handler = Callable[["Engine", Incoming, dict[str, Any]], Awaitable[Result]]


@dataclass(frozen=True)
class Command:
    path: str  # "persona set"
    help: str
    handler: Handler
    args: tuple[Arg, ...] = ()
    admin: bool = False  # for members it only says why not; platforms may hide it from them
    opens_form: bool = False  # may answer with a Form, which a platform must show as its first response

    @property
    def usage(self) -> str:
        names = " ".join(a.name.upper() if a.required else f"[{a.name.upper()}]" for a in self.args)
        return f"/{self.path}" + (f" {names}" if names else "")


COMMANDS: dict[str, Command] = {}
DEFAULTS = {"persona": "persona show"}  # what a bare group name runs on the text platforms
GROUPS = {  # what each group of subcommands is for, where a platform shows it
    "persona": "The bot's voice in this channel",
    "knowledge": "Documents the personas answer from",
    "channel": "Where the bot answers without being mentioned (admins)",
}


def command(path: str, help: str, *args: Arg, admin: bool = False,
            opens_form: bool = False) -> Callable[[Handler], Handler]:
    def register(handler: Handler) -> Handler:
        COMMANDS[path] = Command(path, help, handler, args, admin, opens_form)
        return handler

    return register


def groups() -> dict[str, list[Command]]:
    """Top-level names with their commands, in table order: `persona` → [list, show, …], `reset` → [reset]."""
    found: dict[str, list[Command]] = {}
    for cmd in COMMANDS.values():
        found.setdefault(cmd.path.split()[0], []).append(cmd)
    return found


def help_text() -> str:
    lines = [f"`{cmd.usage}`: {cmd.help}" + (" (admins)" if cmd.admin else "") for cmd in COMMANDS.values()]
    return "Commands:\n" + "\n".join(lines)


# -- running -------------------------------------------------------------------------------------------


class Usage(ValueError):
    """A typed command line that names no command or lacks an argument; str() says how to write it."""


def parse(line: str) -> tuple[Command, dict[str, str]]:
    """A command typed as text (Slack's slash commands, the terminal): `/persona set comic` → (command, args).

    Arguments are words in order; the last one takes the rest of the line, so a question needs no quotes.
    """
    words = line.strip().removeprefix("/").split(None, 2)
    group = words[0].lower() if words else ""
    if group not in groups():
        raise Usage(f"There is no command `/{group}`.\n{help_text()}")
    two = f"{group} {words[1].lower()}" if len(words) > 1 else ""
    if two in COMMANDS:
        cmd, rest = COMMANDS[two], words[2] if len(words) > 2 else ""
    elif group in COMMANDS:
        cmd, rest = COMMANDS[group], line.strip().removeprefix("/")[len(words[0]):].strip()
    elif len(words) == 1 and group in DEFAULTS:
        cmd, rest = COMMANDS[DEFAULTS[group]], ""
    else:
        options = "\n".join(f"`{c.usage}`: {c.help}" for c in groups()[group])
        raise Usage(f"Usage:\n{options}")
    values: dict[str, str] = {}
    for n, arg in enumerate(cmd.args):
        if not rest:
            break
        if n == len(cmd.args) - 1:
            values[arg.name], rest = rest, ""
        else:
            word, *more = rest.split(None, 1)
            values[arg.name], rest = word, more[0] if more else ""
    missing = [a.name for a in cmd.args if a.required and a.name not in values]
    if missing:
        raise Usage(f"Usage: `{cmd.usage}`: {cmd.help}")
    return cmd, values


async def run(engine: "Engine", incoming: Incoming, path: str, args: dict[str, Any]) -> Result:
    """Runs one command; every refusal comes back as a `Reply` that says why and that nothing changed."""
    try:
        return await COMMANDS[path].handler(engine, incoming, {k: v for k, v in args.items() if v not in (None, "")})
    except REFUSALS as exc:
        return refusal(exc)


async def submit(engine: "Engine", incoming: Incoming, form_id: str, state: dict[str, Any],
                 values: dict[str, str]) -> Reply:
    """A filled form, back from whichever platform showed it."""
    if form_id not in FORMS:
        return Reply("That form has expired; run its command again. Nothing was changed.", ok=False)
    try:
        return await FORMS[form_id](engine, incoming, state, values)
    except REFUSALS as exc:
        return refusal(exc)


# NotAdmin is a PermissionError; the rest are ValueErrors whose text is the reason (UploadRefused among them).
REFUSALS = (NotAdmin, UnknownPersona, KnowledgeDisabled, ValueError)


def refusal(exc: Exception) -> Reply:
    """The engine's "no" in the words every platform shows."""
    if isinstance(exc, UnknownPersona):
        text = f"There is {exc}."
    elif isinstance(exc, KnowledgeDisabled):
        text = KNOWLEDGE_OFF
    elif isinstance(exc, (PersonaRefused, PersonaError)):
        text = "Not saved; fix these and try again:\n" + "\n".join(f"- {error}" for error in exc.errors)
    elif isinstance(exc, (NotAdmin, Usage)):
        text = str(exc)
    else:
        text = f"Not done: {exc}"
    return Reply(text, ok=False)


# -- /ask, /reset ----------------------------------------------------------------------------------------


@command("ask", "A one-off question, answered without reading or joining this channel's conversation",
         Arg("question", "What to ask"))
async def ask(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    # No question is fine when files came with it (the Discord menu on a message that is only an image).
    return Stream(engine.reply(dataclasses.replace(incoming, text=args.get("question", "")), use_history=False))


@command("reset", "Start a fresh conversation here (the log is kept).")
async def reset(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    await engine.reset(incoming)
    return Reply("Context cleared: I start fresh from here.", public=True)


# -- /persona ------------------------------------------------------------------------------------------


@command("persona list", "Personas this workspace can speak as")
async def persona_list(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    active = await engine.active_persona(incoming.key)
    lines = [
        f"{'▶' if name == active.name else '•'} **{entry.persona.display_name}** (`{name}`)"
        + (f": {entry.persona.description}" if entry.persona.description else "")
        + ("" if entry.origin is Origin.SHIPPED else f" _({entry.origin.value})_")
        for name, entry in (await engine.personas_in(incoming.workspace)).items()
    ]
    return Reply("\n".join(lines) + "\n\n▶ = active here. Admins switch with `/persona set`.")


@command("persona show", "A persona's prompt and settings (default: the active one)",
         Arg("name", "Persona name", "persona", required=False))
async def persona_show(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    active = await engine.active_persona(incoming.key)
    entry = await engine.persona_in(incoming.workspace, args.get("name", active.name))
    return Reply(describe_persona(entry.persona, origin=entry.origin.value, active=entry.persona.name == active.name))


@command("persona set", "Switch this channel's persona (admins; anyone in their DM); clears the context",
         Arg("name", "Persona name", "persona"))
async def persona_set(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    persona = await engine.set_persona(incoming, args["name"])
    return Reply(f"Now speaking as **{persona.display_name}** here. Fresh context from this message on.",
                 public=True)


@command("persona create", "Write a new persona for this workspace in a form",
         Arg("name", "Lowercase letters, digits and '-'"), admin=True, opens_form=True)
async def persona_create(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    # Checked before the form opens, so nobody types a whole prompt only to be refused.
    engine.require_admin(incoming, "create personas")
    name = args["name"]
    if not NAME_PATTERN.fullmatch(name):
        raise Usage("Persona names are lowercase letters, digits and '-'. Nothing was changed.")
    entries = await engine.personas_in(incoming.workspace)
    if name in entries:
        raise Usage(f"`{name}` already exists; use `/persona edit {name}`.")
    return persona_form(name, None)


@command("persona edit", "Edit a persona in a form; a shipped one becomes this workspace's own copy",
         Arg("name", "Persona name", "persona"), admin=True, opens_form=True)
async def persona_edit(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    engine.require_admin(incoming, "edit personas")
    persona = (await engine.persona_in(incoming.workspace, args["name"])).persona
    form = persona_form(persona.name, persona)
    if any(len(f.value) > f.max_length for f in form.fields):
        raise Usage(f"`{persona.name}` is longer than a form holds ({FORM_TEXT_LIMIT} characters a field); "
                    "an owner can change it with `personabot personas export` and a file. Nothing was changed.")
    return form


@command("persona delete", "Delete one of this workspace's own personas", Arg("name", "Persona name", "persona"),
         admin=True)
async def persona_delete(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    origin = await engine.delete_persona(incoming, args["name"])
    after = " The shipped version serves here again." if origin is Origin.COPY else ""
    return Reply(f"Deleted `{args['name']}` from this workspace.{after}")


def persona_form(name: str, persona: Persona | None) -> Form:
    extra = ""
    if persona is not None:
        rest = {key: value for key, value in (
            ("avatar", persona.avatar),
            ("examples", [dict(turn) for turn in persona.examples]),
            ("model", persona.model.model_dump(exclude_none=True)),
            ("knowledge", list(persona.knowledge)),
        ) if value}
        extra = yaml.safe_dump(rest, sort_keys=False, allow_unicode=True) if rest else ""
    fields = [
        FormField("display_name", "Display name", persona.display_name if persona else "", max_length=100),
        FormField("description", "Description", persona.description if persona else "", max_length=300),
        FormField("system", "System prompt", persona.system if persona else "", multiline=True, required=True,
                  placeholder="You are … Speak in … Never …"),
        # The avatar rides in the free YAML: Discord's modals hold five fields, and this keeps one spare.
        FormField("extra", "Avatar, examples, model, knowledge (YAML)", extra, multiline=True,
                  placeholder="avatar: https://example.com/face.png\nmodel: {temperature: 0.9}\nknowledge: [handbook]"),
    ]
    title = f"{'Edit' if persona else 'New'} persona: {name}"
    return Form("persona", title, fields, {"name": name, "creating": persona is None})


async def _submit_persona(engine: "Engine", incoming: Incoming, state: dict[str, Any],
                          values: dict[str, str]) -> Reply:
    """The form as a persona file, validated by `parse_persona` like any file; the free YAML goes first so
    its line numbers match what was typed."""
    fields = {"name": state["name"], **{k: values.get(k, "") for k in ("display_name", "description", "system")}}
    fields = {key: value for key, value in fields.items() if value.strip()}
    extra = values.get("extra", "").rstrip()
    text = (extra + "\n" if extra else "") + yaml.safe_dump(fields, sort_keys=False, allow_unicode=True)
    persona = parse_persona(text, "form")
    before = await engine.save_persona(incoming, persona, creating=bool(state.get("creating")))
    where = ("this workspace's own copy (the shipped one is unchanged elsewhere)" if before is Origin.SHIPPED
             else "this workspace")
    return Reply(f"Saved **{persona.display_name}** for {where}. Use it with `/persona set {persona.name}`.")


FORMS = {"persona": _submit_persona}


# -- /knowledge ----------------------------------------------------------------------------------------


@command("knowledge add", "Add a document to this workspace's knowledge (PDF, Markdown, text, HTML)",
         Arg("file", "The document", "file"),
         Arg("collection", "Collection (default: the persona's first); owners: global:NAME", "collection",
             required=False), admin=True)
async def knowledge_add(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    from bot.retrieval.uploads import download  # the retriever is loaded already when knowledge is on

    file: Attachment = args["file"]
    engine.check_upload(incoming, file.name, file.size)  # before a byte is downloaded
    data = await download(file, engine.require_knowledge().max_upload_bytes)
    return Reply(await engine.add_knowledge(incoming, file.name, data, args.get("collection")))


@command("knowledge search", "What the active persona's documents say about something",
         Arg("query", "What to look for"))
async def knowledge_search(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    hits = await engine.search_knowledge(incoming, args["query"])
    return Reply(format_hits(hits) if hits else "Nothing in the knowledge base matches that.")


@command("knowledge list", "Collections this workspace sees, and the ones the active persona cites")
async def knowledge_list(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    names, persona = await engine.knowledge_collections(incoming)
    used = ", ".join(persona.knowledge) or "none"
    return Reply(f"Collections: {', '.join(names) or 'none yet'}\n{persona.display_name} uses: {used}")


@command("knowledge remove", f"Remove a document of this workspace's (owners: {GLOBAL_PREFIX}collection/file)",
         Arg("source", "The document as search shows it: collection/file.md", "source"), admin=True)
async def knowledge_remove(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    source = args["source"]
    if not await engine.remove_knowledge(incoming, source):
        return Reply(f"There is no document `{source}` here; `/knowledge search` shows their names.", ok=False)
    return Reply(f"Removed `{source}`; the operator can still recover the file from the trash folder.")


# -- /channel, /usage ----------------------------------------------------------------------------------


@command("channel enable", "Answer every message in this channel and its threads", admin=True)
async def channel_enable(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    await engine.set_channel_enabled(incoming, True)
    return Reply("I'll answer every message in this channel now. `/channel disable` to stop.", public=True)


@command("channel disable", "Only answer here when mentioned", admin=True)
async def channel_disable(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    await engine.set_channel_enabled(incoming, False)
    return Reply("I'll only answer here when mentioned.", public=True)


@command("usage", "Tokens this workspace spent in the last 14 days, by day and persona", admin=True)
async def usage(engine: "Engine", incoming: Incoming, args: dict[str, Any]) -> Result:
    rows = await engine.usage(incoming)
    return Reply(usage_chart(rows) if rows else "No tokens spent in this workspace in the last 14 days.")

