"""Personas: the YAML files that give the bot its voice, validated strictly and reloaded while it runs.

Admins edit these files by hand on a live server, so every mistake is reported with the file and line it is
on, typos in key names are errors rather than silently ignored settings, and a file saved half-edited never
takes a persona away from the channels using it: the last good version keeps serving until the file is fixed.
"""
from __future__ import annotations

import dataclasses
import difflib
import logging
import math
import os
import re
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator, with_config
from pydantic_core import PydanticCustomError
from pydantic.functional_validators import AfterValidator
from typing_extensions import TypedDict

from bot.models.base import GenParams, Message

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9-]+")
KNOWLEDGE_PATTERN = re.compile(r"[a-z0-9_-]+")
SUFFIXES = (".yaml", ".yml")


def _persona_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise PydanticCustomError("persona_name", "must be lowercase letters, digits and '-' (it is also the file name)")
    return value


def _collection_name(value: str) -> str:
    if not KNOWLEDGE_PATTERN.fullmatch(value):
        raise PydanticCustomError("collection_name", "collection names are lowercase letters, digits, '-' and '_'")
    return value


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise PydanticCustomError("blank", "must not be empty")
    return value


Text = Annotated[str, AfterValidator(_not_blank)]


@with_config(ConfigDict(extra="forbid"))
class Example(TypedDict):
    """A few-shot turn; a plain dict at run time, so it is a `Message` wherever one is expected."""

    role: Literal["user", "assistant"]
    content: Text


