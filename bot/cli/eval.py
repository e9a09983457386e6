"""`personabot eval …`: score RAG against fine-tuning for one persona, and draft the question file it reads."""
from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Optional

import typer

from bot.config import Settings

app = typer.Typer(
    help="Score a persona's variants (base, rag, finetuned, finetuned+rag) on accuracy, hallucination, "
         "transparency, style, dynamism and cost.",
    invoke_without_command=True, no_args_is_help=True,
)


def _say(line: str) -> None:
    typer.echo(line, err=True)


@app.callback()
def evaluate(
    ctx: typer.Context,
    persona: Annotated[Optional[str], typer.Option(help="The persona to evaluate.")] = None,
    questions: Annotated[Optional[Path], typer.Option(help="Question file: one {\"question\", \"answer\"?, \"sources\"?, \"answerable\"?} a line.")] = None,
    variants: Annotated[str, typer.Option(help="Comma-separated: base, rag, finetuned, finetuned+rag.")] = "base,rag,finetuned,finetuned+rag",
    collection: Annotated[Optional[list[str]], typer.Option(help="Collection the rag variants cite (repeatable; default: the persona's knowledge).")] = None,
    base: Annotated[Optional[str], typer.Option(help="Model every variant starts from (default: the persona's own).")] = None,
    finetuned: Annotated[Optional[Path], typer.Option(help="An existing fine-tuned model dir, instead of training one.")] = None,
    train_steps: Annotated[int, typer.Option(help="Optimizer steps when fine-tuning (here and for dynamism).")] = 40,
    learning_rate: Annotated[Optional[float], typer.Option(help="Fine-tuning learning rate (default: finetune's).")] = None,
    train_on_documents: Annotated[bool, typer.Option(help="Fine-tune on the collections' text files as well as the persona's examples.")] = True,
    dynamism: Annotated[Optional[Path], typer.Option(help="A new document: added after the run, then the questions that list it in \"sources\" are asked again.")] = None,
    max_tokens: Annotated[Optional[int], typer.Option(help="Cap reply tokens for every variant (keeps a run bounded).")] = None,
    allow_drafts: Annotated[bool, typer.Option("--allow-drafts", help="Run on rows still marked \"draft\" (a trial, not a report).")] = False,
    out: Annotated[Optional[Path], typer.Option(help="Folder for report.json, report.png and the work (default: <data dir>/eval/<persona>).")] = None,
    progress: Annotated[bool, typer.Option(help="Progress bars on stderr.")] = True,
) -> None:
    """Answer every question with each variant through the engine, score them, and write report.json and
    report.png; prints the table."""
    if ctx.invoked_subcommand is not None:
        return
    if not persona or not questions:
        typer.echo("error: give --persona P and --questions F.jsonl (or see `personabot eval make-questions`)", err=True)
        raise typer.Exit(2)
    from bot.evaluation import EvalConfig, EvalError, QuestionFileError, evaluate as run_eval
    from bot.evaluation.report import table, write_json, write_png
    from bot.evaluation.runner import parse_variants

    settings = Settings()
    try:
        config = EvalConfig(
            persona=persona, questions=questions, out=out or settings.data_dir / "eval" / persona,
            variants=parse_variants(variants), collections=list(collection) if collection else None, base=base,
            finetuned=finetuned, train_steps=train_steps, learning_rate=learning_rate,
            train_on_documents=train_on_documents, dynamism=dynamism, max_tokens=max_tokens,
            allow_drafts=allow_drafts, progress=progress,
        )
        report = asyncio.run(run_eval(config, settings, say=_say))
    except (EvalError, QuestionFileError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(table(report))
    _say(f"wrote {write_json(report, config.out)} and {write_png(report, config.out)}")


@app.command("make-questions")
def make_questions(
    collection: Annotated[str, typer.Option(help="The collection (a folder in PERSONABOT_KNOWLEDGE_DIR) to draft from.")],
    out: Annotated[Optional[Path], typer.Option(help="Write the drafts here (default: stdout).")] = None,
    limit: Annotated[int, typer.Option(help="Most rows to draft, spread over the documents.")] = 20,
) -> None:
    """Draft a question file from a collection, every row marked "draft": true for a person to edit.

    Rewrite each question the way your users would ask it, check the answer, add questions the documents do not
    answer as {"question": ..., "answerable": false}, and delete "draft"; `eval` refuses drafts.
    """
    from bot.evaluation.questions import draft_questions, format_questions

    folder = Settings().knowledge_dir / collection
    if not folder.is_dir():
        typer.echo(f"error: no collection {collection!r}: {folder} is not a folder", err=True)
        raise typer.Exit(1)
    drafted = draft_questions(folder, limit)
    if out is None:
        typer.echo(format_questions(drafted), nl=False)
    else:
        out.write_text(format_questions(drafted), encoding="utf-8")
    _say(f"drafted {len(drafted)} rows from {folder}: rewrite each question in your users' words, check its answer, "
         "then delete \"draft\" (eval refuses rows still marked draft)")
