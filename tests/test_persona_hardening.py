"""Hostile persona files and character cards: each is refused quickly with its file:line, costs only its own
entry, and never holds up the event loop, through the real library, engine and CLI.

The time bounds are guards against a hang, not benchmarks: each refusal takes milliseconds.
"""
from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from typer.testing import CliRunner

from bot.cli.personas import app
from bot.config import Settings
from bot.conversation import ConvKey
from bot.engine import Engine
from bot.personas import MAX_FILE_BYTES, PersonaError, PersonaLibrary, parse_persona

REPO = Path(__file__).resolve().parent.parent
PIRATE = "name: pirate\ndisplay_name: Pirate\nsystem: You talk like a pirate.\n"
CHANNEL = ConvKey("discord", "111", "general")
QUICK = 2.0  # seconds: generous, so a slow CI machine never trips it


def laughs(depth: int) -> bytes:
    """The billion-laughs document: each level is nine aliases of the one before, 9**depth strings in all."""
    lines = ["name: bad", "system: &l0 lol"]
    lines += [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 9)}]" for i in range(1, depth + 1)]
    return "\n".join(lines).encode() + b"\n"


def nested(levels: int) -> bytes:
    return b"name: bad\nsystem: " + b"{a: " * levels + b"b" + b"}" * levels + b"\n"


HOSTILE = {
    # name: (file bytes, what the error says, the line it is on)
    "aliases, 2 deep": (laughs(2), "anchors (&l0) are not allowed", 2),
    "aliases, 5 deep": (laughs(5), "anchors (&l0) are not allowed", 2),
    "aliases, 8 deep": (laughs(8), "anchors (&l0) are not allowed", 2),
    "an alias with no anchor": (b"name: bad\nsystem: hi\nexamples: *missing\n", "aliases (*missing) are not", 3),
    "5,000 levels deep": (nested(5000), "nest", 2),
    "50,000 levels deep": (nested(50_000), "nest", 2),
    "20 MB": (b"name: bad\nsystem: |\n" + (b"  " + b"y" * 98 + b"\n") * 200_000, "too big: 20,200,0", 1),
    "a NUL byte": (b"name: bad\nsystem: a\x00b\n", "character #x0000 is not allowed", 2),
    "invalid UTF-8": (b"name: bad\n\nsystem: caf\xe9\n", "not UTF-8 text", 3),
    "duplicate keys": (b"name: bad\nsystem: a\nsystem: b\n", "system: duplicate key", 3),
    "a 100,000-character system prompt": (b"name: bad\nsystem: " + b"y" * 100_000 + b"\n", "too long: 100,000", 2),
    "a huge display name": (b"name: bad\nsystem: hi\ndisplay_name: " + b"y" * 5000 + b"\n", "too long: 5,000", 3),
    "200 examples": (b"name: bad\nsystem: hi\nexamples:\n" + b"  - {role: user, content: a}\n"
                     b"  - {role: assistant, content: b}\n" * 100, "too many: 200 items", 3),
    "a base-60 number 80,000 places long": (b"name: bad\nsystem: 1" + b":59" * 80_000 + b"\n", "number this long", 2),
    "an impossible date": (b"name: bad\nsystem: hi\ndescription: 2024-13-45\n", "month must be in 1..12", 3),
    "a merge key": (b"name: bad\n<<: {system: hi}\n", "merge keys (<<) are not allowed", 2),
    "an explicit tag": (b"name: bad\nsystem: !!python/object/apply:os.system [echo hi]\n", "tags (", 2),
    "2,000 unknown keys": (b"name: bad\nsystem: hi\n" + b"".join(b"k%d: 1\n" % i for i in range(2000)),
                           "unknown key", 3),
    "50,000 values": (b"name: bad\nsystem: hi\nknowledge: [" + b"a, " * 50_000 + b"]\n",
                       "more than 5,000 keys and values", 3),
}


def refused(errors: list[str], path: Path, says: str, line: int) -> bool:
    return bool(errors) and errors[0].startswith(f"{path}:{line}: ") and says in errors[0]


# ---------------------------------------------------------------------------------------------- persona files


