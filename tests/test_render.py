"""Cutting replies into messages (bot.render): pure, one rule at every platform's limit."""
from __future__ import annotations

import re

from bot.platforms.discord_reply import DISCORD_LIMIT
from bot.platforms.slack_format import MESSAGE_LIMIT, STREAM_LIMIT
from bot.render import best_cut, close_open_fence, open_fence, split_message


def _without_fence_lines(text: str) -> str:
    """`text` less its whole-line fences, the ones a cut may add."""
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
    # Cut inside the long inline code, a message would end in a line that reads as a fence; cut before the lone
    # ```, the next message would start with one.
    inline = "```ls" + " -la" * 60 + "``` lists the folder.\n"
    lone = "Type" + " a word" * 40 + " ``` to open a block.\n"
    for text in ((inline + "A line" + " of words" * 10 + ".\n") * 8, (lone + inline) * 8):
        for limit in range(300, len(text), 7):
            pieces = split_message(text, limit)
            assert "".join(pieces) == text and all(open_fence(p) is None for p in pieces)


def test_a_line_that_reads_as_a_fence_moves_whole_rather_than_being_cut():
    # Inside the block "```js…" is code (it has an info string, so it cannot close it), but cut after its "``"
    # the rest would read as a fence in the next message.
    text = "```md\n" + "z" * 900 + "\n```js" + "w" * 1200 + "\n```\n"

    pieces = split_message(text, DISCORD_LIMIT)

    assert pieces == ["```md\n" + "z" * 900 + "\n```", "```md\n```js" + "w" * 1200 + "\n```\n"]


def test_a_cut_leaves_no_code_block_empty():
    # The last line end that fits is right before the closing fence: a cut there would reopen an empty block.
    text = "```python\n" + "a" * (DISCORD_LIMIT - len("\n```") - len("```python\n") - 1) + "\n```\nDone."

    pieces = split_message(text, DISCORD_LIMIT)

    assert all(len(p) <= DISCORD_LIMIT for p in pieces) and not any("```python\n```" in p for p in pieces)


def test_discord_and_slack_limits_handle_fences_the_same():
    inline = "```ls -la``` lists the folder.\n"
    prose = "It shows " + "every file, " * 40 + "hidden ones too.\n\n"
    code = "```python\n" + "".join(f"print({i})\n" for i in range(300)) + "```\n"
    text = (inline + prose + code + "\n") * 40

    for limit in (DISCORD_LIMIT, MESSAGE_LIMIT, STREAM_LIMIT):
        pieces = split_message(text, limit)

        assert len(pieces) > 1 and all(len(p) <= limit for p in pieces)
        assert all(open_fence(p) is None for p in pieces)
        # Inline code is never taken for a fence: only the Python block is closed and reopened.
        fence_lines = {line for p in pieces for line in p.splitlines() if line.startswith("```")}
        assert fence_lines == {inline.strip(), "```python", "```"}
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


def test_a_stream_message_ends_at_its_last_line_end_rather_than_mid_word():
    sent = "Some words, " * 20 + "\n"
    more = "x" * 100

    assert best_cut(sent, more, 40) == 0
    assert best_cut("", more, 40) == 40  # a message holds something, though
