"""`personabot personas …`: list, show, validate and import persona files."""
from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from bot.character_card import load_card, persona_from_card
from bot.config import Settings
from bot.conversation import Workspace
from bot.history import open_history
from bot.persona_catalog import Origin, PersonaCatalog
from bot.personas import SUFFIXES, PersonaError, PersonaLibrary, UnknownPersona, dump_persona, load_persona

app = typer.Typer(help="List, show, validate, import and export personas.", no_args_is_help=True)
T = TypeVar("T")


WorkspaceOption = Annotated[
    Optional[str], typer.Option(help="A workspace (discord:GUILD, slack:TEAM, terminal:NAME): its own personas too.")
]


def _in_workspace(workspace: str | None, work: Callable[[PersonaCatalog, Workspace], Awaitable[T]]) -> T:
    """Runs `work` on the catalog a workspace sees, read from the history database."""
    try:
        where = Workspace.parse(workspace or "")
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workspace") from None
    settings = Settings()

    async def main() -> T:
        history = await open_history(settings)
        try:
            return await work(PersonaCatalog(PersonaLibrary(settings.personas_dir), history), where)
        finally:
            await history.close()

    return asyncio.run(main())


@app.command("list")
def list_personas(workspace: WorkspaceOption = None) -> None:
    """Show every persona: name, display name and description (* marks the default)."""
    settings = Settings()
    library = PersonaLibrary(settings.personas_dir)
    if workspace:
        entries = _in_workspace(workspace, lambda catalog, where: catalog.entries(where))
        personas = [(e.persona, "" if e.origin is Origin.SHIPPED else f" ({e.origin.value})") for e in entries.values()]
    else:
        personas = [(p, "") for p in library.all()]
    if not personas:
        typer.echo(f"no personas in {settings.personas_dir}")
    width = max((len(p.name) for p, _ in personas), default=0) + 2
    for persona, origin in personas:
        mark = "*" if persona.name == settings.default_persona else " "
        about = f" — {persona.description}" if persona.description else ""
        typer.echo(f"{mark} {persona.name:<{width}}{persona.display_name}{origin}{about}")
    for errors in library.errors.values():
        for error in errors:
            typer.echo(f"warning: {error}", err=True)


@app.command()
def show(name: Annotated[str, typer.Argument(help="Persona name.")], workspace: WorkspaceOption = None) -> None:
    """Print a persona as YAML (as the workspace sees it, with --workspace)."""
    try:
        if workspace:
            persona = _in_workspace(workspace, lambda catalog, where: catalog.get(where, name))
        else:
            persona = PersonaLibrary(Settings().personas_dir).get(name)
    except UnknownPersona as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(dump_persona(persona), nl=False)


@app.command()
def export(
    workspace: Annotated[str, typer.Option(help="The workspace whose own personas to export, e.g. discord:1234.")],
    out: Annotated[Optional[Path], typer.Option(help="Write NAME.yaml files into this folder instead of stdout.")] = None,
) -> None:
    """The personas a workspace made in chat, as YAML persona files (stdout: one document each)."""
    own = _in_workspace(workspace, lambda catalog, where: catalog.own(where))
    if out is None:
        typer.echo("---\n".join(dump_persona(persona) for persona in own), nl=False)
        return
    out.mkdir(parents=True, exist_ok=True)
    for persona in own:
        (out / f"{persona.name}.yaml").write_text(dump_persona(persona), encoding="utf-8")
    typer.echo(f"wrote {len(own)} persona{'' if len(own) == 1 else 's'} to {out}")


@app.command()
def check(
    path: Annotated[Optional[Path], typer.Argument(help="A persona file or directory (default: the personas dir).")] = None,
) -> None:
    """Validate persona files; prints every problem as file:line and exits 1 if there are any."""
    settings = Settings()
    target = path or settings.personas_dir
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
    elif target.exists():  # a FIFO or a device too, so that it is reported rather than "no such file"
        files = [target]
    else:
        typer.echo(f"error: {target}: no such file or directory", err=True)
        raise typer.Exit(2)

    errors: list[str] = []
    seen: dict[str, Path] = {}
    for file in files:
        try:
            persona = load_persona(file)
        except PersonaError as exc:
            errors += exc.errors
            continue
        if persona.name in seen:
            errors.append(f"{file}:1: persona {persona.name!r} is already defined in {seen[persona.name]}")
        seen.setdefault(persona.name, file)
    if path is None and files and settings.default_persona not in seen:
        errors.append(f"{target}: the default persona {settings.default_persona!r} (PERSONABOT_DEFAULT_PERSONA) "
                      "has no valid file here")
    for error in errors:
        typer.echo(error)
    if errors:
        raise typer.Exit(1)
    typer.echo(f"ok: {len(seen)} persona{'' if len(seen) == 1 else 's'}")


@app.command("import")
def import_card(
    card: Annotated[Path, typer.Argument(help="SillyTavern character card: .json or .png.", exists=True, dir_okay=False)],
    name: Annotated[Optional[str], typer.Option(help="Persona name (default: from the card's name).")] = None,
    force: Annotated[bool, typer.Option(help="Overwrite an existing persona of the same name.")] = False,
) -> None:
    """Import a SillyTavern character card (chara_card_v2) as personas/NAME.yaml."""
    library = PersonaLibrary(Settings().personas_dir)
    try:
        persona = persona_from_card(load_card(card), name, source=str(card))
    except PersonaError as exc:
        typer.echo("\n".join(exc.errors), err=True)
        raise typer.Exit(1) from None
    exists = persona.name in library.names() or (library.directory / f"{persona.name}.yaml").exists()
    if exists and not force:
        typer.echo(f"error: persona {persona.name!r} already exists; pass --force to overwrite it "
                   "or --name to import under another name", err=True)
        raise typer.Exit(1)
    try:
        path = library.save(persona)
    except PersonaError as exc:
        typer.echo("\n".join(exc.errors), err=True)
        raise typer.Exit(1) from None
    except OSError as exc:
        typer.echo(f"error: cannot write {persona.name}.yaml: {exc.strerror or exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {path} ({len(persona.examples) // 2} example exchanges)")
