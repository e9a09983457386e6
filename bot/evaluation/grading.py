"""Each answer graded with the rules in `scores.py`, then each variant summed up into the report's figures.

Only the model's own words are graded (`Answer.said`): the sources footer the engine appends lists every
passage shown, whatever the model did with them, and would otherwise count as the model's citation work.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bot.evaluation import scores
from bot.evaluation.answering import Answer
from bot.evaluation.scores import Embed


@dataclass
class Grade:
    f1: float | None = None  # questions with a reference answer only
    similarity: float | None = None
    correct: bool | None = None
    claims: int = 0  # sentences that assert something (answerable questions)
    unsupported: int = 0  # of which no shown passage and no reference supports
    declined: bool = False
    answered_unanswerable: bool | None = None  # unanswerable questions only: answered instead of declining
    transparent: bool | None = None  # answerable questions only: a cited passage supports one of its claims
    cited: list[int] = field(default_factory=list)  # passage numbers the answer's citations point at


def citations(answer: Answer) -> list[int]:
    """The passages an answer cites: the numbers it writes (`[2]`); when it writes none, every passage the
    sources footer lists, which is what the user is shown as its sources."""
    written = scores.cited_numbers(answer.said)
    return written if written else list(range(1, len(answer.passages) + 1))


def grade(answer: Answer, embed: Embed) -> Grade:
    q, said = answer.question, answer.said
    result = Grade(declined=scores.declines(said))
    if not q.answerable:
        result.answered_unanswerable = not result.declined
        return result
    claimed = scores.claims(said)
    evidence = [p.text for p in answer.passages] + ([q.answer] if q.answer else [])
    result.claims = len(claimed)
    result.unsupported = sum(not ok for ok in scores.supported(claimed, evidence, embed))
    if q.answer:
        result.f1 = scores.token_f1(said, q.answer)
        result.similarity = scores.similarity(said, q.answer, embed) if said.strip() else 0.0
        result.correct = scores.correct(said, q.answer)
    # Transparent: a reader who follows the answer's citations finds something it says in the cited passage.
    result.cited = citations(answer)
    cited = [answer.passages[n - 1].text for n in result.cited if 1 <= n <= len(answer.passages)]
    result.transparent = any(scores.supported(claimed, cited, embed)) if cited and claimed else False
    return result


def summarize(answers: list[Answer], grades: list[Grade], voice: list[float], neutral_voice: list[float],
              *, training_seconds: float | None, index_seconds: float | None) -> dict[str, Any]:
    """One variant's figures. `voice[i]` and `neutral_voice[i]` are the i-th question's similarity to the
    persona's example replies, for this variant and for the neutral persona."""
    scored = [g for g in grades if g.f1 is not None]
    claims = sum(g.claims for g in grades)
    unanswerable = [g for g in grades if g.answered_unanswerable is not None]
    answerable = [g for g in grades if g.transparent is not None]
    margins = [v - n for v, n in zip(voice, neutral_voice)]
    return {
        "accuracy": {
            "f1": scores.mean([g.f1 for g in scored]),
            "similarity": scores.mean([g.similarity for g in scored]),
            "correct": scores.mean([g.correct for g in scored]),
            "questions": len(scored),
        },
        "hallucination": {
            "unsupported_sentences": sum(g.unsupported for g in grades) / claims if claims else None,
            "sentences": claims,
            "answered_unanswerable": scores.mean([g.answered_unanswerable for g in unanswerable]),
            "unanswerable_questions": len(unanswerable),
        },
        "transparency": {
            "cited_support": scores.mean([g.transparent for g in answerable]),
            "questions": len(answerable),
        },
        "style": {
            "margin": scores.mean(margins),
            "wins": scores.mean([m > 0 for m in margins]),
            "voice_similarity": scores.mean(voice),
            "questions": len(margins),
        },
        "errors": sum(not a.said.strip() for a in answers),  # replies where the model said nothing (an engine notice)
        "cost": {
            "prompt_tokens": scores.mean([a.prompt_tokens for a in answers]),
            "completion_tokens": scores.mean([a.completion_tokens for a in answers]),
            "seconds_per_answer": scores.mean([a.seconds for a in answers]),
            "training_seconds": training_seconds,
            "index_seconds": index_seconds,
        },
    }


def answer_row(answer: Answer, grade_: Grade, voice: float | None) -> dict[str, Any]:
    """One answer as report.json keeps it, so every figure can be traced to the replies behind it."""
    return {
        "variant": answer.variant,
        "question": answer.question.text,
        "reference": answer.question.answer,
        "answerable": answer.question.answerable,
        "reply": answer.shown,
        "passages": [p.citation for p in answer.passages],
        "seconds": round(answer.seconds, 3),
        "prompt_tokens": answer.prompt_tokens,
        "completion_tokens": answer.completion_tokens,
        "finish_reason": answer.finish_reason,
        "voice_similarity": voice,
        **asdict(grade_),
    }
