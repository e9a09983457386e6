"""Images and files that come with a chat message: which reach the model, in what form, and what history keeps.

The rules live here once, for every platform: adapters hand over `Attachment`s (a name, the size and type the
platform declared, and a `read()` that downloads), and this decides.

- Images go to a model that accepts them (`sees_images`) as OpenAI image parts holding a `data:` URL of the bytes
  checked here, never the platform's link: the real type is read from the bytes (a `.png` that is an executable
  or an animation is refused), the size is counted, and the model server fetches nothing (Discord's CDN links
  are signed and expire, Slack's need the bot's token, Ollama takes no links at all).
- Text files (`text/*`, JSON, YAML, or a text suffix the platform typed as nothing) are inlined in the user's
  turn, fenced under their names, for every model.
- History keeps the words and one reference line per image, `[image: cat.png (image/png, 120 KB)]`, never the
  bytes; later turns re-send those references, not the images, so an image costs its tokens once.
- Nothing here can fail the reply: each file left out gets a one-line notice, and a model that takes no images
  is sent none (nor are they downloaded).
"""
from __future__ import annotations

import asyncio
import base64
import io
import logging
import re
from collections.abc import AsyncIterable
from dataclasses import dataclass
from pathlib import PurePath
from typing import TYPE_CHECKING

from bot.conversation import Attachment, Incoming
from bot.models.base import ContentPart, ImagePart
from bot.render import (
    ATTACHMENT_NOTICE, FILE_TOO_BIG, IMAGES_UNSEEN, NOT_AN_IMAGE, NOT_DOWNLOADED, NOT_READABLE, NOT_TEXT,
    TOO_MANY_FILES,
)

if TYPE_CHECKING:
    from bot.config import Settings
    from bot.personas import ModelSpec

log = logging.getLogger(__name__)

# What OpenAI's image input takes (GIFs only when still); Pillow's format names.
IMAGE_FORMATS = {"PNG": "image/png", "JPEG": "image/jpeg", "GIF": "image/gif", "WEBP": "image/webp"}
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".gif", ".webp", ".heic", ".bmp", ".tif", ".tiff", ".avif"}
TEXT_TYPES = {"application/json", "application/x-yaml", "application/yaml", "application/xml", "application/toml",
              "application/x-sh", "application/javascript", "application/sql"}
TEXT_SUFFIXES = {".txt", ".md", ".markdown", ".rst", ".log", ".csv", ".tsv", ".json", ".jsonl", ".yaml", ".yml",
                 ".toml", ".ini", ".cfg", ".conf", ".xml", ".html", ".css", ".sql", ".sh", ".py", ".js", ".ts",
                 ".go", ".rs", ".java", ".kt", ".c", ".h", ".cc", ".cpp", ".hpp", ".rb", ".php", ".swift", ".diff",
                 ".patch"}
UNTYPED = ("", "application/octet-stream")  # the platform did not say: the suffix decides what to try
NAME_LIMIT = 100
# A download that stalls is given up on: it is read inside the conversation's turn, so every later message of
# the conversation would wait behind it.
DOWNLOAD_SECONDS = 30.0
_UNSAFE_NAME = re.compile(r"[\x00-\x1f\x7f`\[\]]+")


@dataclass(frozen=True)
class Said:
    """A user's turn with what came with it.

    `text` is the turn as history stores it and as every model reads it: the words, a reference line per
    image or file, and each text file fenced under its name. A model that sees images gets `content`: that
    text first, then the images.
    """

    text: str
    images: tuple[ImagePart, ...] = ()
    notices: tuple[str, ...] = ()
    answerable: bool = True  # something for the model: words, a text file or an image it will see

    @property
    def content(self) -> str | list[ContentPart]:
        if not self.images:
            return self.text
        return [{"type": "text", "text": self.text}, *self.images]

    @property
    def notice(self) -> str:
        """The notices as shown before the reply, one line each; empty when there are none."""
        return "".join(ATTACHMENT_NOTICE.format(reason=reason) + "\n" for reason in self.notices)


@dataclass
class _Read:
    """What one file adds to the turn: a reference line, or a fenced text block, or an image part."""

    reference: str = ""
    block: str = ""
    image: ImagePart | None = None
    notice: str = ""


def _left_out(kind: str, name: str, notice: str = "") -> _Read:
    return _Read(f"[{'image' if kind == 'image' else 'file'} not read: {name}]", notice=notice)


def sees_images(spec: "ModelSpec", settings: "Settings") -> bool:
    """Whether this persona's model takes image parts: never a local model; the persona's `model.vision` when
    set; else a model named in PERSONABOT_VISION_MODELS or one of OpenAI's own vision models."""
    from bot.models.openai import known_vision

    if (spec.backend or settings.backend) != "openai":
        return False
    if spec.vision is not None:
        return spec.vision
    name = spec.name or settings.openai_model
    return name in settings.vision_models or known_vision(name)


