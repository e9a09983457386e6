"""`personabot knowledge …`: add, sync, list, remove and search the documents personas draw on.

Without --workspace a command acts on global knowledge (knowledge/<collection>/…), which every workspace
sees; with it, on that workspace's own documents, so an owner can manage any workspace's uploads from here.
"""
from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Optional, TypeVar

import typer

from bot.config import Settings
from bot.conversation import Workspace
from bot.retrieval import Retriever, UploadRefused

app = typer.Typer(help="Manage and query the knowledge index (knowledge/<collection>/…).", no_args_is_help=True)
T = TypeVar("T")
WorkspaceOption = Annotated[Optional[str], typer.Option(
    "--workspace", metavar="PLATFORM:ID",
    help="A workspace (discord:GUILD_ID, slack:TEAM_ID, terminal:NAME): its own documents, and what it sees.")]


def _workspace(text: str | None) -> Workspace | None:
    if text is None:
        return None
    try:
        return Workspace.parse(text)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--workspace") from None


def _with_retriever(work: Callable[[Retriever], Awaitable[T]]) -> T:
    async def main() -> T:
        retriever = await Retriever.open(Settings(), progress=True)
        try:
            return await work(retriever)
        finally:
            await retriever.close()

    return asyncio.run(main())


@app.command()
def add(
    paths: Annotated[list[Path], typer.Argument(help="Files or folders to copy into the collection.", exists=True)],
    collection: Annotated[str, typer.Option(help="Collection to add them to.")] = "general",
    workspace: WorkspaceOption = None,
) -> None:
    """Copy documents into knowledge/COLLECTION/ (or the workspace's own COLLECTION) and index them."""
    tenant = _workspace(workspace)
    try:
        notes, report = _with_retriever(lambda r: r.add_files(paths, collection, workspace=tenant))
    except UploadRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for note in notes:
        typer.echo(note, err=True)
    typer.echo(report.summary())
    if notes and not report.changed:
        raise typer.Exit(1)


@app.command()
def sync() -> None:
    """Bring the index in step with the knowledge folder: new and changed files indexed, removed ones dropped."""
    report = _with_retriever(lambda r: r.sync())
    typer.echo(report.summary())


@app.command("list")
def list_documents(
    collection: Annotated[Optional[str], typer.Option(help="Only this collection.")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Show indexed documents by collection (syncing the folder first); with --workspace, those it sees."""
    tenant = _workspace(workspace)

    async def read(retriever: Retriever):
        await retriever.sync()
        return (retriever.stats(tenant), retriever.files(collection, workspace=tenant),
                retriever.collections(tenant))

    stats, files, names = _with_retriever(read)
    if not names:
        typer.echo(f"no collections yet: put documents in {Settings().knowledge_dir}/<collection>/ "
                   "or run `personabot knowledge add PATH --collection NAME`")
        return
    counts = {name: (n_files, chunks, size) for name, n_files, chunks, size in stats}
    for name in names:
        if collection and name != collection:
            continue
        n_files, chunks, size = counts.get(name, (0, 0, 0))
        typer.echo(f"{name}: {n_files} files, {chunks} chunks, {size / 1024:.0f} KiB")
        for source, n_chunks, _, indexed_at, own in files:
            if source.startswith(f"{name}/"):  # a workspace sees global documents too: say which cannot be removed
                scope = ", global" if tenant and not own else ""
                typer.echo(f"  {source}  ({n_chunks} chunks, indexed {indexed_at}{scope})")


@app.command()
def remove(
    source: Annotated[str, typer.Argument(help="Document as listed: collection/file.md")],
    workspace: WorkspaceOption = None,
) -> None:
    """Move a document (global, or the workspace's own) to the folder's .trash and out of the index."""
    tenant = _workspace(workspace)
    try:
        removed = _with_retriever(lambda r: r.remove(source, workspace=tenant))
    except UploadRefused as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if not removed:
        typer.echo(f"error: no document {source!r}; see `personabot knowledge list`", err=True)
        raise typer.Exit(1)
    typer.echo(f"removed {source}")


@app.command()
def search(
    query: Annotated[str, typer.Argument(help="What to look for.")],
    k: Annotated[int, typer.Option("--k", min=1, max=100, help="How many passages.")] = 5,
    collection: Annotated[Optional[list[str]], typer.Option(help="Search only this collection (repeatable).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print [{"source","locator","score","text"}].')] = False,
    workspace: WorkspaceOption = None,
) -> None:
    """Hybrid (dense + BM25) search of the knowledge (global, or what the workspace sees), synced first."""
    tenant = _workspace(workspace)

    async def find(retriever: Retriever):
        await retriever.sync()
        return await retriever.search(query, collection or None, k, workspace=tenant)

    hits = _with_retriever(find)
    if as_json:
        typer.echo(json.dumps([hit.as_json() for hit in hits], ensure_ascii=False, indent=2))
        return
    if not hits:
        typer.echo("no matches")
    for n, hit in enumerate(hits, 1):
        snippet = " ".join(hit.text.split())
        typer.echo(f"[{n}] {hit.citation}  (score {hit.score:.3f}, similarity {hit.similarity:.2f})")
        typer.echo(f"    {snippet[:300]}{'…' if len(snippet) > 300 else ''}")
