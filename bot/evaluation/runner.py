"""`personabot eval` from start to finish: variants built, the fine-tuned model trained, every question
answered through the engine, dynamism measured, everything graded into one report.

The four variants are one persona four ways; nothing else differs between them:

| variant | knowledge | model |
| --- | --- | --- |
| `base` | none | the persona's model (or `--base`) |
| `rag` | the collections | the same model |
| `finetuned` | none | that model fine-tuned on the persona's examples and the collections' documents |
| `finetuned+rag` | the collections | the fine-tuned model |

A neutral persona (a plain system prompt, no examples, the `base` model) answers the same questions too, as
the yardstick for style.
"""
from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from tqdm import tqdm
from transformers import TrainerCallback

from bot.config import Settings
from bot.evaluation import grading, scores
from bot.evaluation.answering import Answer, EvalError, Workbench, renamed, with_model
from bot.evaluation.questions import Question, read_questions
from bot.personas import Persona, PersonaLibrary, UnknownPersona

VARIANTS = ("base", "rag", "finetuned", "finetuned+rag")
NEUTRAL = "eval-neutral"
NEUTRAL_SYSTEM = "You are a helpful assistant. Answer the question plainly and briefly."
DOCUMENT_SUFFIXES = (".md", ".markdown", ".txt", ".text")  # what fine-tuning reads as plain text


@dataclass
class EvalConfig:
    persona: str
    questions: Path
    out: Path
    variants: list[str] = field(default_factory=lambda: list(VARIANTS))
    collections: list[str] | None = None  # default: the persona's knowledge
    base: str | None = None  # the model every variant starts from; default: the persona's own
    finetuned: Path | None = None  # an existing fine-tuned model dir instead of training one
    train_steps: int = 40
    learning_rate: float | None = None
    train_on_documents: bool = True
    dynamism: Path | None = None
    max_tokens: int | None = None
    allow_drafts: bool = False
    progress: bool = True
    seed: int = 42


def parse_variants(text: str) -> list[str]:
    wanted = [v.strip() for v in text.split(",") if v.strip()]
    unknown = [v for v in wanted if v not in VARIANTS]
    if unknown or not wanted:
        raise EvalError(f"unknown variant {', '.join(unknown) or '(none)'}; choose from {', '.join(VARIANTS)}")
    return list(dict.fromkeys(wanted))


class _NoCheckpoints(TrainerCallback):
    """An evaluation's model is trained once and thrown away with the report: resumable checkpoints would only
    cost a full write of weights and optimizer state every epoch."""

    def on_epoch_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        control.should_save = False

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        control.should_save = False


class _Run:
    def __init__(self, config: EvalConfig, settings: Settings, say: Callable[[str], None]):
        self.config, self.settings, self.say = config, settings, say
        self.warnings: list[str] = []

    # -- set-up ----------------------------------------------------------------------------------------

    async def persona(self) -> Persona:
        # Off the event loop: the library reads its folder by itself only where no loop runs.
        try:
            return await asyncio.to_thread(PersonaLibrary(self.settings.personas_dir).get, self.config.persona)
        except UnknownPersona as exc:
            raise EvalError(str(exc)) from None

    def questions(self) -> tuple[list[Question], list[Question]]:
        """The reporting set, and the questions the dynamism document answers (held out of it)."""
        found = read_questions(self.config.questions)
        if found.drafts:
            lines = ", ".join(str(q.line) for q in found.drafts[:10])
            message = (f"{self.config.questions}: {len(found.drafts)} row(s) are drafts from `eval make-questions` "
                       f"(lines {lines}): rewrite each question the way your users ask it, check its answer, and "
                       "delete \"draft\"")
            if not self.config.allow_drafts:
                raise EvalError(message + " (or pass --allow-drafts for a trial run)")
            self.warnings.append(message + "; this report used them unedited")
        if self.config.dynamism is None:
            return found.questions, []
        doc = self.config.dynamism
        if not doc.is_file():
            raise EvalError(f"--dynamism {doc}: no such file")
        later = [q for q in found.questions if q.answered_by(doc.name)]
        if not later:
            raise EvalError(f"--dynamism {doc}: no question in {self.config.questions} lists {doc.name} in its "
                            "\"sources\"; add the questions that document answers")
        return [q for q in found.questions if q not in later], later

    def base_model(self) -> dict[str, Any]:
        """Model settings every variant starts from: `--base` when given, else the persona's own."""
        if self.config.base:
            return {"backend": "local", "path": self.config.base}
        return {}

    def finetune_base(self, persona: Persona) -> str:
        if self.config.base:
            return self.config.base
        if (persona.model.backend or self.settings.backend) == "local":
            return persona.model.path or self.settings.local_model
        self.warnings.append(f"{persona.name} answers on the OpenAI backend; the fine-tuned variants start from "
                             f"the local model {self.settings.local_model} instead (pass --base to compare like "
                             "with like)")
        return self.settings.local_model

    def model_label(self, persona: Persona) -> str:
        spec = persona.model
        if (spec.backend or self.settings.backend) == "local":
            return spec.path or self.settings.local_model
        return spec.name or self.settings.openai_model

    def capped(self, persona: Persona) -> Persona:
        if self.config.max_tokens is None:
            return persona
        current = persona.model.max_tokens or self.settings.max_reply_tokens
        return with_model(persona, max_tokens=min(current, self.config.max_tokens))

    # -- fine-tuning -----------------------------------------------------------------------------------

    def train(self, base: str, out: Path, texts: list[Path], base_is_finetuned: bool = False) -> float:
        from finetune.train import FinetuneConfig, FinetuneError, run

        config = FinetuneConfig(
            out=out, base=base, persona=self.config.persona, text=texts, max_steps=self.config.train_steps,
            eval_split=0.0, seed=self.config.seed, learning_rate=self.config.learning_rate, samples=0,
            restart=True, progress=self.config.progress,
        )
        began = time.perf_counter()
        try:
            # Trainer prints its summary to stdout, which is the table's: it goes with the progress, to stderr.
            with contextlib.redirect_stdout(sys.stderr):
                run(config, self.settings, callbacks=[_NoCheckpoints()], echo=self.say)
        except FinetuneError as exc:
            raise EvalError(f"fine-tuning {'again ' if base_is_finetuned else ''}from {base}: {exc}") from None
        return time.perf_counter() - began


