"""Import SillyTavern character cards (chara_card_v2/v3 JSON, or the PNG that carries one) as personas.

Cards are the format most persona writing is shared in. The card's prose (description, personality,
scenario) becomes the system prompt; its `mes_example` dialogue becomes few-shot examples, so the voice
carries over without hand-copying.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
import struct
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from bot import persona_input
from bot.personas import MAX_SYSTEM_CHARS, Persona, PersonaError

USER_IN_PROSE = "the user"
USER_IN_DIALOGUE = "User"
OPENER = "Hello."  # stands in for the user's first line where a card's dialogue starts with the character

_START = re.compile(r"<start>", re.IGNORECASE)
_SPEAKER = re.compile(r"^\s*(\{\{user\}\}|<user>|\{\{char\}\}|<bot>)\s*:\s?", re.IGNORECASE)
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_CARD_BYTES = 32 * 1024 * 1024  # a card PNG carries the character's portrait, usually a few MB
# The card fields a persona is made from, with their limits, checked before any of them is processed.
_FIELD_LIMITS = {"name": 100} | {key: MAX_SYSTEM_CHARS for key in (
    "system_prompt", "description", "personality", "scenario", "post_history_instructions", "first_mes",
    "mes_example", "creator_notes")}


def load_card(path: Path) -> dict[str, Any]:
    """Read a card from .json, or from the base64 `chara`/`ccv3` text chunk of a character PNG."""
    try:
        data = persona_input.read_bytes(path, MAX_CARD_BYTES)
    except persona_input.Refused as exc:
        raise PersonaError([f"{path}:{exc.line}: {exc.message}"]) from None
    if data.startswith(_PNG_SIGNATURE):
        text = _png_card_text(data)
        if text is None:
            raise PersonaError([f"{path}:1: this PNG has no character card in it (no 'chara' text chunk)"])
        try:
            data = base64.b64decode(text)
        except binascii.Error as exc:
            raise PersonaError([f"{path}:1: the card in this PNG is not valid base64: {exc}"]) from None
    try:
        card = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PersonaError([f"{path}:{getattr(exc, 'lineno', 1)}: not a JSON character card: {exc}"]) from None
    except RecursionError:
        raise PersonaError([f"{path}:1: not a character card: JSON nested too deep"]) from None
    if not isinstance(card, dict):
        raise PersonaError([f"{path}:1: a character card is a JSON object"])
    return card


def _png_card_text(data: bytes) -> bytes | None:
    chunks: dict[bytes, bytes] = {}
    pos = len(_PNG_SIGNATURE)
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"tEXt" and b"\0" in body:
            keyword, _, text = body.partition(b"\0")
            chunks[keyword.lower()] = text
        pos += 12 + length
    return chunks.get(b"ccv3") or chunks.get(b"chara")


def persona_from_card(card: dict[str, Any], name: str | None = None, *, source: str = "card") -> Persona:
    """Map a card's fields onto a persona; `name` overrides the file name derived from the card's name."""
    data = card.get("data") if str(card.get("spec", "")).startswith("chara_card_v") else card
    if not isinstance(data, dict):
        raise PersonaError([f"{source}:1: card has no 'data' object"])
    too_long = [f"{source}:1: {key}: too long: {len(value):,} characters (at most {limit:,})"
                for key, limit in _FIELD_LIMITS.items() if len(value := _field(data, key)) > limit]
    if too_long:
        raise PersonaError(too_long)
    char = _field(data, "name")
    name = name or _slug(char)[:64].strip("-")
    if not name:
        raise PersonaError([f"{source}:1: card has no usable name; pass one with --name"])
    char = char or name

    def prose(value: str) -> str:
        return _fill(value, char, USER_IN_PROSE)

    intro = prose(_field(data, "system_prompt")) or (
        f"You are {char}. Write {char}'s next reply in a chat with {USER_IN_PROSE}, staying in character."
    )
    parts = [intro.replace("{{original}}", "").strip(), prose(_field(data, "description"))]
    if personality := prose(_field(data, "personality")):
        parts.append(f"{char}'s personality: {personality}")
    if scenario := prose(_field(data, "scenario")):
        parts.append(f"Scenario: {scenario}")
    if post := prose(_field(data, "post_history_instructions")):
        parts.append(post.replace("{{original}}", "").strip())

    examples = _dialogue(_field(data, "mes_example"), char)
    if greeting := _fill(_field(data, "first_mes"), char, USER_IN_DIALOGUE):
        examples = [{"role": "user", "content": OPENER}, {"role": "assistant", "content": greeting}] + examples

    notes = _field(data, "creator_notes") or _field(data, "personality") or _field(data, "description")
    try:
        return Persona(
            name=name,
            display_name=char,
            description=_first_sentence(prose(notes)) or "Imported from a SillyTavern character card.",
            system="\n\n".join(part for part in parts if part),
            examples=examples,
        )
    except ValidationError as exc:
        raise PersonaError([f"{source}:1: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]) from None


def _field(data: dict[str, Any], key: str) -> str:
    value = data.get(key)
    return value.strip() if isinstance(value, str) else ""


def _fill(text: str, char: str, user: str) -> str:
    for marker in ("{{char}}", "<BOT>", "<bot>"):
        text = text.replace(marker, char)
    for marker in ("{{user}}", "<USER>", "<user>"):
        text = text.replace(marker, user)
    return text.strip()


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _first_sentence(text: str, limit: int = 120) -> str:
    line = text.strip().splitlines()[0] if text.strip() else ""
    sentence = re.split(r"(?<=[.!?])\s", line, maxsplit=1)[0]
    return sentence if len(sentence) <= limit else sentence[: limit - 1].rstrip() + "…"


def _dialogue(mes_example: str, char: str) -> list[dict[str, str]]:
    """Turn `<START>`-separated `{{user}}:` / `{{char}}:` dialogue into whole user→assistant pairs."""
    turns: list[dict[str, str]] = []
    for block in _START.split(mes_example):
        raw: list[tuple[str, list[str]]] = []
        for line in block.splitlines():
            if speaker := _SPEAKER.match(line):
                role = "user" if "user" in speaker.group(1).lower() else "assistant"
                raw.append((role, [line[speaker.end():]]))
            elif raw:
                raw[-1][1].append(line)
        block_turns: list[dict[str, str]] = []
        for role, lines in raw:
            text = _fill("\n".join(lines), char, USER_IN_DIALOGUE)
            if not text:
                continue
            if block_turns and block_turns[-1]["role"] == role:
                block_turns[-1]["content"] += "\n" + text
            else:
                block_turns.append({"role": role, "content": text})
        if block_turns and block_turns[0]["role"] == "assistant":
            block_turns.insert(0, {"role": "user", "content": OPENER})
        if block_turns and block_turns[-1]["role"] == "user":
            block_turns.pop()  # a question with no reply teaches the model nothing
        turns += block_turns
    return turns