@pytest.mark.parametrize("case", HOSTILE)
def test_hostile_file_is_refused_quickly_with_its_line_and_the_others_keep_serving(tmp_path, case):
    content, says, line = HOSTILE[case]
    (tmp_path / "pirate.yaml").write_text(PIRATE)
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(content)

    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    started = time.perf_counter()
    errors = library.errors
    took = time.perf_counter() - started

    assert refused(errors.get(bad, []), bad, says, line), errors.get(bad)
    assert took < QUICK and library.get("pirate").system == "You talk like a pirate."


@pytest.mark.parametrize("case", ["aliases, 8 deep", "50,000 levels deep", "20 MB", "a NUL byte"])
def test_check_lists_the_hostile_file_and_exits_1(tmp_path, case):
    content, says, line = HOSTILE[case]
    (tmp_path / "pirate.yaml").write_text(PIRATE)
    (tmp_path / "bad.yaml").write_bytes(content)

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["check", str(tmp_path)])

    assert result.exit_code == 1 and time.perf_counter() - started < QUICK
    assert result.output.splitlines()[0].startswith(f"{tmp_path}/bad.yaml:{line}: ") and says in result.output


def check_in_a_subprocess(directory: Path) -> subprocess.CompletedProcess[str]:
    """`personabot personas check`, in a process that a FIFO cannot hang nor /dev/zero fill memory for long."""
    def limit_memory() -> None:
        import resource
        resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))

    env = {**os.environ, "PERSONABOT_PERSONAS_DIR": str(directory)}
    return subprocess.run([sys.executable, "-c", "from bot.cli.personas import app; app()", "check", str(directory)],
                          capture_output=True, text=True, timeout=60, env=env, cwd=REPO, preexec_fn=limit_memory)


@pytest.mark.skipif(not hasattr(os, "mkfifo") or not os.path.exists("/dev/zero"), reason="needs FIFOs, /dev/zero")
def test_a_fifo_or_a_link_to_dev_zero_is_reported_not_read(tmp_path):
    (tmp_path / "pirate.yaml").write_text(PIRATE)
    os.mkfifo(tmp_path / "fifo.yaml")
    (tmp_path / "zero.yaml").symlink_to("/dev/zero")

    result = check_in_a_subprocess(tmp_path)

    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines() == [f"{tmp_path}/fifo.yaml:1: not a regular file",
                                          f"{tmp_path}/zero.yaml:1: not a regular file"]


def test_a_large_but_real_persona_is_still_accepted():
    examples = "".join(f"  - role: {role}\n    content: {'word ' * 300}\n" for role in ["user", "assistant"] * 16)
    persona = parse_persona(f"name: big\nsystem: {'rule ' * 6000}\nexamples:\n{examples}", "big.yaml")
    assert len(persona.system) > 25_000 and len(persona.examples) == 32


def test_chat_made_and_form_yaml_meet_the_same_bounds():
    for text, says in [(laughs(8).decode(), "anchors"), (nested(5000).decode(), "nest"),
                       ("name: x\nsystem: " + "y" * MAX_FILE_BYTES, "too big")]:
        with pytest.raises(PersonaError, match=says):
            parse_persona(text, "discord:111:x")


# ---------------------------------------------------------------------------------------------- engine


@pytest.fixture
async def engine(tmp_path):
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "pirate.yaml").write_text(PIRATE)
    settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=personas,
                        PERSONABOT_DEFAULT_PERSONA="pirate", PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge")
    engine = await Engine.create(settings, knowledge=False)
    engine.personas.library.recheck_seconds = 0
    yield engine
    await engine.close()


async def test_the_event_loop_keeps_ticking_while_big_files_are_checked(engine):
    personas = engine.settings.personas_dir
    (personas / "huge.yaml").write_bytes(HOSTILE["20 MB"][0])
    # Near the size limit, and as slow to read as such a file may be: 2,400 keys, each one wrong.
    wrong_keys = "".join(f"k{i}: {'y' * 90}\n" for i in range(2400))
    (personas / "slow.yaml").write_text(f"name: slow\nsystem: hi\n{wrong_keys}")
    gaps: list[float] = []

    async def tick() -> None:
        last = time.perf_counter()
        while True:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    ticker = asyncio.create_task(tick())
    await asyncio.sleep(0.02)
    persona = await engine.active_persona(CHANNEL)
    await asyncio.sleep(0.02)  # the ticker's turn, to notice a stall that just ended
    ticker.cancel()

    errors = engine.personas.library.errors
    assert persona.name == "pirate" and {p.name for p in errors} == {"huge.yaml", "slow.yaml"}
    assert max(gaps) < 0.5, f"the event loop stalled for {max(gaps):.2f}s"


