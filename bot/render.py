"""Cutting a reply into messages within a platform's length limit without breaking its Markdown.

One rule for every platform: Discord and Slack once had splitters that disagreed on what a code fence is, so the
same reply could be cut cleanly on one and turn a code block inside out on the other. Here a fence is what
CommonMark says: a whole line of at most three spaces or tabs, ``` and an info string without backticks, so
"```ls -la``` lists" is inline code everywhere. A platform only brings its own length limit.

A cut lands on the best boundary available near the end of the room left: the edge of a code block, then a blank
line, a line end, a sentence end, a space; only text with none of those is cut mid-word. A cut inside a code
block closes it in that message and reopens it, with its language, in the next, so every message renders on its
own. No cut goes through a fence line or makes a line that reads as one, unless the line alone is longer than a
message. Apart from the added fences the messages concatenate back to the reply exactly.
"""
from __future__ import annotations

import re
from typing import NamedTuple

FENCE = "```"
CLOSE = "\n```"
# A cut earlier than this share of the room wastes too much of a message; below it a worse boundary is used.
MIN_FILL = 0.5

_FENCE = re.compile(r"^[ \t]{0,3}```([^`\n]*)$", re.MULTILINE)
_LANGUAGE = re.compile(r"[\w+#.-]{1,30}")
_LONGEST_REOPEN = len(FENCE) + 30 + len("\n")
_SENTENCE_END = re.compile(r"[.!?…](?:[\"')\]]*)[ \t]+")
_NEWLINE = re.compile(r"\n")
_SPACES = re.compile(r"[ \t]+")


def split_message(text: str, limit: int) -> list[str]:
    """The messages `text` is sent as: each at most `limit` characters, none with a code block left open."""
    if limit <= _LONGEST_REOPEN + len(CLOSE):
        raise ValueError(f"limit {limit} is too small to split code blocks into")
    reply = _Reply(text)
    pieces: list[str] = []
    reopen = ""  # the fence that reopens a code block cut at the end of the previous message
    start = 0
    while len(reopen) + len(text) - start > limit:
        end = reply.cut(start, limit - len(reopen) - len(CLOSE))
        piece = reopen + text[start:end]
        fence = open_fence(piece)
        pieces.append(piece if fence is None else _closed(piece))
        reopen = "" if fence is None else fence + "\n"
        start = end
    pieces.append(reopen + text[start:])
    return [piece for piece in pieces if piece.strip()]


def best_cut(before: str, text: str, room: int) -> int:
    """How much of `text` goes into a message that holds `before` and has `room` characters left.

    For a message that grows in place (a stream), where what was sent can no longer move: `before` tells which
    code block and line `text` continues.
    """
    if len(text) <= room:
        return len(text)
    return _Reply(before + text).cut(len(before), room) - len(before)


def open_fence(text: str) -> str | None:
    """The fence that reopens a code block left open at the end of `text` ("```lang" or "```"), None if none is."""
    fences = _fences(text)
    if not fences or not fences[-1].opens:
        return None
    # Only the language comes along: the rest of an opening line was shown already, and may be long enough to
    # leave a continuation no room at all.
    language = _LANGUAGE.match(fences[-1].info.strip())
    return FENCE + (language.group() if language else "")


def close_open_fence(text: str, limit: int) -> str:
    """`text` with a dangling code block closed, for showing a reply still being written (if it fits)."""
    if open_fence(text) is None or len(_closed(text)) > limit:
        return text
    return _closed(text)


def _closed(text: str) -> str:
    return text + ("" if text.endswith("\n") else "\n") + FENCE


class _Fence(NamedTuple):
    start: int  # where its line starts
    end: int  # where the next line starts
    opens: bool
    info: str


def _fences(text: str) -> list[_Fence]:
    """The fence lines of `text` that open or close a code block."""
    fences: list[_Fence] = []
    inside = False
    for match in _FENCE.finditer(text):
        if inside and match.group(1).strip():
            continue  # CommonMark: a fence with an info string cannot close a block; "```js" in one is code
        inside = not inside
        fences.append(_Fence(match.start(), min(match.end() + 1, len(text)), inside, match.group(1)))
    return fences


class _Reply:
    """A text with its fence lines found once, for the cuts of all its messages."""

    def __init__(self, text: str):
        self.text = text
        self.fences = _fences(text)
        self._by_start = {fence.start: fence for fence in self.fences}
        self._by_end = {fence.end: fence for fence in self.fences}

    def cut(self, start: int, room: int) -> int:
        """Where to end the message that starts at `start`: an index in (start, start + room], on the best boundary.

        Only a room of 0 (a stream's message that is full) gives `start` itself.
        """
        stop = start + room
        floor = start + max(1, int(room * MIN_FILL))
        candidates: list[tuple[int, int]] = []  # (rank, cut); a higher rank is a better place to cut
        inside = False
        position = start
        for fence in self.fences:
            if fence.start < start:
                inside = fence.opens
                continue
            if fence.start > stop:
                break
            # Before an opening fence the code block moves whole to the next message; after a closing one it ended.
            candidates.append((5, fence.start if fence.opens else fence.end))
            self._text_cuts(position, fence.start, inside, candidates)
            position, inside = fence.end, fence.opens
        self._text_cuts(position, stop, inside, candidates)

        for _, cut in sorted(candidates, reverse=True):
            if floor <= cut <= stop and self._clean(cut):
                return cut
        # No boundary at all (one huge word or URL): cut mid-word, and through a fence line only if it fills a message.
        return next((cut for cut in range(stop, floor - 1, -1) if self._clean(cut)), stop)

    def _text_cuts(self, start: int, end: int, in_code: bool, out: list[tuple[int, int]]) -> None:
        """Boundaries inside one stretch of prose or code; a cut is the index just after the boundary."""
        for match in _NEWLINE.finditer(self.text, start, end):
            blank_line = self.text.startswith("\n", match.end())
            out.append((4 if blank_line and not in_code else 3, match.end()))
        if in_code:
            return
        for match in _SENTENCE_END.finditer(self.text, start, end):
            out.append((2, match.end()))
        for match in _SPACES.finditer(self.text, start, end):
            out.append((1, match.end()))

    def _clean(self, cut: int) -> bool:
        """Whether a cut here keeps fence lines whole, makes no new ones and leaves no code block empty."""
        line = self.text.rfind("\n", 0, cut) + 1
        if line == cut:
            before, after = self._by_end.get(cut), self._by_start.get(cut)
            return not (before and before.opens) and not (after and not after.opens)
        end = self.text.find("\n", cut)
        end = len(self.text) if end == -1 else end
        return not any(_FENCE.fullmatch(self.text[a:b]) for a, b in ((line, end), (line, cut), (cut, end)))
