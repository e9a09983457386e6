"""Images and files in: what reaches the model, what the user is told, what history keeps.

The model is the local OpenAI-compatible server (tests/openai_server.py), which records every request body;
Discord is dpytest with a real attachment on disk, Slack the signed-event rig with the fake Web API serving
the file's bytes to the workspace's bot token only.
"""
from __future__ import annotations

import asyncio
import base64
import io
import os

import aiohttp
import discord
import discord.ext.test as dpytest
import discord.ext.test.backend as dpy_backend
import discord.ext.test.factories as dpy_factories
import pytest
from PIL import Image

from bot import attachments
from bot.config import Settings
from bot.conversation import Attachment, ConvKey, Incoming
from bot.engine import Engine
from bot.models.tokens import IMAGE_TOKENS, TokenCounter
from bot.personas import PersonaError, parse_persona
from openai_server import openai_server  # noqa: F401  (fixture)
from slack_api import BOT_TOKEN, BOT_USER, TEAM, FakeSlackApi, SlackApp, served, slack_settings
from test_discord import ask_the_persona, bot, channel, engine, member  # noqa: F401  (fixtures)

PERSONAS = {
    "looker": "name: looker\nsystem: You describe pictures.\nmodel: {name: test-model, vision: true}\n",
    "reader": "name: reader\nsystem: You read.\nmodel: {name: test-model}\n",
}
KEY = ConvKey("terminal", "local", "general")
UNSEEN = "_(this persona's model can't see images; I read your text only)_"


def png(width: int = 8, height: int = 8, *, noise: bool = False) -> bytes:
    image = (Image.frombytes("RGB", (width, height), os.urandom(width * height * 3)) if noise
             else Image.new("RGB", (width, height), "red"))
    out = io.BytesIO()
    image.save(out, "PNG")
    return out.getvalue()


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (4, 4), color) for color in ("red", "blue")]
    out = io.BytesIO()
    frames[0].save(out, "GIF", save_all=True, append_images=frames[1:])
    return out.getvalue()


def attached(name: str, data: bytes, content_type: str = "", *, size: int | None = None,
             reads: list[str] | None = None) -> Attachment:
    async def read(limit: int) -> bytes:  # the whole body whatever the limit, as discord.py's read() does
        if reads is not None:
            reads.append(name)
        return data
    return Attachment(name, len(data) if size is None else size, read, content_type)


def user_turn(request: dict) -> str | list:
    return request["messages"][-1]["content"]


def image_parts(request: dict) -> list[dict]:
    return [part for m in request["messages"] if isinstance(m["content"], list)
            for part in m["content"] if part["type"] == "image_url"]


@pytest.fixture
async def make_engine(tmp_path, settings, openai_server):  # `settings` clears the host's environment
    made: list[Engine] = []

    async def make(persona: str = "looker", **extra) -> Engine:
        folder = tmp_path / "personas"
        folder.mkdir(exist_ok=True)
        for name, text in PERSONAS.items():
            (folder / f"{name}.yaml").write_text(text)
        config = Settings(_env_file=None, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url,
                          PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=folder,
                          PERSONABOT_DEFAULT_PERSONA=persona, PERSONABOT_MODEL_TIMEOUT=5, **extra)
        made.append(await Engine.create(config, knowledge=False))
        return made[-1]

    yield make
    for engine_ in made:
        await engine_.close()


async def ask(engine_: Engine, text: str, *files: Attachment) -> str:
    incoming = Incoming(KEY, "u1", text, attachments=files)
    return "".join([piece async for piece in engine_.reply(incoming)])


async def stored_turns(engine_: Engine) -> list[tuple[str, str]]:
    return [tuple(row) for row in await engine_.history.fetch("SELECT role, content FROM messages ORDER BY id")]


# -- which models see images -------------------------------------------------------------------------


async def test_vision_persona_gets_the_image_as_a_data_url_of_its_real_type(make_engine, openai_server):
    engine_ = await make_engine("looker")
    picture = png()
    # Declared a JPEG, named .jpg: the bytes say PNG, and PNG is what the model is told.
    reply = await ask(engine_, "what is this?", attached("cat.jpg", picture, "image/jpeg"))

    assert reply == "echo: what is this?\n\n[image: cat.jpg (image/png, 1 KB)]"
    text, image = user_turn(openai_server.last)
    assert text == {"type": "text", "text": "what is this?\n\n[image: cat.jpg (image/png, 1 KB)]"}
    assert image["type"] == "image_url"
    prefix, _, encoded = image["image_url"]["url"].partition(",")
    assert prefix == "data:image/png;base64" and base64.b64decode(encoded) == picture