class ModelSpec(BaseModel):
    """Per-persona model settings; anything left out falls back to the configured backend and its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["openai", "local"] | None = None
    name: str | None = None  # OpenAI model id
    path: str | None = None  # local model: a name under <data dir>/models, a model dir, a .gguf file or a hub id
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    context_window: int | None = Field(None, gt=0)


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, AfterValidator(_persona_name)]
    display_name: str = ""
    description: str = ""
    system: Text
    examples: list[Example] = []
    model: ModelSpec = ModelSpec()
    knowledge: list[Annotated[str, AfterValidator(_collection_name)]] = []

    @model_validator(mode="after")
    def _check(self) -> Persona:
        # Chat templates and APIs expect user/assistant turns to alternate, and the live user message comes
        # straight after the examples, so they must be whole user→assistant pairs.
        expected = "user"
        for index, turn in enumerate(self.examples):
            if turn["role"] != expected:
                raise PydanticCustomError(
                    "example_order",
                    "examples alternate user, assistant, user, …; this one should be {expected}",
                    {"index": index, "expected": expected},
                )
            expected = "assistant" if expected == "user" else "user"
        if expected == "assistant":
            raise PydanticCustomError(
                "example_order",
                "examples come in user/assistant pairs; add the assistant's reply to this one",
                {"index": len(self.examples) - 1, "expected": "assistant"},
            )
        if not self.display_name.strip():
            object.__setattr__(self, "display_name", self.name.replace("-", " ").title())
        return self

    def prefix(self) -> list[Message]:
        """The messages every conversation with this persona starts with."""
        return [Message(role="system", content=self.system)] + [
            Message(role=turn["role"], content=turn["content"]) for turn in self.examples
        ]

    def gen_params(self, default: GenParams) -> GenParams:
        overrides = {
            key: value
            for key in ("temperature", "max_tokens", "top_p")
            if (value := getattr(self.model, key)) is not None
        }
        return dataclasses.replace(default, **overrides)


class PersonaError(ValueError):
    """A persona that failed to load; `.errors` holds every problem as "source:line: message"."""

    def __init__(self, errors: list[str]):
        super().__init__("\n".join(errors))
        self.errors = errors


class UnknownPersona(KeyError):
    def __init__(self, name: str, available: list[str]):
        super().__init__(name)
        self.name = name
        self.available = available

    def __str__(self) -> str:
        known = ", ".join(self.available) or "none"
        return f"no persona named {self.name!r} (available: {known})"


# ---------------------------------------------------------------------------------------------------- parsing


def parse_persona(text: str, source: str) -> Persona:
    """Validate persona YAML; a `source` ending in .yaml/.yml must be named after the persona it holds."""
    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise PersonaError([f"{source}:{line}: YAML syntax error: {problem}"]) from None
    finally:
        loader.dispose()

    errors: list[tuple[int, str]] = list(_duplicate_keys(root))
    persona = None
    try:
        persona = Persona.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _location(err)
            path = _dotted(loc)
            message = _describe(err, loc)
            errors.append((_line_of(root, loc), f"{path}: {message}" if path else message))

    stem = Path(source).stem
    if persona is not None and Path(source).suffix in SUFFIXES and persona.name != stem:
        errors.append((_line_of(root, ("name",)), f"name: {persona.name!r} must match the file name {stem!r}"))
    if errors:
        raise PersonaError([f"{source}:{line}: {message}" for line, message in sorted(errors, key=lambda e: e[0])])
    assert persona is not None
    return persona


def load_persona(path: Path) -> Persona:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise PersonaError([f"{path}:1: cannot read: {exc}"]) from None
    return parse_persona(text, str(path))


def _location(err: Any) -> tuple[Any, ...]:
    if err["type"] == "example_order":
        return ("examples", err["ctx"]["index"], "role")
    return tuple(err["loc"])


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _describe(err: Any, loc: tuple[Any, ...]) -> str:
    kind = err["type"]
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        known = _known_keys(loc[:-1])
        guess = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"did you mean {guess[0]!r}?" if guess else f"expected one of: {', '.join(known)}"
        return f"unknown key ({hint})"
    if kind == "literal_error":
        return "must be " + err["ctx"]["expected"].replace("'", "")
    if kind == "string_type":
        return "must be text (put it in quotes if YAML read it as a number, date or yes/no)"
    if kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return "a persona file is a mapping of keys: name, system, and optionally display_name, description, " \
               "examples, model, knowledge"
    message = err["msg"].removeprefix("Value error, ")
    return message.replace("Input should be", "must be", 1)


def _known_keys(parent: tuple[Any, ...]) -> list[str]:
    if parent == ():
        return list(Persona.model_fields)
    if parent == ("model",):
        return list(ModelSpec.model_fields)
    if len(parent) == 2 and parent[0] == "examples":
        return ["role", "content"]
    return []


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """1-based line of the YAML node a validation error points at: the key's line, or its parent's if absent."""
    if root is None:
        return 1
    node, line = root, root.start_mark.line
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            pair = next(((k, v) for k, v in node.value if getattr(k, "value", None) == part), None)
            if pair is None:
                break
            line, node = pair[0].start_mark.line, pair[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line
        else:
            break
    return line + 1


def _duplicate_keys(node: yaml.Node | None, path: str = "") -> list[tuple[int, str]]:
    """PyYAML keeps the last of two equal keys without a word; an admin would rather hear about it."""
    found: list[tuple[int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            where = f"{path}.{name}" if path else name
            if name in seen and name != "<<":
                found.append((key.start_mark.line + 1, f"{where}: duplicate key (only the last one would count)"))
            seen.add(name)
            found += _duplicate_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += _duplicate_keys(item, f"{path}[{index}]")
    return found


# ---------------------------------------------------------------------------------------------------- writing


class _Dumper(yaml.SafeDumper):
    pass


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_persona(persona: Persona) -> str:
    """YAML in the same shape admins write by hand, leaving out everything that is at its default."""
    data: dict[str, Any] = {"name": persona.name, "display_name": persona.display_name}
    if persona.description:
        data["description"] = persona.description
    data["system"] = persona.system + "\n"
    if persona.examples:
        data["examples"] = [dict(turn) for turn in persona.examples]
    model = persona.model.model_dump(exclude_none=True)
    if model:
        data["model"] = model
    if persona.knowledge:
        data["knowledge"] = list(persona.knowledge)
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)


# ---------------------------------------------------------------------------------------------------- library


@dataclasses.dataclass
class _Entry:
    path: Path
    stamp: tuple[int, int, int]
    persona: Persona | None  # the last version that validated; None if the file never has
    errors: list[str]


class PersonaLibrary:
    """The personas directory, re-checked on every access.

    A stat per file is microseconds, so each lookup sees edits, new files and deletions without a watcher
    thread or a restart; only files whose mtime, size or inode changed are parsed again.
    """

    def __init__(self, directory: Path, *, recheck_seconds: float = 1.0):
        self.directory = Path(directory)
        # Every message looks its persona up; statting the folder at most this often keeps that free.
        self.recheck_seconds = recheck_seconds
        self._checked_at = -math.inf
        self._entries: dict[Path, _Entry] = {}
        self._by_name: dict[str, Persona] = {}
        self._conflicts: dict[Path, str] = {}

    def get(self, name: str) -> Persona:
        self._refresh()
        try:
            return self._by_name[name]
        except KeyError:
            raise UnknownPersona(name, sorted(self._by_name)) from None

    def names(self) -> list[str]:
        self._refresh()
        return sorted(self._by_name)

    def all(self) -> list[Persona]:
        self._refresh()
        return [self._by_name[name] for name in sorted(self._by_name)]

    @property
    def errors(self) -> dict[Path, list[str]]:
        """Files that currently fail to validate (some may still be serving their last good version)."""
        self._refresh()
        found = {path: list(entry.errors) for path, entry in self._entries.items() if entry.errors}
        for path, message in self._conflicts.items():
            found.setdefault(path, []).append(message)
        return found

    def save(self, persona: Persona) -> Path:
        """Write personas/NAME.yaml atomically, so a crash or a concurrent reader never sees half a file."""
        path = self._path_for(persona.name)
        text = dump_persona(persona)
        parse_persona(text, str(path))  # never write a file the library would then refuse to load
        self.directory.mkdir(parents=True, exist_ok=True)
        mode = path.stat().st_mode & 0o777 if path.exists() else 0o644
        fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=f".{persona.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.chmod(tmp, mode)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        log.info("saved persona %s to %s", persona.name, path)
        self._refresh(force=True)
        return path

    def _path_for(self, name: str) -> Path:
        self._refresh(force=True)
        for path, entry in self._entries.items():
            if entry.persona is not None and entry.persona.name == name:
                return path
        return self.directory / f"{name}.yaml"

    def _refresh(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._checked_at < self.recheck_seconds:
            return
        self._checked_at = now
        current: dict[Path, tuple[int, int, int]] = {}
        try:
            with os.scandir(self.directory) as it:
                for item in it:
                    if item.name.endswith(SUFFIXES) and not item.name.startswith(".") and item.is_file():
                        st = item.stat()
                        current[Path(item.path)] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            pass
        changed = current.keys() ^ self._entries.keys()
        for path, stamp in current.items():
            entry = self._entries.get(path)
            if entry is not None and entry.stamp == stamp:
                continue
            changed.add(path)
            try:
                persona, errors = load_persona(path), []
            except PersonaError as exc:
                persona, errors = (entry.persona if entry else None), exc.errors
                kept = f"; still serving the last good version of {persona.name!r}" if persona else ""
                log.error("persona file %s is invalid%s:\n%s", path, kept, "\n".join(errors))
            self._entries[path] = _Entry(path, stamp, persona, errors)
        for path in self._entries.keys() - current.keys():
            log.info("persona file %s removed", path)
            del self._entries[path]
        if changed:
            self._reindex()

    def _reindex(self) -> None:
        by_name: dict[str, Persona] = {}
        owner: dict[str, Path] = {}
        conflicts: dict[Path, str] = {}
        for path in sorted(self._entries):
            persona = self._entries[path].persona
            if persona is None:
                continue
            if persona.name in by_name:
                conflicts[path] = f"{path}:1: persona {persona.name!r} is already defined in {owner[persona.name]}; " \
                                  "this file is ignored"
                if conflicts[path] != self._conflicts.get(path):
                    log.error(conflicts[path])
                continue
            by_name[persona.name], owner[persona.name] = persona, path
        self._by_name, self._conflicts = by_name, conflicts
