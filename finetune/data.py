"""Training data: chat JSONL, persona examples, exported history and plain text, validated and split.

Bad rows never stop a run. Each one is dropped with a reason a user can act on ("data.jsonl:7: empty
assistant turn"), so a half-clean export still trains and the report says exactly what was left out.
The held-out split is by conversation and seeded, so the same data and seed always evaluate on the same rows.
"""
from __future__ import annotations

import hashlib
import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from bot.models.base import Message

if TYPE_CHECKING:
    from bot.config import Settings

ROLES = ("system", "user", "assistant")
MAX_CHARS = 100_000  # a single conversation beyond this is almost always a pasted log, not a dialogue


@dataclass(frozen=True)
class Example:
    """One training unit: a conversation (loss on assistant turns) or a text passage (loss on every token)."""

    source: str  # "file.jsonl:3", "persona comic", "history", "notes.txt §2"
    messages: tuple[Message, ...] = ()
    text: str | None = None

    @property
    def key(self) -> str:
        """Identity for de-duplication and the data hash: content only, whitespace-normalised."""
        if self.text is not None:
            return json.dumps({"text": _squash(self.text)}, ensure_ascii=False)
        return json.dumps([[m["role"], _squash(m["content"])] for m in self.messages], ensure_ascii=False)


@dataclass
class DataReport:
    kept: int = 0
    duplicates: int = 0
    dropped: list[str] = field(default_factory=list)  # "source: reason"
    sources: Counter = field(default_factory=Counter)  # kind -> examples read

    def drop(self, source: str, reason: str) -> None:
        self.dropped.append(f"{source}: {reason}")

    def summary(self) -> str:
        read = ", ".join(f"{n} from {kind}" for kind, n in self.sources.items()) or "nothing"
        lines = [f"data: read {read}; kept {self.kept}, dropped {len(self.dropped)}, duplicates removed {self.duplicates}"]
        lines += [f"  dropped {d}" for d in self.dropped[:20]]
        if len(self.dropped) > 20:
            lines.append(f"  ... and {len(self.dropped) - 20} more")
        return "\n".join(lines)


@dataclass
class Split:
    train: list[Example]
    eval: list[Example]
    report: DataReport

    @property
    def data_hash(self) -> str:
        """sha256 over the examples in split order: equal hashes mean the same training and held-out data."""
        h = hashlib.sha256()
        for name, part in (("train", self.train), ("eval", self.eval)):
            h.update(name.encode())
            for ex in part:
                h.update(ex.key.encode())
                h.update(b"\n")
        return h.hexdigest()


def _squash(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def validate_messages(messages: Any, max_chars: int = MAX_CHARS) -> tuple[list[Message], str | None]:
    """The conversation as clean Messages, or the reason it cannot train anything."""
    if not isinstance(messages, list) or not messages:
        return [], "no messages list"
    clean: list[Message] = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            return [], f"message {i} is not an object"
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            return [], f"message {i} has unknown role {role!r} (expected system, user or assistant)"
        if isinstance(content, list):  # OpenAI content parts: keep the text ones
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        if not isinstance(content, str):
            return [], f"message {i} ({role}) has no text content"
        if not content.strip():
            return [], f"empty {role} turn (message {i})"
        if role == "system" and i != 0:
            return [], f"system message at position {i} (only the first message may be system)"
        clean.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in clean):
        return [], "no assistant turn to learn from"
    if sum(len(m["content"]) for m in clean) > max_chars:
        return [], f"longer than {max_chars} characters"
    return clean, None


def conversations_from_rows(rows: Iterable[tuple[str, Any]], report: DataReport, kind: str) -> list[Example]:
    """Examples from (source, row) pairs where row is {"messages": [...]}; bad rows are reported."""
    out = []
    for source, row in rows:
        report.sources[kind] += 1
        if not isinstance(row, dict) or "messages" not in row:
            report.drop(source, 'not an object with a "messages" list')
            continue
        messages, problem = validate_messages(row["messages"])
        if problem:
            report.drop(source, problem)
            continue
        out.append(Example(source=source, messages=tuple(messages)))
    return out


