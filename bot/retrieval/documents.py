"""What an admin's add, replace and remove of a document does to the knowledge folders and their index.

Each action runs inside one index-changing job (`Indexer.exclusive`), so that its checks (a duplicate, a name
given to another document) and its write see the same index, whichever process changes it: an upload syncs
first (a file another process just wrote is then known), writes its file, syncs again, and puts the folder back
as it was when the file does not index. The folder stays the source of truth: a document is added by writing
its file and removed by moving it to the trash, never by editing the index alone.
"""
from __future__ import annotations

import contextlib
import hashlib
from pathlib import Path

from bot.conversation import Workspace
from bot.retrieval import folders
from bot.retrieval.folders import Scope, plain, visible
from bot.retrieval.indexing import Indexer, SyncReport
from bot.retrieval.parse import MAX_FILE_BYTES
from bot.retrieval.store import FileEntry
from bot.retrieval.uploads import UploadRefused, check, check_same_name, check_size


def add_upload(index: Indexer, given: str, name: str, data: bytes, collection: str, scope: Scope) -> str:
    """Saves one checked upload (`name`, the safe form of the `given` one) and indexes it; returns what
    happened, for the uploader. Raises UploadRefused, with nothing saved."""
    digest = hashlib.sha256(data).hexdigest()
    source = f"{collection}/{name}"
    index.sync_in_turn()
    same = [plain(f.source) for f in _visible_files(index, scope.workspace) if f.sha256 == digest]
    if same:
        raise UploadRefused(f"That file is already in the knowledge base as {same[0]}. Nothing was saved.")
    target = scope.inside(source)
    if target.exists():
        check_same_name(given, source, _given_name(index, scope, source))
    kept = folders.trash(scope.root, source) if target.exists() else None
    folders.write_atomically(target, data)
    index.store.set_given_name(scope.qualify(source), given)
    try:
        report = index.sync_in_turn()
    except BaseException:
        _undo(scope, source, kept)
        raise
    entry = index.store.files().get(scope.qualify(source))
    if entry is None:
        reason = dict(report.skipped).get(scope.qualify(source), "it could not be indexed")
        _undo(scope, source, kept)
        index.sync_in_turn()
        raise UploadRefused(f"{name} was not indexed: {reason}. Nothing was saved.")
    indexed = f"{entry.chunks} chunk{'s' * (entry.chunks != 1)} indexed ({report.embedded} newly embedded)."
    if kept:
        return f"Replaced {name} in collection '{collection}'; the previous version is kept as {kept}. {indexed}"
    return f"Added {name} in collection '{collection}': {indexed}"


def add_files(index: Indexer, paths: list[Path], collection: str, scope: Scope) -> tuple[list[str], SyncReport]:
    """Copies files (folders recursively) into the collection, each checked as an upload is, then syncs once;
    a file refused or already indexed is a note, not an error, so one bad file never stops the rest."""
    notes: list[str] = []
    hashes = {f.sha256: plain(f.source) for f in _visible_files(index, scope.workspace)}
    for path in folders.expand(paths):
        try:
            check_size(path.name, path.stat().st_size, MAX_FILE_BYTES)
            data = path.read_bytes()
            name = check(path.name, data, None)
            digest = hashlib.sha256(data).hexdigest()
            if digest in hashes:
                notes.append(f"skipped {path}: already in the knowledge base as {hashes[digest]}")
                continue
            source = f"{collection}/{name}"
            target = scope.inside(source)
            if path.resolve() != target and target.exists():
                check_same_name(path.name, source, _given_name(index, scope, source))
        except (UploadRefused, OSError) as exc:
            notes.append(f"refused {path}: {exc}")
            continue
        if path.resolve() != target:
            if target.exists():
                notes.append(f"replaced {source}; the previous version is kept as "
                             f"{folders.trash(scope.root, source)}")
            folders.write_atomically(target, data)
            index.store.set_given_name(scope.qualify(source), path.name)
        hashes[digest] = source
    return notes, index.sync_in_turn()


def remove(index: Indexer, source: str, scope: Scope) -> bool:
    """Moves the document to the trash, then syncs it out of the index; False when there is no such document."""
    path = scope.inside(source)
    if not (scope.qualify(source) in index.store.files() or path.is_file()):
        return False
    if path.is_file():
        folders.trash(scope.root, path.relative_to(scope.root.resolve()).as_posix())
    index.sync_in_turn()
    return True


def _visible_files(index: Indexer, workspace: Workspace | None) -> list[FileEntry]:
    return [f for f in index.store.files().values() if visible(f.source, workspace)]


def _given_name(index: Indexer, scope: Scope, source: str) -> str:
    """What the document at `source` was called when added; a file put in the folder by hand, its own name."""
    return index.store.given_name(scope.qualify(source)) or source.rsplit("/", 1)[-1]


def _undo(scope: Scope, source: str, kept: str | None) -> None:
    """Puts the folder back as it was before a failed upload: the new file gone, the one it replaced restored,
    and a collection folder left empty removed, so that no collection appears with nothing in it."""
    target = scope.root / source
    if kept:
        (scope.root / kept).replace(target)
    else:
        target.unlink(missing_ok=True)
        with contextlib.suppress(OSError):  # not empty: the collection has other documents
            target.parent.rmdir()
