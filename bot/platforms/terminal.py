"""The terminal backend (errbot's text backend): the whole bot, no token, no network.

Interactive at a TTY, with a few slash commands; with stdin piped it reads one message a line, prints each
reply and exits at EOF, which makes it the simplest way to script or test the bot end to end.
"""
from __future__ import annotations

import asyncio
import sys
import threading
from typing import TextIO

from bot.conversation import ConvKey, Incoming
from bot.engine import Engine, NotAdmin
from bot.personas import UnknownPersona

HELP = """Commands: /persona NAME (switch), /personas (list), /reset (fresh context), /help, /quit"""


async def chat(
    engine: Engine,
    *,
    persona: str | None = None,
    channel: str = "local",
    user: str = "local",
    stdin: TextIO = sys.stdin,
    stdout: TextIO = sys.stdout,
) -> None:
    key = ConvKey("terminal", "local", channel)
    interactive = stdin.isatty()

    def incoming(text: str) -> Incoming:
        # The person at the terminal runs the bot, so they are its admin.
        return Incoming(key, user, text, user_name=user, is_admin=True, is_private=True)

    if persona and (await engine.active_persona(key)).name != persona:
        await engine.set_persona(incoming(""), persona)
    if interactive:
        current = await engine.active_persona(key)
        stdout.write(f"personabot: chatting with {current.display_name} ({current.name}) in #{channel}. {HELP}\n")

    lines = _lines(stdin)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = await lines.get()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if interactive and text.startswith("/"):
            if not await _command(engine, incoming(text), text, stdout):
                break
            continue
        if interactive:
            stdout.write(f"{(await engine.active_persona(key)).name}> ")
        async for piece in engine.reply(incoming(text)):
            stdout.write(piece)
            stdout.flush()
        stdout.write("\n")
        stdout.flush()


async def _command(engine: Engine, incoming: Incoming, text: str, stdout: TextIO) -> bool:
    """Runs a slash command typed at the prompt; returns False to quit."""
    name, _, arg = text[1:].partition(" ")
    try:
        if name in ("quit", "exit"):
            return False
        if name == "persona" and arg:
            persona = await engine.set_persona(incoming, arg.strip())
            stdout.write(f"Now chatting with {persona.display_name}. (fresh context)\n")
        elif name in ("personas", "persona"):
            for p in engine.personas.all():
                stdout.write(f"  {p.name:<14} {p.description}\n")
        elif name == "reset":
            await engine.reset(incoming)
            stdout.write("Context cleared.\n")
        else:
            stdout.write(HELP + "\n")
    except (UnknownPersona, NotAdmin) as exc:
        stdout.write(f"{exc}\n")
    return True


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