def read_jsonl(path: Path, report: DataReport) -> list[Example]:
    """The OpenAI chat fine-tuning format: one {"messages": [...]} a line. Blank lines are skipped."""

    def rows() -> Iterator[tuple[str, Any]]:
        # A generator, so unparseable lines are reported in file order among the invalid ones.
        with open(path, encoding="utf-8", errors="replace") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path.name}:{n}", json.loads(line)
                except json.JSONDecodeError as exc:
                    report.sources["jsonl"] += 1
                    report.drop(f"{path.name}:{n}", f"invalid JSON ({exc.msg})")

    return conversations_from_rows(rows(), report, "jsonl")


def read_text(path: Path, report: DataReport, max_chars: int = 4000) -> list[Example]:
    """Plain text for language-model style tuning, cut at blank lines into passages of at most `max_chars`
    so the held-out split has several units to choose from; formatting packs them to the context."""
    text = path.read_text(encoding="utf-8", errors="replace")
    passages: list[str] = []
    current = ""
    for para in re.split(r"\n\s*\n", text):
        para = para.strip()
        if not para:
            continue
        if current and len(current) + len(para) + 2 > max_chars:
            passages.append(current)
            current = ""
        current = f"{current}\n\n{para}" if current else para
    if current:
        passages.append(current)
    report.sources["text"] += len(passages)
    if not passages:
        report.drop(path.name, "no text")
    return [Example(source=f"{path.name} §{i + 1}", text=p) for i, p in enumerate(passages)]


def persona_examples(system: str, examples: list[Message], name: str, report: DataReport) -> list[Example]:
    """A persona's few-shot turns as training conversations: the system prompt, then each user turn with the
    assistant reply that follows it, which is the shape they have at inference."""
    out = []
    pending: Message | None = None
    for m in examples:
        if m["role"] == "user":
            pending = m
        elif m["role"] == "assistant" and pending is not None:
            rows = [{"role": "system", "content": system}] if system.strip() else []
            rows += [pending, m]
            out += conversations_from_rows([(f"persona {name}", {"messages": rows})], report, "persona")
            pending = None
    return out


def with_system(examples: list[Example], system: str) -> list[Example]:
    """Conversations without a system turn get the persona's, so they train the voice it will run under."""
    if not system.strip():
        return examples
    sys_msg: Message = {"role": "system", "content": system}
    return [
        ex if ex.text is not None or ex.messages[0]["role"] == "system"
        else Example(source=ex.source, messages=(sys_msg, *ex.messages))
        for ex in examples
    ]


def dedupe(examples: list[Example], report: DataReport) -> list[Example]:
    seen: set[str] = set()
    out = []
    for ex in examples:
        if ex.key in seen:
            report.duplicates += 1
            continue
        seen.add(ex.key)
        out.append(ex)
    return out


def split_examples(examples: list[Example], eval_fraction: float, seed: int, report: DataReport) -> Split:
    """Held-out split by whole conversation, seeded. At least one eval example whenever a fraction is asked
    for and there are two or more examples; the training side is never left empty."""
    if not 0 <= eval_fraction < 1:
        raise ValueError(f"eval split must be in [0, 1), got {eval_fraction}")
    examples = dedupe(examples, report)
    report.kept = len(examples)
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    n_eval = 0
    if eval_fraction > 0 and len(examples) >= 2:
        n_eval = min(len(examples) - 1, max(1, round(len(examples) * eval_fraction)))
    held = set(order[:n_eval])
    return Split(
        train=[ex for i, ex in enumerate(examples) if i not in held],
        eval=[ex for i, ex in enumerate(examples) if i in held],
        report=report,
    )


async def history_examples(settings: "Settings", report: DataReport, persona: str | None = None) -> list[Example]:
    """Stored conversations (only those held with `persona`, when given), read through the same export
    `personabot history export` writes, from the store the bot uses (PostgreSQL or the SQLite file)."""
    from bot.history import open_history

    if not settings.database_url and not settings.db_path.exists():
        report.drop(str(settings.db_path), "no history database yet")
        return []
    store = await open_history(settings)
    try:
        rows = [(f"history #{i + 1}", row) async for i, row in _aenumerate(store.export(persona=persona))]
    finally:
        await store.close()
    return conversations_from_rows(rows, report, "history")


async def _aenumerate(it):  # type: ignore[no-untyped-def]
    i = 0
    async for x in it:
        yield i, x
        i += 1
