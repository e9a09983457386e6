"""Checks on a file before it may enter the knowledge folder: name, collection, size, real content type, and
that its name would not replace a document of another name.

Everything is decided from the bytes in memory; nothing touches the disk until every check has passed.
"""
from __future__ import annotations

import asyncio
import re
import sys
import unicodedata
from pathlib import PurePath

from bot.attachments import looks_like
from bot.conversation import Attachment
from bot.retrieval.parse import UnsupportedDocument, format_of, parse

MB = 1024 * 1024  # as PERSONABOT_KNOWLEDGE_MAX_UPLOAD_MB counts them: a limit of 10 reads as 10.0 MB
DEFAULT_MAX_BYTES = 10 * MB
# An upload is downloaded while its uploader waits for the report; one that stalls is given up, not waited on.
DOWNLOAD_SECONDS = 120.0
_NAME = re.compile(r"[^a-z0-9._-]+")
_COLLECTION = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


class UploadRefused(ValueError):
    """str(exc) tells the uploader why, and that nothing was written."""


def safe_collection(name: str) -> str:
    collection = unicodedata.normalize("NFKC", name).strip().lower().replace(" ", "-")
    if not _COLLECTION.fullmatch(collection):
        raise UploadRefused(
            f"Collection {name!r} is not allowed: use lowercase letters, digits, '-' and '_' (at most 64). "
            "Nothing was saved."
        )
    return collection


def safe_filename(filename: str) -> str:
    """A plain file name, normalised; any attempt at a path is refused rather than silently flattened."""
    raw = unicodedata.normalize("NFKC", filename).strip()
    parts = re.split(r"[/\\]", raw)
    if len(parts) > 1 or raw in (".", "..") or raw.startswith("~") or ":" in raw or "\x00" in raw:
        raise UploadRefused(f"File name {filename!r} is not allowed: give a plain file name, not a path. "
                            "Nothing was saved.")
    stem, suffix = PurePath(raw).stem, PurePath(raw).suffix.lower()
    ascii_stem = unicodedata.normalize("NFKD", stem).encode("ascii", "ignore").decode().lower()
    clean = _NAME.sub("-", ascii_stem).strip(".-_")[:100]
    if not clean:
        raise UploadRefused(f"File name {filename!r} has no usable characters. Nothing was saved.")
    return clean + suffix


def check_same_name(given: str, source: str, existing: str) -> None:
    """A document may be replaced only by a file of the name it was given (`existing`): `x.MD`, a full-width
    `ｘ.md` and `x\r.md` all become x.md, and none of them may silently take the place of another x.md."""
    if given != existing:
        raise UploadRefused(
            f"{given!r} would be saved as {source}, which already holds a different document (given as "
            f"{existing!r}). Rename the file to add it beside that one, or name it {existing!r} to replace it. "
            "Nothing was saved.")


def check_size(name: str, size: int, max_bytes: int | None) -> None:
    if max_bytes is not None and size > max_bytes:
        raise UploadRefused(f"{name} is {size / MB:.1f} MB; the limit is {max_bytes / MB:.1f} MB. "
                            "Nothing was saved.")


async def download(file: Attachment, max_bytes: int | None) -> bytes:
    """The uploaded file's bytes, read no further than one byte past the limit (its declared size was checked
    before, but a platform may declare none) and within DOWNLOAD_SECONDS."""
    limit = sys.maxsize if max_bytes is None else max_bytes
    try:
        data = await asyncio.wait_for(file.read(limit), DOWNLOAD_SECONDS)
    except TimeoutError:
        raise UploadRefused(f"{file.name} did not finish downloading in {DOWNLOAD_SECONDS:g} s. "
                            "Nothing was saved.") from None
    if len(data) > limit:
        raise UploadRefused(f"{file.name} is more than {limit / MB:.1f} MB, the limit. Nothing was saved.")
    return data


def check(filename: str, data: bytes, max_bytes: int | None = DEFAULT_MAX_BYTES) -> str:
    """Returns the safe file name; raises UploadRefused with the reason."""
    name = safe_filename(filename)
    check_size(name, len(data), max_bytes)
    if not data.strip():
        raise UploadRefused(f"{name} is empty. Nothing was saved.")
    try:
        kind = format_of(name)
    except UnsupportedDocument as exc:
        raise UploadRefused(f"{exc} Nothing was saved.") from None
    if kind == "pdf":
        if not data.startswith(b"%PDF-"):
            raise UploadRefused(f"{name} is named .pdf but is not a PDF{looks_like(data)}. Nothing was saved.")
    elif b"\x00" in data or not _is_utf8(data):
        raise UploadRefused(f"{name} is named {PurePath(name).suffix} but is not UTF-8 text{looks_like(data)}; "
                            "save it as UTF-8 text and upload again. Nothing was saved.")
    try:
        doc = parse(name, data)
    except UnsupportedDocument as exc:
        raise UploadRefused(f"{exc} Nothing was saved.") from None
    if not doc.blocks:
        raise UploadRefused(f"{name} has no text to index. Nothing was saved.")
    return name


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


