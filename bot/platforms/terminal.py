"""The terminal backend (errbot's text backend): the whole bot, no token, no network.

Every chat command of the one command table works here, typed as a line (`/persona set comic`); a file
argument is a path. A chat line attaches files by ending with their paths, each after an `@`
(`what is this? @chart.png @notes.md`), and they are read by the same rules as a Discord attachment or a
Slack share (bot/attachments.py). Only trailing `@` words count, so "thanks @alice" mid-line or at the end is
plain text unless such a file exists or the word looks like a path. The person at the terminal runs the bot,
so they are an owner. With stdin piped it reads one message a line, prints each reply and exits at EOF,
which makes it the simplest way to script or test the bot end to end.
"""
from __future__ import annotations

import asyncio
import dataclasses
import re
import sys
import threading
from pathlib import Path
from typing import TextIO

from bot import commands
from bot.conversation import Attachment, ConvKey, Incoming, Role
from bot.engine import Engine

HELP = "Type a message to chat (end it with @PATH to attach a file), /help for the commands, /quit to leave."
ATTACH_HELP = ("Attach files to a message by ending it with their paths, each after an @: "
               "`what is in this? @chart.png @notes.md` (quote a path with spaces: @\"my notes.md\").")
FORM_END = "."
# One `@PATH` at the end of a line: a quoted path, or a word.
_TRAILING_FILE = re.compile(r"""(?:^|\s)@("[^"]+"|'[^']+'|\S+)\s*$""")


async def chat(
    engine: Engine,
    *,
    persona: str | None = None,
    workspace: str = "local",
    channel: str = "local",
    user: str = "local",
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    key = ConvKey("terminal", workspace, channel)
    interactive = stdin.isatty()
    lines = _lines(stdin)

    def incoming(text: str) -> Incoming:
        return Incoming(key, user, text, user_name=user, role=Role.OWNER, is_private=True)

    def write(text: str) -> None:
        stdout.write(text)
        stdout.flush()

    if persona and (await engine.active_persona(key)).name != persona:
        await engine.set_persona(incoming(""), persona)
    if interactive:
        current = await engine.active_persona(key)
        write(f"personabot: chatting with {current.display_name} ({current.name}) in {workspace}/#{channel}. {HELP}\n")

    while True:
        if interactive:
            write("you> ")
        line = await lines.get()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/help":
            write(commands.help_text() + "\n" + ATTACH_HELP + "\n")
            continue
        if text.startswith("/"):
            await _command(engine, incoming(""), text, lines, write)
            continue
        words, paths = attached_paths(text)
        if missing := [path for path in paths if not path.is_file()]:
            write("".join(f"No file at {path}.\n" for path in missing) + "Nothing was sent.\n")
            continue
        if interactive:
            write(f"{(await engine.active_persona(key)).name}> ")
        files = tuple(map(_attachment, paths))
        await _show(engine.reply(dataclasses.replace(incoming(words), attachments=files)), write)


def attached_paths(line: str) -> tuple[str, list[Path]]:
    """A chat line's words, and the paths of the files it attaches: the `@PATH`s it ends with.

    A trailing `@word` counts as a path when that file exists or the word looks like one (it has a `/` or a
    `.`), so a missing `@notes.md` is reported rather than sent as text, while "thanks @alice" stays words.
    """
    paths: list[Path] = []
    while (match := _TRAILING_FILE.search(line)) is not None:
        raw = match.group(1)
        quoted = raw[0] in "\"'" and raw[-1] == raw[0] and len(raw) > 1
        path = Path(raw[1:-1] if quoted else raw).expanduser()
        if not (quoted or path.exists() or "/" in raw or "." in raw.strip(".")):
            break
        paths.insert(0, path)
        line = line[:match.start()].rstrip()
    return line, paths


def _attachment(path: Path) -> Attachment:
    """A file on disk as the engine takes it; the terminal declares no type, so the suffix and bytes decide.
    Read only once the engine has accepted the file's name and size, as on the other platforms, and no more
    of it than the limit (a file that grew since, or /dev/zero, is refused as too big)."""
    return Attachment(path.name, path.stat().st_size, lambda limit: asyncio.to_thread(_head, path, limit))


def _head(path: Path, limit: int) -> bytes:
    with path.open("rb") as file:
        return file.read(limit + 1)


async def _command(engine: Engine, incoming: Incoming, text: str, lines: asyncio.Queue[str], write) -> None:
    try:
        cmd, args = commands.parse(text)
    except commands.Usage as exc:
        write(f"{exc}\n")
        return
    for arg in cmd.args:
        if arg.kind == "file" and arg.name in args:
            path = Path(args[arg.name]).expanduser()
            if not path.is_file():
                write(f"No file at {path}.\n")
                return
            args[arg.name] = _attachment(path)
    result = await commands.run(engine, incoming, cmd.path, args)
    if isinstance(result, commands.Form):
        result = await commands.submit(engine, incoming, result.id, result.state,
                                       await _fill(result, lines, write))
    if isinstance(result, commands.Stream):
        await _show(result.pieces, write)
    else:
        write(result.text + "\n")


async def _show(pieces, write) -> None:
    async for piece in pieces:
        write(piece)
    write("\n")


async def _fill(form: commands.Form, lines: asyncio.Queue[str], write) -> dict[str, str]:
    """Each field is typed as lines ending with a line holding only "."; a field ended at once keeps its value."""
    write(f"{form.title}. End each field with a line holding only '{FORM_END}'; '{FORM_END}' alone keeps what is shown.\n")
    values: dict[str, str] = {}
    for field in form.fields:
        shown = f" [{field.value.strip()}]" if field.value.strip() else ""
        write(f"{field.label}{shown}:\n")
        typed: list[str] = []
        while (line := await lines.get()).rstrip("\n") != FORM_END:
            if not line:  # EOF: the chat ends after this form
                lines.put_nowait("")
                break
            typed.append(line.rstrip("\n"))
        values[field.id] = "\n".join(typed) if typed else field.value
    return values


def _lines(stdin: TextIO) -> asyncio.Queue[str]:
    """Lines from stdin, then "" at EOF. A daemon thread reads them, because a read blocked on a quiet pipe
    cannot be cancelled: in the default executor it would keep the process alive after SIGTERM."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in iter(stdin.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, "")
        except RuntimeError:  # the loop is closed: the chat is over
            pass

    threading.Thread(target=pump, name="stdin", daemon=True).start()
    return queue
