"""The terminal backend (errbot's text backend): the whole bot, no token, no network.

Every chat command of the one command table works here, typed as a line (`/persona set comic`); a file
argument is a path. The person at the terminal runs the bot, so they are an owner. With stdin piped it reads
one message a line, prints each reply and exits at EOF, which makes it the simplest way to script or test
the bot end to end.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from pathlib import Path
from typing import TextIO

from bot import commands
from bot.conversation import Attachment, ConvKey, Incoming, Role
from bot.engine import Engine

HELP = "Type a message to chat, /help for the commands, /quit to leave."
FORM_END = "."


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
            write(commands.help_text() + "\n")
            continue
        if text.startswith("/"):
            await _command(engine, incoming(""), text, lines, write)
            continue
        if interactive:
            write(f"{(await engine.active_persona(key)).name}> ")
        await _show(engine.reply(incoming(text)), write)


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
            # Read only once the engine has accepted the file's name and size, as on the other platforms.
            args[arg.name] = Attachment(path.name, path.stat().st_size, lambda p=path: asyncio.to_thread(p.read_bytes))
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