def _documents(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DOCUMENT_SUFFIXES)


async def evaluate(config: EvalConfig, settings: Settings, say: Callable[[str], None] = print) -> dict[str, Any]:
    """Runs the whole evaluation and returns the report (what report.json holds)."""
    run = _Run(config, settings, say)
    persona = await run.persona()
    main, later = run.questions()
    variants = list(config.variants)
    collections = list(config.collections or persona.knowledge)
    if any("rag" in v for v in variants) and not collections:
        raise EvalError(f"{persona.name} cites no knowledge: give --collection C for the rag variants")
    tuned = [v for v in variants if v.startswith("finetuned")]
    if config.finetuned is not None and not (config.finetuned / "config.json").is_file():
        raise EvalError(f"--finetuned {config.finetuned}: not a model dir (no config.json)")

    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    bench = await Workbench.open(settings, out / "work", collections)
    try:
        return await _evaluate(run, bench, persona, main, later, variants, collections, tuned)
    finally:
        await bench.close()


async def _evaluate(run: _Run, bench: Workbench, persona: Persona, main: list[Question], later: list[Question],
                    variants: list[str], collections: list[str], tuned: list[str]) -> dict[str, Any]:
    config, say = run.config, run.say
    out = Path(config.out)
    base_changes = run.base_model()
    training_seconds: float | None = None
    tuned_dir = config.finetuned.resolve() if config.finetuned else None
    texts = _documents(bench.work / "knowledge") if config.train_on_documents else []
    if tuned and tuned_dir is None:
        tuned_dir = (out / "finetuned").resolve()
        base = run.finetune_base(persona)
        documents = f" and {len(texts)} document(s)" if texts else ""
        say(f"fine-tuning {base} on {persona.name}'s examples{documents}, {config.train_steps} steps ...")
        training_seconds = await asyncio.to_thread(run.train, base, tuned_dir, texts)

    def variant_persona(variant: str, model_dir: Path | None = None) -> Persona:
        knowledge = collections if "rag" in variant else []
        changes = {"backend": "local", "path": str(model_dir or tuned_dir)} if variant.startswith("finetuned") \
            else base_changes
        name = f"{persona.name}-{variant.replace('+', '-')}"
        return run.capped(with_model(renamed(persona, name, knowledge=knowledge), **changes))

    personas = {v: variant_persona(v) for v in variants}
    for p in personas.values():
        await bench.add_persona(p)
    neutral = None
    if persona.examples:
        neutral = run.capped(with_model(Persona(name=NEUTRAL, display_name="Neutral", system=NEUTRAL_SYSTEM,
                                                model=persona.model), **base_changes))
        await bench.add_persona(neutral)
    else:
        run.warnings.append(f"{persona.name} has no example turns, so style is not scored")

    answers: dict[str, list[Answer]] = {}
    total = len(main) * (len(variants) + (neutral is not None))
    with tqdm(total=total, unit="answer", desc="answering", disable=not config.progress) as bar:
        for variant in variants + ([NEUTRAL] if neutral is not None else []):
            name = personas[variant].name if variant in personas else NEUTRAL
            answers[variant] = []
            for question in main:
                bar.set_postfix_str(variant)
                answers[variant].append(await bench.ask(variant, name, question))
                bar.update()

    dynamism = await _dynamism(run, bench, later, variants, personas, variant_persona, tuned_dir, collections) \
        if later else {}

    embed = bench.embed
    examples = [t["content"] for t in persona.examples if t["role"] == "assistant"]
    neutral_voice = scores.voice_similarity([a.said for a in answers.get(NEUTRAL, [])], examples, embed)
    report_variants: dict[str, Any] = {}
    rows: list[dict[str, Any]] = []
    for variant in variants:
        grades = [grading.grade(a, embed) for a in answers[variant]]
        voice = scores.voice_similarity([a.said for a in answers[variant]], examples, embed) if neutral else []
        summary = grading.summarize(
            answers[variant], grades, voice, neutral_voice,
            training_seconds=training_seconds if variant in tuned else None,
            index_seconds=bench.index_seconds if "rag" in variant else None)
        if summary["errors"]:
            run.warnings.append(f"{variant}: {summary['errors']} of {len(grades)} replies were the engine's error "
                                "notice, not the model's words")
        report_variants[variant] = {
            "persona": personas[variant].name,
            "model": run.model_label(personas[variant]),
            "knowledge": list(personas[variant].knowledge),
            **summary,
            "dynamism": dynamism.get(variant),
        }
        rows += [grading.answer_row(a, g, voice[i] if voice else None)
                 for i, (a, g) in enumerate(zip(answers[variant], grades))]
    rows += [grading.answer_row(a, grading.Grade(), neutral_voice[i] if neutral_voice else None)
             for i, a in enumerate(answers.get(NEUTRAL, []))]
    return {
        "persona": persona.name,
        "questions_file": str(config.questions),
        "questions": len(main),
        "dynamism_questions": len(later),
        "collections": collections,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "settings": {"train_steps": config.train_steps, "learning_rate": config.learning_rate,
                     "train_on_documents": config.train_on_documents, "max_tokens": config.max_tokens,
                     "finetuned": str(tuned_dir) if tuned_dir else None, "base": config.base},
        "thresholds": {"support_overlap": scores.SUPPORT_OVERLAP, "support_similarity": scores.SUPPORT_SIMILARITY,
                       "correct_recall": scores.CORRECT_RECALL, "min_claim_words": scores.MIN_CLAIM_WORDS},
        "neutral": {"voice_similarity": scores.mean(neutral_voice), "system": NEUTRAL_SYSTEM} if neutral else None,
        "variants": report_variants,
        "warnings": run.warnings,
        "answers": rows,
    }


