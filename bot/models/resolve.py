"""Where a local model's weights are, from what an admin wrote: one answer for the bot and `finetune --base`.

Accepted, first match wins: a name under `<data dir>/models/` (what `personabot models pull` and `personabot
finetune` write), a model folder or a `.gguf` file (a relative path missing here is looked for under the data
dir, which is what a persona's `path: models/NAME` means), else a Hugging Face Hub id. Folders come back
absolute, so one model named several ways is still one model to the registry's cache.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from bot.models.base import ModelError

PULL_HINT = ("Run `personabot models pull smollm2` to download the default local model, or set "
             "PERSONABOT_LOCAL_MODEL to a model folder or .gguf file.")


@dataclass(frozen=True)
class LocalSource:
    """What to hand `from_pretrained`: `target` (a folder, or a Hub id) with `options`."""

    name: str  # as the admin wrote it, for messages
    target: str
    kind: Literal["named", "folder", "gguf", "hub"]
    gguf_file: str | None = None

    @property
    def options(self) -> dict[str, str]:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve_local(source: str, models_dir: Path, data_dir: Path) -> LocalSource:
    """Raises ModelError, saying how to get a model, for a path that names nothing loadable."""
    if not source.strip():
        raise ModelError(f"No local model named. {PULL_HINT}")
    named = Path(models_dir) / source
    if "/" not in source and os.sep not in source and named.is_dir():
        return LocalSource(source, str(named.resolve()), "named")
    path = Path(source).expanduser()
    if not path.exists() and (Path(data_dir) / path).exists():
        path = Path(data_dir) / path
    if path.is_dir():
        return LocalSource(source, str(path.resolve()), "folder")
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"No GGUF file at {path}. {PULL_HINT}")
        path = path.resolve()
        return LocalSource(source, str(path.parent), "gguf", gguf_file=path.name)
    if path.is_absolute() or source.startswith((".", "~")) or path.exists():
        raise ModelError(f"No model folder at {path}. {PULL_HINT}")
    return LocalSource(source, source, "hub")  # works for users who can reach the Hub
