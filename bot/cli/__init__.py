"""`personabot` — the command line (same as `python -m bot`)."""
from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Coroutine
from enum import Enum
from typing import Annotated, Any, Optional

import typer
from pydantic import ValidationError

from bot import logs
from bot.config import Settings
from bot.conversation import Workspace

app = typer.Typer(help="A chatbot for Discord and Slack whose voice is a switchable persona.", no_args_is_help=True)
log = logging.getLogger(__name__)


@app.callback()
def _setup() -> None:
    try:
        settings = Settings()
    except ValidationError as exc:
        # Only where and why, a line each: pydantic's own text adds error types and a docs link per error.
        lines = [f"  {'.'.join(map(str, error['loc'])) or 'settings'}: {error['msg'].removeprefix('Value error, ')}"
                 for error in exc.errors()]
        typer.echo("personabot: the settings (environment or .env) are invalid:\n" + "\n".join(lines), err=True)
        raise typer.Exit(2) from None
    logs.configure(settings.log_level)


@app.command()
def chat(
    persona: Annotated[Optional[str], typer.Option(help="Switch this channel to persona P first.")] = None,
    workspace: Annotated[str, typer.Option(help="Terminal workspace: its own personas, knowledge and usage.")] = "local",
    channel: Annotated[str, typer.Option(help="Terminal channel name; each keeps its own history.")] = "local",
    user: Annotated[str, typer.Option(help="Your user name in the history.")] = "local",
) -> None:
    """Chat in the terminal. With stdin piped, reads one message a line and prints each reply."""
    from bot.platforms.terminal import chat as terminal_chat

    settings = Settings()
    try:
        Workspace.parse(f"terminal:{workspace}")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workspace") from None
    _ensure_local_model(settings)

    async def main() -> None:
        from bot.engine import Engine

        engine = await Engine.create(settings)
        stop = asyncio.Event()
        # Syncs knowledge/ first, then keeps watching it, so a document dropped in mid-chat is used.
        watcher = asyncio.create_task(engine.retriever.watch(stop), name="knowledge-watch") if engine.retriever else None
        try:
            await terminal_chat(engine, persona=persona, workspace=workspace, channel=channel, user=user)
        finally:
            stop.set()
            if watcher is not None:
                await asyncio.gather(watcher, return_exceptions=True)
            await engine.close()

    _until_interrupted(main())


class Platform(str, Enum):
    discord = "discord"
    slack = "slack"


@app.command()
def run(
    platform: Annotated[
        Optional[list[Platform]], typer.Option(help="Start only this platform (repeatable); default: all configured.")
    ] = None,
) -> None:
    """Start every platform whose credentials are set (Discord, Slack over HTTP or Socket Mode)."""
    from bot.platforms.slack_http import slack_configured

    settings = Settings()
    wanted = set(platform or Platform)
    discord = Platform.discord in wanted and bool(settings.discord_token)
    slack = Platform.slack in wanted and slack_configured(settings)
    if not (discord or slack):
        typer.echo(
            "No platform to start: set DISCORD_TOKEN, or SLACK_BOT_TOKEN with SLACK_SIGNING_SECRET (HTTP) or "
            "SLACK_APP_TOKEN (Socket Mode), or SLACK_CLIENT_ID and SLACK_CLIENT_SECRET with SLACK_SIGNING_SECRET "
            "(installs in many workspaces). For a local chat, run `personabot chat`.",
            err=True,
        )
        raise typer.Exit(2)
    _ensure_local_model(settings)
    _until_interrupted(_run_platforms(settings, discord=discord, slack=slack))


def _until_interrupted(main: Coroutine[Any, Any, None]) -> None:
    """Ctrl-C and the host's SIGTERM (a deploy or restart) stop cleanly: the work is cancelled, its
    `finally` commits queued history and closes the models, and nobody sees a traceback."""

    async def cancellable() -> None:
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, asyncio.current_task().cancel)
        await main

    try:
        asyncio.run(cancellable())
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    except asyncio.CancelledError:
        log.info("stopped by SIGTERM")


async def _run_platforms(settings: Settings, *, discord: bool, slack: bool) -> None:
    from bot.engine import Engine

    engine = await Engine.create(settings)
    stop = asyncio.Event()
    tasks = []
    if discord:
        from bot.platforms.discord_bot import run_discord

        tasks.append(asyncio.create_task(run_discord(engine, settings), name="discord"))
    if slack:
        from bot.platforms.slack_http import run_slack

        tasks.append(asyncio.create_task(run_slack(engine, settings), name="slack"))
    elif settings.public_url:  # Slack's server serves these too; without it, Discord still needs the avatars
        from bot.platforms.slack_http import run_web

        tasks.append(asyncio.create_task(run_web(settings), name="web"))
    if engine.retriever is not None:
        tasks.append(asyncio.create_task(engine.retriever.watch(stop), name="knowledge-watch"))
    try:
        # The first platform to stop (or crash) stops the process, so the host restarts it cleanly.
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await engine.close()


def _ensure_local_model(settings: Settings) -> None:
    """The default local model is fetched on first use, so `personabot chat` works on a fresh machine."""
    if settings.backend != "local" or settings.local_model != "smollm2" or (settings.models_dir / "smollm2").exists():
        return
    from bot.models.pull import pull_smollm2

    typer.echo("First run: fetching the local model SmolLM2-135M-Instruct (about 100 MB, once).", err=True)
    pull_smollm2(settings.models_dir)


from bot.cli import finetune, history, knowledge, models, personas  # noqa: E402  (sub-apps register after the root app exists)
from bot.cli import eval as eval_cli  # noqa: E402

app.add_typer(personas.app, name="personas", help="List, show, validate, import and export personas.")
app.add_typer(models.app, name="models", help="Fetch and list local models.")
app.add_typer(knowledge.app, name="knowledge")
app.add_typer(eval_cli.app, name="eval")
app.add_typer(history.app, name="history", help="Export stored conversations, or copy them into PostgreSQL.")
app.command()(history.usage)
app.command()(finetune.finetune)


def main() -> None:
    from bot.history import HistoryError
    from bot.migrations import SchemaTooNew

    try:
        app()
    except (HistoryError, SchemaTooNew) as exc:  # a database that cannot be opened: what and why, no traceback
        typer.echo(f"personabot: {exc}", err=True)
        raise SystemExit(1) from None