async def _dynamism(run: _Run, bench: Workbench, later: list[Question], variants: list[str],
                    personas: dict[str, Persona], variant_persona: Callable[..., Persona], tuned_dir: Path | None,
                    collections: list[str]) -> dict[str, Any]:
    """Adds the new document, then per variant: its own way of learning it (RAG: a sync; fine-tuning alone: a
    retrain on the persona's examples and the document, from the fine-tuned model), then the questions it
    answers asked again. `seconds` = update + answering, reported when at least half come back correct."""
    config, say = run.config, run.say
    doc = config.dynamism
    assert doc is not None
    sync_seconds = None
    if any("rag" in v for v in variants):
        say(f"dynamism: adding {doc.name} to {collections[0]} and syncing ...")
        sync_seconds = await bench.add_document(doc, collections[0])
    results: dict[str, Any] = {}
    for variant in variants:
        name = personas[variant].name
        if "rag" in variant:
            update, seconds = "sync", sync_seconds or 0.0
        elif variant == "finetuned" and tuned_dir is not None:
            say(f"dynamism: fine-tuning {tuned_dir.name} again with {doc.name} ...")
            retrained = (Path(config.out) / "finetuned-updated").resolve()
            seconds = await asyncio.to_thread(run.train, str(tuned_dir), retrained, [doc], True)
            update = "retrain"
            updated = renamed(variant_persona(variant, retrained), f"{name}-updated")
            await bench.add_persona(updated)
            name = updated.name
        else:
            update, seconds = "none", 0.0
        answers = [await bench.ask(variant, name, q) for q in later]
        verdicts = [scores.correct(a.said, q.answer) for a, q in zip(answers, later) if q.answer]
        share = scores.mean(verdicts)
        answering = sum(a.seconds for a in answers)
        results[variant] = {
            "update": update,
            "update_seconds": round(seconds, 3),
            "answer_seconds": round(answering, 3),
            "correct": share,
            "seconds": round(seconds + answering, 3) if share is not None and share >= 0.5 else None,
            "replies": [a.shown for a in answers],
        }
    return results