async def read_turn(incoming: Incoming, settings: "Settings", *, vision: bool) -> Said:
    """The user's turn from their words and files; downloads only what the model will read, all at once."""
    words = incoming.text
    if not incoming.attachments:
        return Said(words, answerable=bool(words.strip()))
    limits = {"image": int(settings.max_image_mb * 1024 * 1024), "text": int(settings.max_text_file_kb * 1024)}
    files = [(file, _kind(file)) for file in incoming.attachments]
    wanted = [file for file, kind in files if kind == "text" or (kind == "image" and vision)]
    taken = set(map(id, wanted[:settings.max_attachments]))
    reads = await asyncio.gather(*(_read(file, kind, limits.get(kind, 0), id(file) in taken) for file, kind in files))

    notices = [r.notice for r in reads if r.notice]
    if len(wanted) > settings.max_attachments:
        notices.insert(0, TOO_MANY_FILES.format(limit=settings.max_attachments, count=len(wanted)))
    if any(kind == "image" for _, kind in files) and not vision:
        notices.insert(0, IMAGES_UNSEEN)
    references = "\n".join(r.reference for r in reads if r.reference)
    blocks = [r.block for r in reads if r.block]
    images = tuple(r.image for r in reads if r.image is not None)
    text = "\n\n".join(part for part in (words, references, *blocks) if part)
    return Said(text, images, tuple(notices), answerable=bool(words.strip() or blocks or images))


def _kind(file: Attachment) -> str:
    declared = file.content_type.split(";")[0].strip().lower()
    suffix = PurePath(file.name).suffix.lower()
    if declared.startswith("image/") or (declared in UNTYPED and suffix in IMAGE_SUFFIXES):
        return "image"
    if declared.startswith("text/") or declared in TEXT_TYPES or (declared in UNTYPED and suffix in TEXT_SUFFIXES):
        return "text"
    return "other"


async def _read(file: Attachment, kind: str, limit: int, taken: bool) -> _Read:
    name = _clean_name(file.name)
    if kind == "other":
        return _left_out(kind, name, NOT_READABLE.format(name=name))
    if not taken:  # past the count (said once for all), or an image this model cannot see
        return _left_out(kind, name)
    what = "an image" if kind == "image" else "a text file"
    if file.size > limit:  # the declared size: refused before a byte is fetched
        return _left_out(kind, name, FILE_TOO_BIG.format(name=name, size=_size(file.size), kind=what,
                                                         limit=_size(limit)))
    try:
        data = await asyncio.wait_for(file.read(limit), DOWNLOAD_SECONDS)
    except Exception as exc:  # a stall, or whatever the platform's download raises: the reply goes on without it
        log.warning("could not download attachment %s: %s", name, exc)
        return _left_out(kind, name, NOT_DOWNLOADED.format(name=name))
    if len(data) > limit:  # declared smaller than it is, or not declared: the download stopped past the limit
        return _left_out(kind, name, FILE_TOO_BIG.format(name=name, size=f"more than {_size(limit)}", kind=what,
                                                         limit=_size(limit)))
    return _image(name, data) if kind == "image" else _text(name, data)


async def read_capped(chunks: AsyncIterable[bytes], limit: int) -> bytes:
    """A body read until it ends or passes `limit`, whichever comes first: one byte past the limit is enough
    to refuse it, so a stream that never ends, or a file far bigger than its platform declared, costs at most
    `limit` of memory and only as much download as that."""
    data = bytearray()
    async for chunk in chunks:
        data += chunk
        if len(data) > limit:
            return bytes(data[: limit + 1])
    return bytes(data)


def _image(name: str, data: bytes) -> _Read:
    mime, problem = image_type(data)
    if mime is None:
        return _left_out("image", name, NOT_AN_IMAGE.format(name=name, looks_like=problem))
    url = f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"
    return _Read(f"[image: {name} ({mime}, {_size(len(data))})]", image={"type": "image_url", "image_url": {"url": url}})


def image_type(data: bytes) -> tuple[str | None, str]:
    """The image's real type from its bytes (Pillow reads the header only), or None and what it looks like."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as image:
            mime = IMAGE_FORMATS.get(image.format or "")
            if mime is not None and getattr(image, "is_animated", False):
                return None, " (it is animated; send a still image)"
            if mime is not None:
                return mime, ""
            return None, f" (it is {image.format})" if image.format else ""
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError):
        return None, looks_like(data)


def looks_like(data: bytes) -> str:
    """Names what the bytes' magic numbers say they are, so a refusal explains itself (" (its content looks like …)")."""
    import puremagic

    try:
        matches = puremagic.magic_string(data[:8192])
    except (puremagic.PureError, ValueError):
        return ""
    named = [m for m in matches if m.extension and m.confidence >= 0.4]
    return f" (its content looks like {named[0].name or named[0].extension})" if named else ""


def _text(name: str, data: bytes) -> _Read:
    try:
        body = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        body = "\x00"
    if "\x00" in body:
        return _left_out("text", name, NOT_TEXT.format(name=name))
    # A fence longer than any run of backticks inside, so the file cannot close it early (CommonMark).
    longest = max((len(run) for run in re.findall(r"`+", body)), default=0)
    fence = "`" * max(3, longest + 1)
    return _Read(block=f"{name}:\n{fence}\n{body.rstrip()}\n{fence}")


def _clean_name(name: str) -> str:
    """A file name fit to show the model and the chat: one line, no brackets or backticks to break the framing."""
    clean = _UNSAFE_NAME.sub("_", PurePath(name.replace("\\", "/")).name).strip()
    return (clean[:NAME_LIMIT] or "file")


def _size(size: int) -> str:
    if size >= 1024 * 1024:
        return f"{size / (1024 * 1024):.1f} MB"
    return f"{max(1, round(size / 1024))} KB"
