"""`personabot history export`, `history copy` and `personabot usage`: the stored conversations, moving them
from SQLite to PostgreSQL, and what they cost."""
from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import date
from pathlib import Path
from typing import Annotated, Optional

import typer
from tqdm import tqdm

from bot.config import Settings
from bot.conversation import Workspace
from bot.history import open_history

app = typer.Typer(no_args_is_help=True)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="JSONL file to write; `-` for stdout.")],
    platform: Annotated[Optional[str], typer.Option(help="Only this platform (discord, slack, terminal).")] = None,
    channel: Annotated[Optional[str], typer.Option(help="Only this channel id.")] = None,
    persona: Annotated[Optional[str], typer.Option(help="Only conversations held with this persona.")] = None,
) -> None:
    """Write stored conversations as OpenAI chat fine-tuning JSONL (what `finetune --data` reads)."""
    settings = _existing_history()
    if str(out) == "-":
        count = asyncio.run(_export(settings, sys.stdout, platform, channel, persona))
        typer.echo(f"Wrote {count} conversations.", err=True)
        return
    # Written beside the target and renamed at the end, so a failure never leaves half a file behind.
    partial = out.with_name(out.name + ".partial")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        with partial.open("w", encoding="utf-8") as f:
            count = asyncio.run(_export(settings, f, platform, channel, persona))
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    typer.echo(f"Wrote {count} conversations to {out}.")


async def _export(settings: Settings, f, platform: str | None, channel: str | None, persona: str | None) -> int:  # type: ignore[no-untyped-def]
    store = await open_history(settings)
    count = 0
    try:
        with tqdm(desc="conversations", unit="conv", disable=None, file=sys.stderr) as progress:
            async for conversation in store.export(platform=platform, channel=channel, persona=persona):
                f.write(json.dumps(conversation, ensure_ascii=False) + "\n")
                count += 1
                progress.update()
    finally:
        await store.close()
    return count


@app.command()
def copy(
    to: Annotated[str, typer.Option("--to", help="postgresql:// URL of a database no bot has used yet.")],
) -> None:
    """Copy the SQLite history (conversations, personas, settings, audit, Slack installs) into PostgreSQL."""
    from bot.history_copy import SKIPPED, TargetNotEmpty, copy_history
    from bot.history_pg import redacted

    if not to.startswith(("postgresql://", "postgres://")):
        raise typer.BadParameter("must be a postgresql:// URL", param_hint="--to")
    settings = Settings()
    if not settings.db_path.exists():
        typer.echo(f"No history to copy: {settings.db_path} does not exist (check PERSONABOT_DATA_DIR).", err=True)
        raise typer.Exit(1)
    try:
        copied = asyncio.run(copy_history(settings.db_path, to))
    except TargetNotEmpty as exc:
        typer.echo(f"Refused: {exc}. Nothing was written.", err=True)
        raise typer.Exit(1) from None
    width = max(len(c.table) for c in copied)
    for c in copied:
        typer.echo(f"{c.table.ljust(width)}  {c.rows:>9,} row{'' if c.rows == 1 else 's'}")
    typer.echo(f"Copied {sum(c.rows for c in copied):,} rows from {settings.db_path} into {redacted(to)}; not copied"
               f" (the target's own, or rebuilt by themselves): {', '.join(sorted(SKIPPED))}.")


def usage(
    since: Annotated[Optional[str], typer.Option(help="First UTC day to include, as YYYY-MM-DD.")] = None,
    workspace: Annotated[Optional[str], typer.Option(help="Only this workspace, e.g. discord:1234.")] = None,
) -> None:
    """Tokens spent by platform, channel, persona and day (from the usage the models reported)."""
    try:
        first_day = date.fromisoformat(since) if since else None
    except ValueError:
        raise typer.BadParameter(f"{since!r} is not a date; use YYYY-MM-DD, e.g. 2025-01-31", param_hint="--since")
    try:
        where = Workspace.parse(workspace) if workspace else None
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workspace") from None
    rows = asyncio.run(_usage(_existing_history(), first_day, where))
    if not rows:
        typer.echo("No token usage recorded" + (f" since {first_day}." if first_day else "."))
        return
    header = ("day", "platform", "channel", "persona", "prompt", "completion", "total")
    table = [header] + [
        (r["day"], r["platform"], f"{r['workspace']}/{r['channel']}" if r["workspace"] else r["channel"],
         r["persona"] or "-", f"{r['prompt_tokens']:,}", f"{r['completion_tokens']:,}", f"{r['total']:,}")
        for r in rows
    ]
    table.append(("total", "", "", "", f"{sum(r['prompt_tokens'] for r in rows):,}",
                  f"{sum(r['completion_tokens'] for r in rows):,}", f"{sum(r['total'] for r in rows):,}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        cells = [cell.ljust(w) if i < 4 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))]
        typer.echo("  ".join(cells).rstrip())


async def _usage(settings: Settings, since: date | None, workspace: Workspace | None) -> list[dict]:
    store = await open_history(settings)
    try:
        return await store.usage(since, workspace)
    finally:
        await store.close()


def _existing_history() -> Settings:
    """The settings, once there is history to read: a PostgreSQL database (DATABASE_URL) or the SQLite file."""
    settings = Settings()
    if not settings.database_url and not settings.db_path.exists():
        typer.echo(f"No history yet: {settings.db_path} does not exist (check PERSONABOT_DATA_DIR).", err=True)
        raise typer.Exit(1)
    return settings