async def test_a_file_nested_thousands_deep_costs_only_its_own_entry(engine):
    (engine.settings.personas_dir / "deep.yaml").write_bytes(nested(5000))

    assert (await engine.active_persona(CHANNEL)).name == "pirate"
    assert sorted(await engine.personas_in(CHANNEL.tenant)) == ["pirate"]


async def test_a_hostile_edit_keeps_the_last_good_version_serving(engine):
    path = engine.settings.personas_dir / "pirate.yaml"
    assert (await engine.active_persona(CHANNEL)).system == "You talk like a pirate."
    path.write_bytes(laughs(8).replace(b"name: bad", b"name: pirate"))

    assert (await engine.active_persona(CHANNEL)).system == "You talk like a pirate."
    [error] = engine.personas.library.errors[path]
    assert error.startswith(f"{path}:2: anchors")


async def test_a_hostile_workspace_persona_in_the_database_is_skipped(engine):
    await engine.history.save_workspace_persona(CHANNEL.tenant, "deep", nested(5000).decode(),
                                                saved_by="old-version", by_owner=False)

    assert sorted(await engine.personas_in(CHANNEL.tenant)) == ["pirate"]


# ---------------------------------------------------------------------------------------------- card import


def png(*chunks: tuple[bytes, bytes]) -> bytes:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0))
    return b"\x89PNG\r\n\x1a\n" + ihdr + b"".join(chunk(kind, body) for kind, body in chunks) + chunk(b"IEND", b"")


def card(**fields: str) -> bytes:
    data = {"name": "Vera", "description": "A retired captain.", "first_mes": "Hello there."} | fields
    return json.dumps({"spec": "chara_card_v2", "spec_version": "2.0", "data": data}).encode()


CARDS = {
    "a PNG cut off after its signature": ("card.png", b"\x89PNG\r\n\x1a\n\x00\x00", "no character card"),
    "a PNG cut off inside its card": ("card.png", png((b"tEXt", b"chara\0" + base64.b64encode(card())))[:60],
                                      "not valid base64"),
    "a PNG whose card is not base64": ("card.png", png((b"tEXt", b"chara\0abcde")), "not valid base64"),
    "a PNG whose card is not JSON": ("card.png", png((b"tEXt", b"chara\0" + base64.b64encode(b"\xff\xfe{"))),
                                     "not a JSON character card"),
    "JSON nested 100,000 deep": ("card.json", b"[" * 100_000 + b"]" * 100_000, "nested too deep"),
    "a 5,000-character name": ("card.json", card(name="V" * 5000), "name: too long: 5,000 characters"),
    "a 30 MB description": ("card.json", card(description="y" * 30_000_000), "description: too long: 30,000,000"),
    "a first message too long for an example": ("card.json", card(first_mes="y" * 5000), "examples.1.content"),
}


@pytest.mark.parametrize("case", CARDS)
def test_a_broken_or_oversized_card_is_one_line_of_error_and_exit_1(tmp_path, case):
    name, content, says = CARDS[case]
    path = tmp_path / name
    path.write_bytes(content)

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["import", str(path)], env={"PERSONABOT_PERSONAS_DIR": str(tmp_path / "p")})

    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    assert len(result.output.splitlines()) == 1 and says in result.output, result.output
    assert time.perf_counter() - started < QUICK and not (tmp_path / "p").exists()


def test_a_card_with_a_long_but_fair_name_imports_under_a_shortened_file_name(tmp_path):
    path = tmp_path / "card.json"
    path.write_bytes(card(name="The Very Long-Winded Captain Vera of the Outer Rim Survey Fleet, Retired"))

    result = CliRunner().invoke(app, ["import", str(path)], env={"PERSONABOT_PERSONAS_DIR": str(tmp_path / "p")})

    assert result.exit_code == 0, result.output
    [written] = (tmp_path / "p").iterdir()
    assert re.fullmatch(r"[a-z0-9-]{1,64}\.yaml", written.name)
