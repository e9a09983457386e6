"""Cutting replies into messages (bot.render): pure, one rule at every platform's limit."""
from __future__ import annotations

import re

import pytest

from bot.platforms.discord_reply import DISCORD_LIMIT
from bot.platforms.slack_format import MESSAGE_LIMIT, STREAM_LIMIT
from bot.render import best_cut, close_open_fence, open_fence, split_message

LIMITS = pytest.mark.parametrize("limit", [DISCORD_LIMIT, MESSAGE_LIMIT, STREAM_LIMIT])


def _without_fence_lines(text: str) -> str:
    return re.sub(r"^```(?:python)?$\n?", "", text, flags=re.MULTILINE)


# -- boundaries ----------------------------------------------------------------------------------------------


def test_short_text_is_one_message():
    assert split_message("hello", DISCORD_LIMIT) == ["hello"]


def test_prose_splits_at_sentence_ends_and_rejoins_exactly():
    text = " ".join(f"This is sentence {i}, which goes on for a while." for i in range(150))

    parts = split_message(text, DISCORD_LIMIT)

    assert "".join(parts) == text
    assert all(len(p) <= 2000 for p in parts)
    assert all(p.rstrip().endswith(".") for p in parts)


def test_code_block_that_fits_moves_whole_to_the_next_message():
    intro = "Some context. " * 100
    code = "```sh\n" + "echo hi\n" * 100 + "```"

    parts = split_message(intro + "\n" + code, DISCORD_LIMIT)

    assert parts == [intro + "\n", code]


def test_text_without_spaces_is_hard_cut():
    text = "x" * 4500

    parts = split_message(text, DISCORD_LIMIT)

    assert [len(p) for p in parts] == [1996, 1996, 508]
    assert "".join(parts) == text


# -- code blocks ---------------------------------------------------------------------------------------------


def test_code_block_cut_is_closed_and_reopened_with_its_language():
    code = "\n".join(f"print({i})" for i in range(400))
    text = f"Here you go:\n```python\n{code}\n```\nDone."

    parts = split_message(text, DISCORD_LIMIT)

    assert len(parts) >= 2 and all(len(p) <= 2000 for p in parts)
    assert all(open_fence(p) is None for p in parts)  # each message renders on its own
    assert all(p.startswith("```python\n") for p in parts[1:])
    # Take away the added fences (a closing one ending each cut message, a reopening one starting the next)
    # and the reply is back, exactly.
    rebuilt = "".join(p[: -len("```")] for p in parts[:-1]) + parts[-1]
    assert rebuilt.replace("```python\n", "") == text.replace("```python\n", "")


def test_split_closes_and_reopens_code_blocks():
    text = "Intro\n```python\n" + "\n".join(f"x = {n}" for n in range(1500)) + "\n```\nDone."
    pieces = split_message(text, 2000)

    assert len(pieces) > 1 and all(len(p) <= 2000 for p in pieces)
    assert all(open_fence(p) is None for p in pieces)
    assert all(p.startswith("```python") for p in pieces[1:])


def test_only_the_language_of_an_info_string_is_carried():
    text = "```python title='a.py' {linenos}\n" + "x = 1\n" * 800 + "```"

    pieces = split_message(text, DISCORD_LIMIT)

    assert all(p.startswith("```python\n") for p in pieces[1:])


def test_a_fence_with_an_info_string_inside_a_block_is_code():
    assert open_fence("```md\nexample:\n```js\n") == "```md"
    assert open_fence("```md\nexample:\n```js\n```\n") is None


def test_a_fence_is_indented_three_columns_at_most():
    assert open_fence("   ```sh\nls\n") == "```sh"
    assert open_fence("    ```sh\nls\n") is None


def test_split_of_an_overlong_fence_line_stays_within_the_limit():
    pieces = split_message("```" + "a" * 5000, 3900)

    assert all(len(p) <= 3900 for p in pieces)


# -- inline code that starts a line --------------------------------------------------------------------------


def test_split_keeps_inline_code_at_a_line_start_out_of_the_next_piece():
    text = "```ls -la``` lists the folder.\n\n" + "word " * 1000
    pieces = split_message(text, 2000)

    assert len(pieces) > 1 and all(len(p) <= 2000 for p in pieces)
    assert " ".join("".join(pieces).split()) == " ".join(text.split())


def test_a_cut_never_makes_a_fence_out_of_inline_code():
    # Cut after "```ls " the first message would end in a fence line; cut before "```x" the next would start one.
    line = "```ls -la``` lists " + "the folder " * 30 + "then ```x``` again " + "and more " * 30
    for limit in range(60, len(line), 17):
        pieces = split_message(line, limit)
        assert "".join(pieces) == line and all(open_fence(p) is None for p in pieces)


@LIMITS
def test_every_platform_limit_handles_fences_the_same(limit):
    inline = "```ls -la``` lists the folder, and " + "so on " * 40 + "\n"
    code = "```python\n" + "".join(f"print({i})\n" for i in range(300)) + "```\n"
    text = (inline + code + "\n") * (3 * limit // len(inline + code) + 2)

    pieces = split_message(text, limit)

    assert len(pieces) > 1 and all(len(p) <= limit for p in pieces)
    assert all(open_fence(p) is None for p in pieces)
    # Inline code is never taken for a fence: nothing is closed or reopened but the Python block.
    fence_lines = {line for p in pieces for line in p.splitlines() if line.startswith("```")}
    assert fence_lines <= {"```python", "```"} | {line for line in fence_lines if line.startswith("```ls -la```")}
    assert "".join(_without_fence_lines(p) for p in pieces) == _without_fence_lines(text)


# -- streaming -----------------------------------------------------------------------------------------------


def test_open_fence_is_closed_while_streaming():
    assert close_open_fence("look:\n```js\nlet a", DISCORD_LIMIT) == "look:\n```js\nlet a\n```"
    assert close_open_fence("```js\nx\n```", DISCORD_LIMIT) == "```js\nx\n```"


def test_a_closing_fence_that_does_not_fit_is_left_out():
    text = "```js\n" + "x" * 1994

    assert close_open_fence(text, DISCORD_LIMIT) == text


def test_a_stream_cut_continues_the_code_block_it_is_in():
    sent = "Here:\n```python\nx = 1\n"
    more = "y = 2 if x else 3\n" * 20

    at = best_cut(sent, more, 100)

    assert at <= 100 and more[:at].endswith("\n")  # a line end: inside code, spaces are no boundary
    assert best_cut(sent, more, len(more)) == len(more)
