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

Below the splitter: the notices the bot adds to or gives instead of a model's answer, and the text the commands
answer with (a persona, search hits, a usage chart), in the Markdown
every platform renders (Slack's adapter converts it to mrkdwn), so the wording is the same everywhere.
"""
from __future__ import annotations

import re
from bisect import bisect_right
from collections import defaultdict
from typing import TYPE_CHECKING, NamedTuple

from bot.personas import Persona

if TYPE_CHECKING:
    from bot.retrieval import Hit

FENCE = "```"
CLOSE = "\n```"
# A cut earlier than this share of the room wastes too much of a message; below it a worse boundary is used.
MIN_FILL = 0.5

_FENCE = re.compile(r"^[ \t]{0,3}```([^`\n]*)$", re.MULTILINE)
_FENCE_TEXT = re.compile(r"[ \t]{0,3}```[^`\n]*")  # _FENCE for a stretch of one line, matched in place
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
        room = limit - len(reopen) - len(CLOSE)
        end = reply.cut(start + 1, start + room, start + max(1, int(room * MIN_FILL)))
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
    code block and line `text` continues, and 0 means the message had best end as it is.
    """
    if len(text) <= room:
        return len(text)
    stop = len(before) + room
    earliest = len(before) if before else 1  # a message must hold something
    return _Reply(before + text).cut(earliest, stop, max(earliest, int(stop * MIN_FILL))) - len(before)


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
    """A text with its lines and fences found once, for the cuts of all its messages."""

    def __init__(self, text: str):
        self.text = text
        self.fences = _fences(text)
        self._lines = [0, *(match.end() for match in _NEWLINE.finditer(text))]  # where each line starts
        self._fence_like = {match.start() for match in _FENCE.finditer(text)}  # lines that read as a fence
        self._opening_ends = {fence.end for fence in self.fences if fence.opens}
        self._closing_starts = {fence.start for fence in self.fences if not fence.opens}

    def cut(self, earliest: int, stop: int, floor: int) -> int:
        """Where to end a message: an index in [earliest, stop], on the best boundary from `floor` on if any."""
        candidates: list[tuple[int, int]] = []  # (rank, cut); a higher rank is a better place to cut
        inside = False
        position = max(earliest - 1, 0)  # a boundary just before `earliest` is a cut at it
        for fence in self.fences:
            if fence.start < position:
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
        # No boundary late enough (one huge word or URL): cut mid-word, or before a fence line rather than through
        # it; through one only if it fills the whole room.
        return next((cut for cut in range(stop, earliest - 1, -1) if self._clean(cut)), stop)

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
        index = bisect_right(self._lines, cut) - 1
        line = self._lines[index]
        if line == cut:
            return cut not in self._opening_ends and cut not in self._closing_starts
        end = self._lines[index + 1] - 1 if index + 1 < len(self._lines) else len(self.text)
        return not (
            line in self._fence_like
            or _FENCE_TEXT.fullmatch(self.text, line, cut)
            or _FENCE_TEXT.fullmatch(self.text, cut, end)
        )


# -- notices: what the bot says when an answer cannot be the model's alone ------------------------------

CUT_OFF_NOTICE = "\n\n_(reply cut off: it reached the length limit)_"
UNFINISHED_NOTICE = "\n\n_(reply cut off. {error})_"  # the model failed after the reader saw part of the reply
CONTENT_FILTER_NOTICE = "Sorry, I can't help with that one. The model's content filter stopped the reply."
BUDGET_NOTICE = (
    "This channel has used its daily token budget ({budget:,} tokens). "
    "I'll be back tomorrow (UTC), or an admin can raise PERSONABOT_DAILY_TOKEN_BUDGET."
)
ERROR_NOTICE = "Sorry, I couldn't answer that: {error}"
EMPTY_REPLY = "_(the model returned an empty reply)_"
FAILURE_NOTICE = "Sorry, something went wrong on my side while answering ({error}). Please try again."
KNOWLEDGE_OFF = (
    "Knowledge is not enabled on this bot, so there are no documents to add or search. "
    "The operator can turn it on by installing the knowledge extras and restarting."
)

# Images and files that came with a message (bot/attachments.py): one line each, before the reply.
ATTACHMENT_NOTICE = "_({reason})_"
IMAGES_UNSEEN = "this persona's model can't see images; I read your text only"
TOO_MANY_FILES = "I read the first {limit} of the {count} files you sent (at most {limit} a message)"
FILE_TOO_BIG = "I left out {name}: it is {size}, and {kind} may be at most {limit}"
NOT_AN_IMAGE = "I left out {name}: it isn't a PNG, JPEG, GIF or WebP image{looks_like}"
NOT_TEXT = "I left out {name}: it isn't UTF-8 text"
NOT_READABLE = "I left out {name}: I read images and text files only"
NOT_DOWNLOADED = "I left out {name}: I couldn't download it"


# -- what the commands answer with ------------------------------------------------------------

PROMPT_SHOWN = 1500  # characters of a system prompt `/persona show` prints: one Discord message with the header
BAR_WIDTH = 24


def clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_persona(persona: Persona, *, origin: str, active: bool) -> str:
    model = persona.model.model_dump(exclude_none=True)
    lines = [
        f"**{persona.display_name}** (`{persona.name}`, {origin})" + (": active here" if active else ""),
        persona.description,
        f"Avatar: {persona.avatar}" if persona.avatar else "",
        f"Model: `{model}`" if model else "Model: the default",
        f"Knowledge: {', '.join(persona.knowledge)}" if persona.knowledge else "",
        f"Few-shot examples: {len(persona.examples)}" if persona.examples else "",
    ]
    prompt = clip(persona.system.replace("```", "`\u200b``"), PROMPT_SHOWN)
    return "\n".join(line for line in lines if line) + f"\n```\n{prompt}\n```"


def format_hits(hits: list["Hit"]) -> str:
    return "\n".join(f"**{hit.source}** § {hit.locator} ({hit.score:.2f})\n> {clip(' '.join(hit.text.split()), 300)}"
                     for hit in hits)


def usage_chart(rows: list[dict]) -> str:
    """Tokens a day as a bar chart (people would rather look than read), then the totals by persona."""
    by_day: dict[str, int] = defaultdict(int)
    by_persona: dict[str, int] = defaultdict(int)
    for row in rows:
        by_day[row["day"]] += row["total"]
        by_persona[row["persona"] or "-"] += row["total"]
    peak = max(by_day.values())
    days = [f"{day[5:]} {'█' * max(1, round(BAR_WIDTH * total / peak)):<{BAR_WIDTH}} {total:>9,}"
            for day, total in sorted(by_day.items())]
    personas = ", ".join(f"{name} {total:,}" for name, total in sorted(by_persona.items(), key=lambda p: -p[1]))
    return (f"Tokens by day (UTC), {sum(by_day.values()):,} in all:\n```\n" + "\n".join(days) + "\n```\n"
            f"By persona: {personas}")
