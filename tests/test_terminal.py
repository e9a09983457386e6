"""`personabot chat` as a user runs it: a real process, piped stdin, the OpenAI-compatible test server."""
import asyncio
import os
import signal
import sqlite3
import sys
from pathlib import Path

from openai_server import openai_server  # noqa: F401  (fixture)

ROOT = Path(__file__).resolve().parent.parent


async def start_chat(tmp_path: Path, server, *args: str) -> asyncio.subprocess.Process:
    env = {
        **os.environ,
        "OPENAI_API_KEY": "sk-test",
        "OPENAI_BASE_URL": server.base_url,
        "PERSONABOT_DATA_DIR": str(tmp_path / "data"),
        "PERSONABOT_PERSONAS_DIR": str(ROOT / "personas"),
        "PERSONABOT_KNOWLEDGE_DIR": str(tmp_path / "knowledge"),
    }
    return await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "chat", *args,
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        cwd=tmp_path, env=env,
    )


async def run_chat(tmp_path: Path, server, stdin: str, *args: str) -> tuple[int, str, str]:
    proc = await start_chat(tmp_path, server, *args)
    out, err = await asyncio.wait_for(proc.communicate(stdin.encode()), 120)
    return proc.returncode, out.decode(), err.decode()


async def test_piped_chat_prints_one_reply_per_line_and_exits_at_eof(tmp_path, openai_server):
    code, out, err = await run_chat(tmp_path, openai_server, "hello\n\nhow are you\n")
    assert code == 0, err
    assert out.splitlines() == ["echo: hello", "echo: how are you"]


async def test_chat_persona_option_switches_and_history_is_stored_under_terminal(tmp_path, openai_server):
    code, _, err = await run_chat(tmp_path, openai_server, "a joke please\n", "--persona", "comic", "--channel", "lab")
    assert code == 0, err
    assert "stand-up comic" in openai_server.last["messages"][0]["content"]
    with sqlite3.connect(tmp_path / "data" / "personabot.sqlite3") as db:
        rows = db.execute("SELECT platform, channel, role, content FROM messages ORDER BY id").fetchall()
    assert rows == [("terminal", "lab", "user", "a joke please"), ("terminal", "lab", "assistant", "echo: a joke please")]


async def test_chat_runs_on_a_locally_built_model_without_any_key(tmp_path):
    from tiny_gpt2 import build_tiny_gpt2

    model_dir = build_tiny_gpt2(tmp_path / "data" / "models" / "tiny")
    personas = tmp_path / "personas"
    personas.mkdir()  # the tiny model holds 256 tokens: a persona whose prompt fits in it
    (personas / "brief.yaml").write_text("name: brief\nsystem: You are brief.\nmodel: {max_tokens: 16}\n")
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("OPENAI_API_KEY", "OPENAI_BASE_URL")},
        "PERSONABOT_DATA_DIR": str(tmp_path / "data"),
        "PERSONABOT_PERSONAS_DIR": str(personas),
        "PERSONABOT_DEFAULT_PERSONA": "brief",
        "PERSONABOT_KNOWLEDGE_DIR": str(tmp_path / "knowledge"),
        "PERSONABOT_LOCAL_MODEL": "tiny",
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bot", "chat", stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE, cwd=tmp_path, env=env,
    )
    out, err = await asyncio.wait_for(proc.communicate(b"hello there\n"), 180)
    assert proc.returncode == 0, err.decode()
    assert err.decode() == ""  # quiet by default: no warnings, no loading bars around the chat
    with sqlite3.connect(tmp_path / "data" / "personabot.sqlite3") as db:
        rows = db.execute("SELECT role, content FROM messages ORDER BY id").fetchall()
    assert rows[0] == ("user", "hello there")
    assert [role for role, _ in rows] == ["user", "assistant"]  # the model answered: no error notice
    assert out.decode().startswith(rows[1][1])  # and stdout shows that reply (maybe with a cut-off notice)
    assert model_dir.name == "tiny"


async def test_sigterm_stops_chat_cleanly_with_the_conversation_saved(tmp_path, openai_server):
    proc = await start_chat(tmp_path, openai_server)
    proc.stdin.write(b"still there?\n")
    await proc.stdin.drain()
    assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"echo: still there?\n"

    proc.send_signal(signal.SIGTERM)  # stdin stays open: the chat is waiting for the next line
    code = await asyncio.wait_for(proc.wait(), 30)

    err = (await proc.stderr.read()).decode()
    assert code == 0 and "Traceback" not in err, err
    with sqlite3.connect(tmp_path / "data" / "personabot.sqlite3") as db:
        assert db.execute("SELECT role, content FROM messages ORDER BY id").fetchall() == [
            ("user", "still there?"), ("assistant", "echo: still there?")]


def png_bytes() -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (8, 8), "red").save(out, "PNG")
    return out.getvalue()


async def test_chat_line_ending_in_at_paths_attaches_those_files(tmp_path, openai_server):
    (tmp_path / "cat.png").write_bytes(png_bytes())
    (tmp_path / "notes.md").write_text("The cat is called Bayes.")

    code, out, err = await run_chat(tmp_path, openai_server, "who is this? @cat.png @notes.md\n")

    assert code == 0, err
    text, image = openai_server.last["messages"][-1]["content"]  # the default persona's model sees images
    assert text["text"] == ("who is this?\n\n[image: cat.png (image/png, 1 KB)]\n\n"
                            "notes.md:\n```\nThe cat is called Bayes.\n```")
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    with sqlite3.connect(tmp_path / "data" / "personabot.sqlite3") as db:
        stored = db.execute("SELECT content FROM messages WHERE role = 'user'").fetchone()[0]
    assert stored == text["text"]  # history keeps the reference line, not the image


async def test_chat_line_attaching_a_missing_file_says_so_and_sends_nothing(tmp_path, openai_server):
    code, out, err = await run_chat(tmp_path, openai_server, "what does it say? @nope.md\nthanks @alice\n")

    assert code == 0, err
    assert out.splitlines() == ["No file at nope.md.", "Nothing was sent.", "echo: thanks @alice"]
    assert len(openai_server.requests) == 1


async def test_chat_attachment_is_refused_by_the_same_rules_as_on_discord(tmp_path, openai_server):
    (tmp_path / "fake.png").write_bytes(b"MZ\x90\x00 not a picture at all")

    code, out, err = await run_chat(tmp_path, openai_server, "look @fake.png\n")

    assert code == 0, err
    assert out.splitlines()[0] == ("_(I left out fake.png: it isn't a PNG, JPEG, GIF or WebP image (its content "
                                   "looks like Windows Executable))_")


async def test_help_says_how_to_attach_a_file(tmp_path, openai_server):
    code, out, err = await run_chat(tmp_path, openai_server, "/help\n")

    assert code == 0, err
    assert "@chart.png" in out and "/knowledge add" in out
