"""Where knowledge lives on disk, and the names the index gives it.

Global collections are folders in the knowledge folder, managed by the owners. A workspace's own collections
are folders under <data_dir>/workspaces/<platform>/<id>/knowledge/; uploads from chat land there. One index
holds both: a workspace's documents are stored under a qualified name, "@slack:T1/handbook/file.md". Collection
names start with [a-z0-9], so that prefix can never be read as a global name, and a source without it (every
index built before workspaces existed) is global, as it always was. The prefix never leaves this package:
readers see `collection/file.md`.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from bot.conversation import Workspace
from bot.retrieval.parse import FORMATS
from bot.retrieval.uploads import UploadRefused, safe_collection

TRASH = ".trash"  # hidden, so never indexed; replaced and removed documents stay recoverable here


@dataclass(frozen=True)
class Scope:
    """Global knowledge (workspace None) or one workspace's own: a folder, and the prefix of its index names."""

    workspace: Workspace | None
    root: Path

    @property
    def prefix(self) -> str:
        return "" if self.workspace is None else f"@{self.workspace}/"

    def qualify(self, name: str) -> str:
        return self.prefix + name

    def inside(self, source: str) -> Path:
        """The file a `collection/file` source names; refused when it would leave the folder or enter a hidden one."""
        root = self.root.resolve()
        target = (root / source).resolve()
        if root not in target.parents or any(part.startswith(".") for part in target.relative_to(root).parts):
            raise UploadRefused(f"{source!r} is outside the knowledge folder. Nothing was changed.")
        return target


def workspace_root(workspaces_dir: Path, workspace: Workspace) -> Path:
    """Raises ValueError for a workspace whose name cannot be a folder (Workspace.parse lets "." and ".." through)."""
    checked = Workspace.parse(str(workspace))
    if checked.id in (".", ".."):
        raise ValueError(f"{workspace} cannot hold knowledge: its id is not a folder name")
    return workspaces_dir / checked.platform / checked.id / "knowledge"


def scopes(knowledge_dir: Path, workspaces_dir: Path) -> list[Scope]:
    """Global knowledge, then every workspace that has a knowledge folder. Other folders under a workspace's
    directory belong to other parts of the bot and are left alone."""
    found = [Scope(None, knowledge_dir)]
    for folder in sorted(workspaces_dir.glob("*/*/knowledge")):
        try:
            workspace = Workspace.parse(f"{folder.parent.parent.name}:{folder.parent.name}")
        except ValueError:
            continue
        if folder.is_dir():
            found.append(Scope(workspace, folder))
    return found


def owner(qualified: str) -> str:
    """"slack:T1" for a workspace's collection or source, "" for a global one."""
    return qualified[1 : qualified.index("/")] if qualified.startswith("@") else ""


def plain(qualified: str) -> str:
    """The name as readers see it: `collection` or `collection/file.md`."""
    return qualified[qualified.index("/") + 1 :] if qualified.startswith("@") else qualified


def visible(qualified: str, workspace: Workspace | None) -> bool:
    """A workspace sees global knowledge and its own; None sees global knowledge only."""
    name = owner(qualified)
    return not name or (workspace is not None and name == str(workspace))


def index_file(collection: str) -> str:
    """A qualified collection's FAISS file under faiss/: global ones keep the name they always had."""
    name = owner(collection)
    if not name:
        return f"{collection}.faiss"
    platform, _, ident = name.partition(":")
    return f"workspaces/{platform}/{ident}/{plain(collection)}.faiss"


def scan(scope: Scope, skipped: list[tuple[str, str]]) -> dict[str, tuple[str, Path]]:
    """{qualified source: (qualified collection, path)} for every document in the scope's collection folders;
    what cannot be indexed is added to `skipped` with the reason."""
    found: dict[str, tuple[str, Path]] = {}
    if not scope.root.is_dir():
        return found
    for folder in sorted(scope.root.iterdir()):
        if not folder.is_dir() or folder.name.startswith("."):
            continue  # loose files (the folder's README) belong to no collection; hidden folders (the trash) to none
        label = scope.qualify(folder.name)
        try:
            collection = safe_collection(folder.name)
        except UploadRefused:
            skipped.append((label + "/", "collection names use a-z, 0-9, '-' and '_'"))
            continue
        if collection != folder.name:
            skipped.append((label + "/", f"rename the folder to {collection}"))
            continue
        for root, dirs, files in os.walk(folder):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(files):
                path = Path(root) / name
                source = scope.qualify(path.relative_to(scope.root).as_posix())
                if name.startswith("."):
                    continue
                if path.suffix.lower() not in FORMATS:
                    skipped.append((source, f"unsupported type {path.suffix or '(none)'}"))
                    continue
                found[source] = (scope.qualify(collection), path)
    return found


def trash(root: Path, source: str) -> str:
    """Moves root/source to root/.trash/<UTC time>/source rather than deleting it; returns that path, relative
    to root, for the report."""
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    for n in itertools.count():
        kept = PurePosixPath(TRASH, f"{stamp}-{n}" if n else stamp, source)
        if not (root / kept).exists():
            break
    (root / kept).parent.mkdir(parents=True, exist_ok=True)
    os.replace(root / source, root / kept)
    return kept.as_posix()


def write_atomically(target: Path, data: bytes) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.part")  # hidden: neither sync nor the watcher picks it up
    tmp.write_bytes(data)
    os.replace(tmp, target)


def expand(paths: list[Path]) -> list[Path]:
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files.extend(p for p in sorted(path.rglob("*")) if p.is_file() and not p.name.startswith("."))
        else:
            files.append(path)
    return files


def watched(knowledge_dir: Path, workspaces_dir: Path, path: str) -> bool:
    """Whether a change can alter knowledge: not inside a hidden folder or file (the trash, partial writes), and
    under a workspace's directory only within its knowledge folder. A new platform or workspace folder counts:
    files written into it at once can land before the watch on it is armed. Both roots must be resolved."""
    changed = Path(path)
    if changed.is_relative_to(workspaces_dir):
        parts = changed.relative_to(workspaces_dir).parts
        if len(parts) > 2 and parts[2] != "knowledge":
            return False
        parts = parts[3:]
    elif changed.is_relative_to(knowledge_dir):
        parts = changed.relative_to(knowledge_dir).parts
    else:
        return False
    return not any(part.startswith(".") for part in parts)
