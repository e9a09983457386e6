"""A persona's own face: the `avatar` key in its file and forms, and the image files the bot serves for it."""
from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from bot import commands
from bot.config import Settings
from bot.conversation import ConvKey
from bot.personas import MAX_AVATAR_BYTES, PersonaError, avatar_url, parse_persona, read_avatar
from bot.render import describe_persona

PNG = b"\x89PNG\r\n\x1a\n" + b"\0" * 32
BASE = "name: comic\ndisplay_name: Stand-up Comic\nsystem: You tell jokes.\n"


def comic(avatar: str):
    return parse_persona(BASE + f"avatar: '{avatar}'\n", "comic.yaml")


@pytest.mark.parametrize("avatar", ["https://cdn.example.com/comic.png", "comic.png", "face_2.webp", ":laughing:"])
def test_avatar_may_be_an_https_url_an_image_file_or_an_emoji(avatar):
    assert comic(avatar).avatar == avatar


@pytest.mark.parametrize("avatar", ["../secrets.png", "/etc/passwd", "sub/comic.png", "comic.yaml", "comic.svg",
                                    "http://plain.example.com/a.png", "https://", "javascript:alert(1)"])
def test_avatar_that_is_no_url_file_or_emoji_is_refused_with_its_line(avatar):
    with pytest.raises(PersonaError) as refused:
        comic(avatar)

    (error,) = refused.value.errors
    assert error.startswith("comic.yaml:4: avatar: must be an https:// image URL")


def test_avatar_url_of_a_file_is_under_the_bots_public_address():
    assert avatar_url(comic("comic.png"), "https://bot.example.com/") == "https://bot.example.com/avatars/comic.png"
    assert avatar_url(comic("comic.png"), None) is None  # nowhere Discord or Slack could fetch it from
    assert avatar_url(comic(":laughing:"), "https://bot.example.com") is None


def test_only_a_small_real_image_of_its_named_type_is_served(tmp_path):
    (tmp_path / "face.png").write_bytes(PNG)
    (tmp_path / "fake.gif").write_bytes(PNG)  # a PNG calling itself a GIF
    (tmp_path / "huge.png").write_bytes(PNG + b"\0" * MAX_AVATAR_BYTES)
    (tmp_path / "comic.yaml").write_text(BASE)

    assert read_avatar(tmp_path, "face.png") == (PNG, "image/png")
    assert [read_avatar(tmp_path, name) for name in ("fake.gif", "huge.png", "comic.yaml", "../face.png",
                                                      "missing.png")] == [None] * 5


def test_persona_show_names_the_avatar():
    assert "Avatar: https://cdn.example.com/comic.png" in describe_persona(
        comic("https://cdn.example.com/comic.png"), origin="shipped", active=True)


def test_edit_form_shows_the_avatar_and_saves_it_back_within_discords_five_fields():
    form = commands.persona_form("comic", comic(":laughing:"))
    extra = next(f for f in form.fields if f.id == "extra")

    assert len(form.fields) <= 5 and "avatar: ':laughing:'" in extra.value


# -- a Discord-only deployment serves its avatar files too ------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_discord_only_run_with_a_public_url_serves_the_avatar_its_webhooks_point_at(tmp_path, settings,
                                                                                           monkeypatch):
    """`personabot run` with only DISCORD_TOKEN: Discord fetches a webhook's `avatar_url` itself, so the bot
    must serve the file on $PORT though no Slack server runs. Discord's gateway is the one part stood in for."""
    from bot import cli
    from bot.platforms import discord_bot
    from bot.platforms.discord_reply import persona_look

    (tmp_path / "personas").mkdir()
    face = PNG + b"face"
    (tmp_path / "personas" / "face.png").write_bytes(face)
    (tmp_path / "personas" / "comic.yaml").write_text(BASE + "avatar: face.png\n")
    port = free_port()
    config = Settings(_env_file=None, PERSONABOT_DATA_DIR=tmp_path / "data",
                      PERSONABOT_PERSONAS_DIR=tmp_path / "personas", PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge", PERSONABOT_DEFAULT_PERSONA="comic",
                      OPENAI_API_KEY="sk-test", DISCORD_TOKEN="token", PORT=port, PERSONABOT_BIND_ADDRESS="127.0.0.1",
                      PERSONABOT_PUBLIC_URL=f"http://127.0.0.1:{port}")
    fetched: dict[str, tuple[int, bytes, str]] = {}

    async def discord_connected(engine, settings) -> None:
        look = persona_look(await engine.active_persona(ConvKey("discord", "1", "2")), None, settings.public_url)
        async with aiohttp.ClientSession() as session:
            for url in (look["avatar_url"], f"http://127.0.0.1:{port}/healthz", f"http://127.0.0.1:{port}/metrics"):
                for _ in range(100):  # the web server starts beside this task
                    try:
                        async with session.get(url) as response:
                            fetched[url] = (response.status, await response.read(), response.content_type)
                            break
                    except aiohttp.ClientConnectionError:
                        await asyncio.sleep(0.05)

    monkeypatch.setattr(discord_bot, "run_discord", discord_connected)
    await cli._run_platforms(config, discord=True, slack=False)  # returns when "Discord" stops

    assert fetched[f"http://127.0.0.1:{port}/avatars/face.png"] == (200, face, "image/png")
    assert fetched[f"http://127.0.0.1:{port}/healthz"][0] == 200
    assert fetched[f"http://127.0.0.1:{port}/metrics"][0] == 200


async def test_discord_only_run_without_a_public_url_opens_no_port(tmp_path, settings, monkeypatch):
    from bot import cli
    from bot.platforms import discord_bot

    port = free_port()
    config = settings.model_copy(update={"discord_token": "token", "port": port, "bind_address": "127.0.0.1",
                                         "openai_api_key": "sk-test"})
    refused: list[bool] = []

    async def discord_connected(engine, settings) -> None:
        await asyncio.sleep(0.3)
        with socket.socket() as s:
            refused.append(s.connect_ex(("127.0.0.1", port)) != 0)

    monkeypatch.setattr(discord_bot, "run_discord", discord_connected)
    await cli._run_platforms(config, discord=True, slack=False)

    assert refused == [True]
