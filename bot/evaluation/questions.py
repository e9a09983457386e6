"""The question file `personabot eval` reports on, and the drafts `eval make-questions` writes for a person to edit.

One JSON object a line: `{"question", "answer"?, "sources"?, "answerable"?, "draft"?}`. `answer` is the
reference the replies are scored against; `sources` names the documents that answer it (`collection/file.md`
or just `file.md`); `answerable: false` marks a question nobody's documents answer, where the right reply is
to decline. A drafted row carries `"draft": true` until a person has rewritten it in their users' words and
checked its answer: a report on questions nobody read would measure the template, not the bot.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from bot.retrieval.parse import FORMATS, UnsupportedDocument, parse

FIELDS = {"question", "answer", "sources", "answerable", "draft"}
UNANSWERABLE_PLACEHOLDER = "REPLACE: a question your users ask that these documents do not answer"


class QuestionFileError(ValueError):
    """A question file that cannot be used; `.errors` are "file:line: problem" lines."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


@dataclass(frozen=True)
class Question:
    text: str
    answer: str | None = None
    sources: tuple[str, ...] = ()
    answerable: bool = True
    draft: bool = False
    line: int = 0

    @property
    def scored_for_accuracy(self) -> bool:
        return self.answerable and bool(self.answer)

    def answered_by(self, document: str) -> bool:
        """Whether `document` (a file name or collection/file path) is one of this question's sources."""
        name = PurePosixPath(document).name
        return any(s == document or PurePosixPath(s).name == name for s in self.sources)


@dataclass
class QuestionSet:
    path: Path
    questions: list[Question] = field(default_factory=list)

    @property
    def drafts(self) -> list[Question]:
        return [q for q in self.questions if q.draft]


def read_questions(path: Path) -> QuestionSet:
    """Every row validated; all problems are reported at once, each with its line."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise QuestionFileError([f"{path}:1: cannot read: {exc}"]) from None
    errors: list[str] = []
    found = QuestionSet(Path(path))
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            errors.append(f"{where}: not JSON ({exc.msg})")
            continue
        if not isinstance(row, dict):
            errors.append(f"{where}: a row is an object like {{\"question\": ..., \"answer\": ...}}")
            continue
        problems = _problems(row)
        if problems:
            errors += [f"{where}: {p}" for p in problems]
            continue
        found.questions.append(Question(
            text=row["question"].strip(), answer=(row.get("answer") or "").strip() or None,
            sources=tuple(row.get("sources") or ()), answerable=row.get("answerable", True),
            draft=bool(row.get("draft", False)), line=number,
        ))
    if not errors and not found.questions:
        errors.append(f"{path}:1: no questions")
    if errors:
        raise QuestionFileError(errors)
    return found


def _problems(row: dict) -> list[str]:
    problems = [f"unknown key {key!r} (a row has {', '.join(sorted(FIELDS))})" for key in row if key not in FIELDS]
    if not isinstance(row.get("question"), str) or not row["question"].strip():
        problems.append("\"question\" must be non-empty text")
    if "answer" in row and row["answer"] is not None and not isinstance(row["answer"], str):
        problems.append("\"answer\" must be text")
    sources = row.get("sources")
    if sources is not None and not (isinstance(sources, list) and all(isinstance(s, str) for s in sources)):
        problems.append("\"sources\" must be a list of document names")
    for key in ("answerable", "draft"):
        if key in row and not isinstance(row[key], bool):
            problems.append(f"\"{key}\" must be true or false")
    if row.get("answerable", True) is False and row.get("answer"):
        problems.append("an unanswerable question has no \"answer\"; drop one of the two")
    return problems


def format_questions(questions: list[Question]) -> str:
    """The question file's text for these rows, as `read_questions` reads it back."""
    return "".join(json.dumps(_row(q), ensure_ascii=False) + "\n" for q in questions)


def _row(q: Question) -> dict:
    row: dict = {"question": q.text}
    if q.answer:
        row["answer"] = q.answer
    if q.sources:
        row["sources"] = list(q.sources)
    if not q.answerable:
        row["answerable"] = False
    if q.draft:
        row["draft"] = True
    return row


# ---------------------------------------------------------------------------------------------------- drafting

MIN_WORDS = 8  # a paragraph shorter than this is a caption or a list stub, not something people ask about
_SENTENCE = re.compile(r"(?<=[.!?])\s+")


def draft_questions(collection_dir: Path, limit: int = 20) -> list[Question]:
    """Draft rows from a collection's documents: one per paragraph, spread over the files, plus one
    unanswerable placeholder. Each question names the paragraph's heading and the answer is its first sentence:
    a scaffold for a person, who rewrites the question as a user would say it and checks the answer."""
    collection_dir = Path(collection_dir)
    per_file: list[list[Question]] = []
    for path in sorted(p for p in collection_dir.rglob("*") if p.is_file() and p.suffix.lower() in FORMATS):
        source = f"{collection_dir.name}/{path.relative_to(collection_dir).as_posix()}"
        try:
            document = parse(path.name, path.read_bytes())
        except (UnsupportedDocument, OSError):
            continue
        rows = []
        for block in document.blocks:
            text = " ".join(block.text.split())
            if len(text.split()) < MIN_WORDS or text.startswith(("```", "|")):
                continue
            topic = block.section.split(" › ")[-1] if block.section else document.title
            answer = _SENTENCE.split(text, maxsplit=1)[0]
            rows.append(Question(f"What should I know about {topic}?", answer, (source,), draft=True))
        per_file.append(rows)
    drafted: list[Question] = []
    while len(drafted) < max(limit - 1, 1) and any(per_file):  # round-robin, so every document gets asked about
        for rows in per_file:
            if rows and len(drafted) < max(limit - 1, 1):
                drafted.append(rows.pop(0))
    drafted.append(Question(UNANSWERABLE_PLACEHOLDER, answerable=False, draft=True))
    return drafted
