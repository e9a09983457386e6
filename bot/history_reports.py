"""What both history stores report, shaped once: `usage()`'s rows and `export()`'s conversations.

Each store runs the read its own way (SQLite's reader connection; a PostgreSQL cursor in a transaction) and
hands the rows here, so the two cannot drift in what a user sees from `/usage`, `personabot usage` or `personabot history export`.
"""
from __future__ import annotations

from collections.abc import AsyncIterable, AsyncIterator, Iterable, Sequence
from typing import Any

from bot.models.base import Message


def usage_rows(rows: Iterable[Sequence[Any]]) -> list[dict]:
    """`usage()` of either store: its rows, (platform, workspace, channel, persona, day, prompt tokens,
    completion tokens) each, as the dicts the CLI and `/usage` show, with each row's total."""
    return [
        {"platform": p, "workspace": w, "channel": c, "persona": persona, "day": day,
         "prompt_tokens": prompt, "completion_tokens": completion, "total": prompt + completion}
        for p, w, c, persona, day, prompt, completion in rows
    ]


def export_query(platform: str | None, channel: str | None, persona: str | None) -> tuple[str, list[str]]:
    """`export()`'s one read, in portable SQL (`?` placeholders), and its parameters: the messages that match
    the filters given, each conversation's together and in order, as `answered_conversations` takes them."""
    filters = {"platform": platform, "channel": channel, "persona": persona}
    where = [f"{column} = ?" for column, value in filters.items() if value is not None]
    params = [value for value in filters.values() if value is not None]
    sql = (
        "SELECT platform, workspace, channel, thread, context, role, content FROM messages"
        + (" WHERE " + " AND ".join(where) if where else "")
        + " ORDER BY platform, workspace, channel, thread, context, id"
    )
    return sql, params


async def answered_conversations(rows: AsyncIterable[Sequence[Any]]) -> AsyncIterator[dict]:
    """`export()` of either store: the rows of `export_query`, one `{"messages": [...]}` per conversation
    (one context of one key), oldest turn first.

    That is the OpenAI chat fine-tuning format; turns after the last reply are left out because a trainer
    learns only from assistant turns (a conversation with no reply is left out whole).
    """
    conversation: tuple | None = None
    turns: list[Message] = []
    async for *conv, role, content in rows:
        if tuple(conv) != conversation:
            if answered := _answered(turns):
                yield {"messages": answered}
            conversation, turns = tuple(conv), []
        turns.append({"role": role, "content": content})
    if answered := _answered(turns):
        yield {"messages": answered}


def _answered(turns: list[Message]) -> list[Message]:
    last = max((i for i, turn in enumerate(turns) if turn["role"] == "assistant"), default=-1)
    return turns[: last + 1]