async def test_text_persona_is_sent_no_image_and_the_reply_says_so(make_engine, openai_server):
    engine_ = await make_engine("reader")
    reads: list[str] = []
    reply = await ask(engine_, "what is this?", attached("cat.png", png(), "image/png", reads=reads))

    assert reply.startswith(UNSEEN + "\n\n")
    assert reads == []  # never downloaded
    assert user_turn(openai_server.last) == "what is this?\n\n[image not read: cat.png]"
    assert image_parts(openai_server.last) == []


@pytest.mark.parametrize("persona, extra", [
    ("reader", {"PERSONABOT_VISION_MODELS": "other-model, test-model"}),  # the operator's allow-list
    ("assistant", {}),  # no model named: the default, gpt-4o-mini, is one of OpenAI's vision models
])
async def test_models_the_operator_or_openai_mark_see_images(make_engine, openai_server, tmp_path, persona, extra):
    (tmp_path / "personas").mkdir(exist_ok=True)
    (tmp_path / "personas" / "assistant.yaml").write_text("name: assistant\nsystem: You help.\n")
    engine_ = await make_engine(persona, **extra)
    await ask(engine_, "look", attached("a.png", png(), "image/png"))
    assert len(image_parts(openai_server.last)) == 1


def test_local_models_never_see_images(settings):
    from bot.attachments import sees_images
    from bot.personas import ModelSpec

    listed = settings.model_copy(update={"vision_models": frozenset({"smollm2"})})
    assert not sees_images(ModelSpec(), listed)  # no key: the local backend
    assert not sees_images(ModelSpec(backend="local", name="gpt-4o"), listed)


def test_a_local_model_cannot_be_marked_as_seeing_images():
    with pytest.raises(PersonaError, match=r"x.yaml:3: model.vision: local models read text only"):
        parse_persona("name: x\nsystem: hi\nmodel: {backend: local, vision: true}\n", "x.yaml")


