"""A persona's own face: the `avatar` key in its file and forms, and the image files the bot serves for it."""
from __future__ import annotations

import pytest

from bot import commands
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
