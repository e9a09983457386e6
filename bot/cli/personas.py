"""`personabot personas …`: list, show, validate and import persona files."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from bot.character_card import load_card, persona_from_card
from bot.config import Settings
from bot.personas import SUFFIXES, PersonaError, PersonaLibrary, UnknownPersona, dump_persona, load_persona

app = typer.Typer(help="List, show, validate and import personas.", no_args_is_help=True)


@app.command("list")
def list_personas() -> None:
    """Show every persona: name, display name and description (* marks the default)."""
    settings = Settings()
    library = PersonaLibrary(settings.personas_dir)
    personas = library.all()
    if not personas:
        typer.echo(f"no personas in {settings.personas_dir}")
    width = max((len(p.name) for p in personas), default=0) + 2
    for persona in personas:
        mark = "*" if persona.name == settings.default_persona else " "
        about = f" — {persona.description}" if persona.description else ""
        typer.echo(f"{mark} {persona.name:<{width}}{persona.display_name}{about}")
    for errors in library.errors.values():
        for error in errors:
            typer.echo(f"warning: {error}", err=True)


@app.command()
def show(name: Annotated[str, typer.Argument(help="Persona name.")]) -> None:
    """Print a persona as YAML."""
    try:
        persona = PersonaLibrary(Settings().personas_dir).get(name)
    except UnknownPersona as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(dump_persona(persona), nl=False)


@app.command()
def check(
    path: Annotated[Optional[Path], typer.Argument(help="A persona file or directory (default: the personas dir).")] = None,
) -> None:
    """Validate persona files; prints every problem as file:line and exits 1 if there are any."""
    settings = Settings()
    target = path or settings.personas_dir
    if target.is_dir():
        files = sorted(p for p in target.iterdir() if p.suffix in SUFFIXES and not p.name.startswith("."))
    elif target.is_file():
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
    path = library.save(persona)
    typer.echo(f"wrote {path} ({len(persona.examples) // 2} example exchanges)")