def test_an_image_part_is_priced_at_a_high_detail_image():
    counter = TokenCounter("gpt-4o")
    text = [{"role": "user", "content": "hi"}]
    parts = [{"role": "user", "content": [{"type": "text", "text": "hi"},
                                          {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    assert counter.messages(parts) - counter.messages(text) == IMAGE_TOKENS


# -- caps and refusals: a notice, never a failed call -------------------------------------------------


async def test_image_declared_over_the_cap_is_refused_without_downloading_it(make_engine, openai_server):
    engine_ = await make_engine("looker")
    reads: list[str] = []
    reply = await ask(engine_, "and this?", attached("huge.png", png(), "image/png", size=50 * 1024 * 1024,
                                                      reads=reads))

    assert reply.startswith("_(I left out huge.png: it is 50.0 MB, and an image may be at most 5.0 MB)_\n\n")
    assert reads == [] and image_parts(openai_server.last) == []


async def test_a_download_that_stalls_is_left_out_and_the_question_still_answered(make_engine, openai_server,
                                                                                    monkeypatch):
    monkeypatch.setattr(attachments, "DOWNLOAD_SECONDS", 0.2)
    engine_ = await make_engine("looker")

    async def never(limit: int) -> bytes:
        await asyncio.Event().wait()
        return b""

    reply = await asyncio.wait_for(ask(engine_, "and this?", Attachment("slow.png", 1000, never, "image/png")), 10)

    assert reply.startswith("_(I left out slow.png: I couldn't download it)_\n\n")
    assert "echo: and this?" in reply and image_parts(openai_server.last) == []


async def test_image_over_the_cap_in_fact_is_refused_whatever_was_declared(make_engine, openai_server):
    engine_ = await make_engine("looker", PERSONABOT_MAX_IMAGE_MB=0.01)
    big = png(128, 128, noise=True)  # about 49 KB of noise; declared as nothing
    reply = await ask(engine_, "and this?", attached("noise.png", big, size=0))

    assert reply.startswith("_(I left out noise.png: it is more than 10 KB, and an image may be at most 10 KB)_")
    assert image_parts(openai_server.last) == []


async def test_past_the_count_only_the_first_images_are_sent(make_engine, openai_server):
    engine_ = await make_engine("looker")
    files = [attached(f"{n}.png", png(), "image/png") for n in range(1, 7)]
    reply = await ask(engine_, "compare", *files)

    assert reply.startswith("_(I read the first 4 of the 6 files you sent (at most 4 a message))_\n\n")
    assert len(image_parts(openai_server.last)) == 4
    assert "[image not read: 5.png]\n[image not read: 6.png]" in user_turn(openai_server.last)[0]["text"]


@pytest.mark.parametrize("name, data, why", [
    ("cat.png", b"MZ\x90\x00" + b"\0" * 60 + b"This program cannot be run in DOS mode",
     "it isn't a PNG, JPEG, GIF or WebP image"),
    ("party.gif", animated_gif(), "it is animated; send a still image"),
])
async def test_an_image_that_is_not_a_still_picture_is_refused(make_engine, openai_server, name, data, why):
    engine_ = await make_engine("looker")
    reply = await ask(engine_, "look", attached(name, data, "image/png"))

    assert reply.startswith(f"_(I left out {name}: ") and why in reply.splitlines()[0]
    assert image_parts(openai_server.last) == []
    assert user_turn(openai_server.last) == f"look\n\n[image not read: {name}]"


async def test_a_message_of_nothing_readable_asks_the_model_nothing(make_engine, openai_server):
    engine_ = await make_engine("reader")
    reply = await ask(engine_, "", attached("cat.png", png(), "image/png"))

    assert reply == UNSEEN
    assert openai_server.requests == [] and await stored_turns(engine_) == []


# -- text files ----------------------------------------------------------------------------------------


async def test_a_text_file_is_inlined_under_its_name_for_a_text_model(make_engine, openai_server):
    engine_ = await make_engine("reader")
    await ask(engine_, "why does this fail?",
              attached("build.log", b"step 1 ok\nstep 2: ``` broke\n", "text/plain; charset=utf-8"))

    assert user_turn(openai_server.last) == "why does this fail?\n\nbuild.log:\n````\nstep 1 ok\nstep 2: ``` broke\n````"


async def test_a_binary_or_oversized_text_file_is_refused(make_engine, openai_server):
    engine_ = await make_engine("reader", PERSONABOT_MAX_TEXT_FILE_KB=1)
    reply = await ask(engine_, "read these", attached("data.txt", b"\x00\x01\x02", "text/plain"),
                      attached("long.md", b"word " * 400, "text/markdown"))

    assert reply.startswith("_(I left out data.txt: it isn't UTF-8 text)_\n"
                            "_(I left out long.md: it is 2 KB, and a text file may be at most 1 KB)_\n\n")
    assert user_turn(openai_server.last) == "read these\n\n[file not read: data.txt]\n[file not read: long.md]"


# -- history -------------------------------------------------------------------------------------------


async def test_history_keeps_the_reference_and_later_turns_resend_no_image(make_engine, openai_server):
    engine_ = await make_engine("looker")
    picture = png(64, 64, noise=True)
    await ask(engine_, "what is this?", attached("cat.png", picture, "image/png"))
    await ask(engine_, "and what colour was it?")

    user_rows = [content for role, content in await stored_turns(engine_) if role == "user"]
    assert user_rows == ["what is this?\n\n[image: cat.png (image/png, 12 KB)]", "and what colour was it?"]
    assert image_parts(openai_server.last) == []
    earlier = [m["content"] for m in openai_server.last["messages"] if m["role"] == "user"]
    assert earlier == ["what is this?\n\n[image: cat.png (image/png, 12 KB)]", "and what colour was it?"]


# -- Discord: an attachment on a message ---------------------------------------------------------------


def discord_file(path, content_type: str) -> discord.Attachment:
    """A Discord attachment whose CDN link is the file on disk (discord.py fetches it like any URL)."""
    return discord.Attachment(state=dpy_backend.get_state(), data=dpy_factories.make_attachment_dict(
        path.name, path.stat().st_size, path.as_uri(), path.as_uri(), content_type=content_type))


async def test_discord_image_attachment_reaches_the_model(bot, tmp_path, openai_server):
    (tmp_path / "cat.png").write_bytes(png())
    dpy_backend.make_message(f"<@{bot.user.id}> what is this?", member("alice"), channel("general"),
                             attachments=[discord_file(tmp_path / "cat.png", "image/png")])
    await dpytest.run_all_events()

    assert len(image_parts(openai_server.last)) == 1
    assert user_turn(openai_server.last)[0]["text"] == "what is this?\n\n[image: cat.png (image/png, 1 KB)]"


async def test_ask_the_persona_on_a_message_sends_its_image_and_text_file_too(bot, tmp_path, openai_server):
    (tmp_path / "cat.png").write_bytes(png())
    (tmp_path / "notes.txt").write_text("the cat is called Bayes")
    message = dpy_backend.make_message("who is this?", member("alice"), channel("general"), attachments=[
        discord_file(tmp_path / "cat.png", "image/png"), discord_file(tmp_path / "notes.txt", "text/plain")])

    await ask_the_persona(bot, message)

    text, image = user_turn(openai_server.last)
    assert text["text"] == ("who is this?\n\n[image: cat.png (image/png, 1 KB)]\n\n"
                            "notes.txt:\n```\nthe cat is called Bayes\n```")
    assert image["image_url"]["url"].startswith("data:image/png;base64,")


async def test_ask_the_persona_on_a_message_that_is_only_an_image_answers_it(bot, tmp_path, openai_server):
    (tmp_path / "cat.png").write_bytes(png())
    message = dpy_backend.make_message("", member("alice"), channel("general"),
                                       attachments=[discord_file(tmp_path / "cat.png", "image/png")])

    answer = await ask_the_persona(bot, message)

    assert len(image_parts(openai_server.last)) == 1
    assert user_turn(openai_server.last)[0]["text"] == "[image: cat.png (image/png, 1 KB)]"
    assert answer.text.startswith("echo: ")


# -- Slack: files on a mention, fetched with the workspace's token ---------------------------------------


@pytest.fixture
async def slack(tmp_path, settings, openai_server):
    async with FakeSlackApi() as api:
        config = slack_settings(tmp_path, {"assistant": PERSONAS["looker"].replace("looker", "assistant")},
                                openai_server.base_url, api)
        engine_ = await Engine.create(config, knowledge=False)
        try:
            async with served(engine_, config) as url, aiohttp.ClientSession() as session:
                yield SlackApp(f"{url}/slack/events", session), api
        finally:
            await engine_.close()


async def test_slack_shared_image_is_downloaded_with_the_bot_token_and_sent(slack, openai_server):
    app, api = slack
    shared = api.share("F1", "chart.png", png(), mimetype="image/png")
    notes = api.share("F2", "notes.txt", b"Q3 numbers are final.", mimetype="text/plain")
    await app.event({"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> explain", "ts": "1700000001.000001",
                     "channel": "C1", "event_ts": "1700000001.000001", "files": [shared, notes]})
    await api.wait_for(lambda: api.calls_to("chat.stopStream"))

    assert sorted(api.downloads) == ["F1", "F2"] and set(api.download_tokens) == {BOT_TOKEN}
    assert api.calls_to("files.info") == []  # the event carried each file's URL
    text, image = user_turn(openai_server.last)
    assert text["text"] == "explain\n\n[image: chart.png (image/png, 1 KB)]\n\nnotes.txt:\n```\nQ3 numbers are final.\n```"
    assert image["image_url"]["url"].startswith("data:image/png;base64,")


async def test_slack_file_of_another_workspace_is_not_read(slack, openai_server):
    app, api = slack
    shared = api.share("F9", "theirs.png", png(), mimetype="image/png", team="TOTHER")
    await app.event({"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> look", "ts": "1700000002.000001",
                     "channel": "C1", "event_ts": "1700000002.000001", "files": [shared]}, team=TEAM)
    await api.wait_for(lambda: api.calls_to("chat.stopStream"))

    assert api.downloads == [] and image_parts(openai_server.last) == []
    assert "I left out theirs.png: I couldn't download it" in api.thread_text("C1", "1700000002.000001")


async def test_slack_file_that_declares_no_size_and_never_ends_is_cut_off_at_the_cap(slack, openai_server):
    app, api = slack
    shared = api.share("F7", "endless.png", b"\x89PNG" + b"\0" * 65532, mimetype="image/png", endless=True)
    await app.event({"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> look", "ts": "1700000003.000001",
                     "channel": "C1", "event_ts": "1700000003.000001", "files": [shared]})
    await api.wait_for(lambda: api.calls_to("chat.stopStream"))

    assert api.thread_text("C1", "1700000003.000001").startswith(
        "_(I left out endless.png: it is more than 5.0 MB, and an image may be at most 5.0 MB)_\n\necho: look")
    assert image_parts(openai_server.last) == []
    assert api.bytes_sent["F7"] < 16 * 1024 * 1024  # it stopped reading near the cap, not at the 30 s deadline
