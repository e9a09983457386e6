"""Cutting a reply into Discord messages (2000 characters each) without breaking its Markdown.

A cut lands on the best boundary available near the end of the room left: the edge of a code block, then a
blank line, a line end, a sentence end, a space; only text with none of those is cut mid-word. A cut inside a
code block closes the fence in that message and reopens it, with the same language, in the next, so every
message renders on its own. Apart from those added fences the messages concatenate back to the reply exactly.
"""
from __future__ import annotations

import re

DISCORD_LIMIT = 2000
FENCE = "```"
CLOSE = "\n```"
# A cut earlier than this share of the room wastes too much of a message; below it a worse boundary is used.
MIN_FILL = 0.5

_FENCE = re.compile(r"```")
_LANG = re.compile(r"([A-Za-z0-9_+#.-]*)[ \t]*\n")
_SENTENCE_END = re.compile(r"[.!?…](?:[\"')\]]*)[ \t]+")


def split_message(text: str, limit: int = DISCORD_LIMIT) -> list[str]:
    """The messages `text` is sent as: each at most `limit` characters, none with a code block left open."""
    if limit < 3 * len(FENCE) + 20:
        raise ValueError(f"limit {limit} is too small to split code blocks into")
    parts: list[str] = []
    reopen = ""  # the fence that reopens a code block cut at the end of the previous message
    rest = text
    while len(reopen) + len(rest) > limit:
        room = limit - len(reopen) - len(CLOSE)
        cut = _best_cut(reopen, rest, room)
        piece, rest = rest[:cut], rest[cut:]
        lang = open_fence_language(reopen + piece)
        if lang is None:
            parts.append(reopen + piece)
            reopen = ""
        else:
            parts.append(reopen + piece + ("" if piece.endswith("\n") else "\n") + FENCE)
            reopen = f"{FENCE}{lang}\n"
    parts.append(reopen + rest)
    return [part for part in parts if part.strip()]


def open_fence_language(text: str) -> str | None:
    """The language of the code block `text` leaves open ("" when it has none), or None if all are closed."""
    lang: str | None = None
    for match in _FENCE.finditer(text):
        if lang is not None:
            lang = None
            continue
        tag = _LANG.match(text, match.end())
        lang = tag.group(1) if tag else ""
    return lang


def close_open_fence(text: str, limit: int = DISCORD_LIMIT) -> str:
    """`text` with a dangling code block closed, for showing a reply still being written (if it fits)."""
    if open_fence_language(text) is None or len(text) + len(CLOSE) > limit:
        return text
    return text + CLOSE


def _best_cut(reopen: str, rest: str, room: int) -> int:
    """Where to end the next message: an index into `rest` in (0, room], on the best boundary found."""
    window = rest[: room + 1]  # a boundary may sit just after the last character that fits
    floor = max(1, int(room * MIN_FILL))
    candidates: list[tuple[int, int]] = []  # (rank, cut); higher rank is a better place to cut

    inside = open_fence_language(reopen) is not None
    position = 0
    for match in _FENCE.finditer(window):
        start, end = match.start(), match.end()
        if not inside:
            # Before an opening fence: the code block moves whole to the next message.
            line_start = window.rfind("\n", 0, start) + 1
            if window[line_start:start].strip() == "":
                candidates.append((5, line_start))
        else:
            # After a closing fence and the end of its line.
            newline = window.find("\n", end)
            if newline != -1:
                candidates.append((5, newline + 1))
        _text_cuts(window, position, start, inside, candidates)
        position, inside = end, not inside
    _text_cuts(window, position, len(window), inside, candidates)

    usable = [(rank, cut) for rank, cut in candidates if floor <= cut <= room and not _splits_fence(rest, cut)]
    if usable:
        return max(usable)[1]
    return _hard_cut(rest, room)


def _text_cuts(window: str, start: int, end: int, in_code: bool, out: list[tuple[int, int]]) -> None:
    """Boundaries inside one stretch of prose or code; a cut is the index just after the boundary."""
    segment = window[start:end]
    for match in re.finditer(r"\n", segment):
        blank_line = segment.startswith("\n", match.end())
        out.append((4 if blank_line and not in_code else 3, start + match.end()))
    if in_code:
        return
    for match in _SENTENCE_END.finditer(segment):
        out.append((2, start + match.end()))
    for match in re.finditer(r"[ \t]+", segment):
        out.append((1, start + match.end()))


def _splits_fence(rest: str, cut: int) -> bool:
    return any(rest[i : i + len(FENCE)] == FENCE for i in range(max(0, cut - len(FENCE) + 1), cut))


def _hard_cut(rest: str, room: int) -> int:
    """No boundary at all (one huge word or URL): cut at the room, but never through a fence marker."""
    cut = room
    while cut > 1 and _splits_fence(rest, cut):
        cut -= 1
    return cut
