"""Personas: the YAML files that give the bot its voice, validated strictly and reloaded while it runs.

Admins edit these files by hand on a live server, so every mistake is reported with the file and line it is
on, typos in key names are errors rather than silently ignored settings, and a file saved half-edited never
takes a persona away from the channels using it: the last good version keeps serving until the file is fixed.
Sizes are bounded far above any real persona, so a hostile or mistaken file is refused before it costs time.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import difflib
import logging
import math
import os
import re
import tempfile
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator, with_config
from pydantic_core import PydanticCustomError
from pydantic.functional_validators import AfterValidator
from typing_extensions import TypedDict

from bot import persona_input
from bot.models.base import GenParams, Message

log = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"[a-z0-9-]+")
KNOWLEDGE_PATTERN = re.compile(r"[a-z0-9_-]+")
SUFFIXES = (".yaml", ".yml")
MAX_FILE_BYTES = 256 * 1024  # the shipped personas are 1-3 KB
MAX_SYSTEM_CHARS = 32_000  # about 8k tokens; a longer prompt leaves most models no room to converse
MAX_ERRORS = 20  # reported per file, the rest only counted: finding each one's line scans its mapping
# An avatar is an https image URL, a Slack emoji (`:robot_face:`), or an image file beside the persona files,
# named without any folder so `GET /avatars/NAME` can never reach outside personas/.
AVATAR_FILE = re.compile(r"[A-Za-z0-9_-]+\.(png|jpe?g|gif|webp)")
AVATAR_EMOJI = re.compile(r":[a-z0-9_+-]+:")
MAX_AVATAR_BYTES = 1024 * 1024  # Discord refuses webhook avatars over about 8 MB; 1 MB is plenty at 128 px
AVATAR_TYPES = {"png": "image/png", "jpg": "image/jpeg", "jpeg": "image/jpeg", "gif": "image/gif",
                "webp": "image/webp"}


def _persona_name(value: str) -> str:
    if not NAME_PATTERN.fullmatch(value):
        raise PydanticCustomError("persona_name", "must be lowercase letters, digits and '-' (it is also the file name)")
    return value


def _collection_name(value: str) -> str:
    if not KNOWLEDGE_PATTERN.fullmatch(value):
        raise PydanticCustomError("collection_name", "collection names are lowercase letters, digits, '-' and '_'")
    return value


def _avatar(value: str) -> str:
    value = value.strip()
    if not value or AVATAR_FILE.fullmatch(value) or AVATAR_EMOJI.fullmatch(value):
        return value
    if value.startswith("https://") and len(value) > len("https://x") and not re.search(r"\s", value):
        return value
    raise PydanticCustomError(
        "avatar", "must be an https:// image URL, a Slack emoji like :robot_face:, or an image file in the "
        "personas folder (NAME.png, .jpg, .gif or .webp)")


def _not_blank(value: str) -> str:
    value = value.strip()
    if not value:
        raise PydanticCustomError("blank", "must not be empty")
    return value


@with_config(ConfigDict(extra="forbid"))
class Example(TypedDict):
    """A few-shot turn; a plain dict at run time, so it is a `Message` wherever one is expected."""

    role: Literal["user", "assistant"]
    content: Annotated[str, Field(max_length=4000), AfterValidator(_not_blank)]


class ModelSpec(BaseModel):
    """Per-persona model settings; anything left out falls back to the configured backend and its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backend: Literal["openai", "local"] | None = None
    name: str | None = Field(None, max_length=200)  # OpenAI model id
    # local model: a name under <data dir>/models, a model dir, a .gguf file or a hub id
    path: str | None = Field(None, max_length=1000)
    temperature: float | None = Field(None, ge=0, le=2)
    max_tokens: int | None = Field(None, gt=0)
    top_p: float | None = Field(None, gt=0, le=1)
    context_window: int | None = Field(None, gt=0)
    # Whether the model takes images (OpenAI content parts); unset: PERSONABOT_VISION_MODELS and OpenAI's own
    # vision models decide. Local models read text only.
    vision: bool | None = None

    @model_validator(mode="after")
    def _vision_needs_openai(self) -> ModelSpec:
        if self.vision and (self.backend == "local" or self.path is not None):
            raise PydanticCustomError("vision_local", "local models read text only; vision: true needs an "
                                      "OpenAI-compatible model (backend: openai)")
        return self


class Persona(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Annotated[str, Field(max_length=64), AfterValidator(_persona_name)]
    display_name: str = Field("", max_length=100)
    avatar: Annotated[str, Field(max_length=500), AfterValidator(_avatar)] = ""
    description: str = Field("", max_length=1000)
    system: Annotated[str, Field(max_length=MAX_SYSTEM_CHARS), AfterValidator(_not_blank)]
    examples: list[Example] = Field([], max_length=64)  # turns, so 32 user/assistant exchanges
    model: ModelSpec = ModelSpec()
    knowledge: list[Annotated[str, Field(max_length=64), AfterValidator(_collection_name)]] = Field([], max_length=32)

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
    if (size := len(text.encode("utf-8", "surrogatepass"))) > MAX_FILE_BYTES:
        raise PersonaError([f"{source}:1: {persona_input.too_big(size, MAX_FILE_BYTES)}"])
    try:
        root, data = persona_input.load_yaml(text)
    except persona_input.Refused as exc:
        raise PersonaError([f"{source}:{exc.line}: {exc.message}"]) from None

    errors = persona_input.duplicate_keys(root)
    persona, invalid = None, []
    try:
        persona = Persona.model_validate(data)
    except ValidationError as exc:
        invalid = exc.errors()
    for err in invalid[:MAX_ERRORS]:  # locating an error scans its mapping: uncapped, 20k bad keys take minutes
        loc = _location(err)
        path = _dotted(loc)
        message = _describe(err, loc)
        errors.append((persona_input.line_of(root, loc), f"{path}: {message}" if path else message))

    stem = Path(source).stem
    if persona is not None and Path(source).suffix in SUFFIXES and persona.name != stem:
        line = persona_input.line_of(root, ("name",))
        errors.append((line, f"name: {persona.name!r} must match the file name {stem!r}"))
    if errors:
        errors.sort(key=lambda e: e[0])
        report = [f"{source}:{line}: {message}" for line, message in errors[:MAX_ERRORS]]
        if (more := len(errors) + len(invalid[MAX_ERRORS:]) - MAX_ERRORS) > 0:
            report.append(f"{source}: … and {more:,} more problems")
        raise PersonaError(report)
    assert persona is not None
    return persona


def load_persona(path: Path) -> Persona:
    try:
        text = persona_input.read_text(path, MAX_FILE_BYTES)
    except persona_input.Refused as exc:
        raise PersonaError([f"{path}:{exc.line}: {exc.message}"]) from None
    return parse_persona(text, str(path))


def _location(err: Any) -> tuple[Any, ...]:
    if err["type"] == "example_order":
        return ("examples", err["ctx"]["index"], "role")
    if err["type"] == "vision_local":
        return (*err["loc"], "vision")
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
    if kind == "string_too_long":
        return f"too long: {len(err['input']):,} characters (at most {err['ctx']['max_length']:,})"
    if kind == "too_long":
        return f"too many: {err['ctx']['actual_length']:,} items (at most {err['ctx']['max_length']:,})"
    if kind == "literal_error":
        return "must be " + err["ctx"]["expected"].replace("'", "")
    if kind == "string_type":
        return "must be text (put it in quotes if YAML read it as a number, date or yes/no)"
    if kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
        return "a persona file is a mapping of keys: name, system, and optionally display_name, avatar, " \
               "description, examples, model, knowledge"
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
    if persona.avatar:
        data["avatar"] = persona.avatar
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


# ---------------------------------------------------------------------------------------------------- avatars


def avatar_url(persona: Persona, public_url: str | None) -> str | None:
    """The image URL a platform shows for the persona; a file needs the bot's public address to be reachable."""
    if persona.avatar.startswith("https://"):
        return persona.avatar
    if AVATAR_FILE.fullmatch(persona.avatar) and public_url:
        return f"{public_url.rstrip('/')}/avatars/{persona.avatar}"
    return None


def read_avatar(directory: Path, name: str) -> tuple[bytes, str] | None:
    """An avatar file's bytes and content type, or None unless it is really a small image of the type its
    name says: the route serving these is public, so it serves nothing else from the folder."""
    match = AVATAR_FILE.fullmatch(name)
    if match is None:
        return None
    try:
        data = persona_input.read_bytes(Path(directory) / name, MAX_AVATAR_BYTES)
    except (persona_input.Refused, OSError):
        return None
    kind = "jpg" if match.group(1) == "jpeg" else match.group(1)
    signatures = {"png": data.startswith(b"\x89PNG\r\n\x1a\n"), "jpg": data.startswith(b"\xff\xd8\xff"),
                  "gif": data[:6] in (b"GIF87a", b"GIF89a"), "webp": data[:4] == b"RIFF" and data[8:12] == b"WEBP"}
    return (data, AVATAR_TYPES[kind]) if signatures[kind] else None


# ---------------------------------------------------------------------------------------------------- library


@dataclasses.dataclass(frozen=True)
class _Entry:
    path: Path
    stamp: tuple[int, int, int]
    persona: Persona | None  # the last version that validated; None if the file never has
    errors: list[str]


@dataclasses.dataclass(frozen=True)
class _Index:
    """One reload's view of the folder, swapped in whole so a reader never sees half of one."""

    entries: dict[Path, _Entry]
    by_name: dict[str, Persona]
    conflicts: dict[Path, str]


_EMPTY = _Index({}, {}, {})
# One thread parses for every library: reloads are rare, and one at a time keeps a burst of edits cheap.
_RELOADER = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="personas")


class PersonaLibrary:
    """The personas directory, re-checked at most once every `recheck_seconds`.

    A stat per file is microseconds, so lookups see edits, new files and deletions without a watcher or a
    restart; only files whose mtime, size or inode changed are parsed again. In the bot, `await refresh()`
    does this on a worker thread, so parsing never holds up the event loop, and the reads (`get`, `names`,
    `all`, `errors`) then look at what it found. Where no event loop runs (the CLI), the reads refresh
    by themselves.
    """

    def __init__(self, directory: Path, *, recheck_seconds: float = 1.0):
        self.directory = Path(directory)
        # Every message looks its persona up; statting the folder at most this often keeps that free.
        self.recheck_seconds = recheck_seconds
        self._checked_at = -math.inf
        self._index: _Index | None = None  # None until the first reload
        self._reloading: concurrent.futures.Future[None] | None = None
        self._lock = threading.Lock()  # one reload of this library at a time, on whichever thread

    async def refresh(self) -> None:
        """Reload on the worker thread if it is time to; lookups meanwhile read the previous index."""
        if self._index is not None and not self._due():
            return
        if self._reloading is None or self._reloading.done():
            self._checked_at = time.monotonic()
            self._reloading = _RELOADER.submit(self._reload)
        # Until the first index exists every caller waits for it; shielded, so one cancelled lookup
        # does not cancel the reload the others wait on.
        await asyncio.shield(asyncio.wrap_future(self._reloading))

    def get(self, name: str) -> Persona:
        try:
            return self._current().by_name[name]
        except KeyError:
            raise UnknownPersona(name, self.names()) from None

    def names(self) -> list[str]:
        return sorted(self._current().by_name)

    def all(self) -> list[Persona]:
        by_name = self._current().by_name
        return [by_name[name] for name in sorted(by_name)]

    @property
    def errors(self) -> dict[Path, list[str]]:
        """Files that currently fail to validate (some may still be serving their last good version)."""
        index = self._current()
        found = {path: list(entry.errors) for path, entry in index.entries.items() if entry.errors}
        for path, message in index.conflicts.items():
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
        self._reload()
        return path

    def _path_for(self, name: str) -> Path:
        self._reload()
        for path, entry in (self._index or _EMPTY).entries.items():
            if entry.persona is not None and entry.persona.name == name:
                return path
        return self.directory / f"{name}.yaml"

    def _due(self) -> bool:
        return time.monotonic() - self._checked_at >= self.recheck_seconds

    def _current(self) -> _Index:
        """The index to read. Where an event loop runs only `refresh()` reloads, since a parse here would stall
        the loop; the exception is the first load, which a read cannot do without."""
        if self._index is None or (self._due() and not _in_event_loop()):
            self._checked_at = time.monotonic()
            self._reload()
        return self._index or _EMPTY

    def _reload(self) -> None:
        """Stat the folder, parse the files that changed, and swap in the new index."""
        with self._lock:
            old = self._index or _EMPTY
            entries: dict[Path, _Entry] = {}
            for path, stamp in self._stamps().items():
                entry = old.entries.get(path)
                entries[path] = entry if entry is not None and entry.stamp == stamp else _load_entry(path, stamp, entry)
            for path in old.entries.keys() - entries.keys():
                log.info("persona file %s removed", path)
            self._index = _indexed(entries, old.conflicts)

    def _stamps(self) -> dict[Path, tuple[int, int, int]]:
        found: dict[Path, tuple[int, int, int]] = {}
        try:
            with os.scandir(self.directory) as it:
                for item in it:
                    if item.name.endswith(SUFFIXES) and not item.name.startswith(".") and item.is_file():
                        try:
                            st = item.stat()
                        except OSError:  # deleted since the listing
                            continue
                        found[Path(item.path)] = (st.st_mtime_ns, st.st_size, st.st_ino)
        except FileNotFoundError:
            pass
        return found


def _in_event_loop() -> bool:
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return False
    return True


def _load_entry(path: Path, stamp: tuple[int, int, int], previous: _Entry | None) -> _Entry:
    """Parse one file; whatever is wrong with it costs this entry only, and its last good version stays."""
    try:
        return _Entry(path, stamp, load_persona(path), [])
    except PersonaError as exc:
        errors = exc.errors
    except Exception as exc:  # a parser bug must not take every other persona down with this file
        log.exception("persona file %s could not be loaded", path)
        errors = [f"{path}:1: cannot load: {type(exc).__name__}: {exc}"]
    persona = previous.persona if previous else None
    kept = f"; still serving the last good version of {persona.name!r}" if persona else ""
    log.error("persona file %s is invalid%s:\n%s", path, kept, "\n".join(errors))
    return _Entry(path, stamp, persona, errors)


def _indexed(entries: dict[Path, _Entry], logged: dict[Path, str]) -> _Index:
    """Personas by name; a second file claiming a name is ignored and reported (once; `logged` were before)."""
    by_name: dict[str, Persona] = {}
    owner: dict[str, Path] = {}
    conflicts: dict[Path, str] = {}
    for path in sorted(entries):
        persona = entries[path].persona
        if persona is None:
            continue
        if persona.name in by_name:
            conflicts[path] = f"{path}:1: persona {persona.name!r} is already defined in {owner[persona.name]}; " \
                              "this file is ignored"
            if conflicts[path] != logged.get(path):
                log.error(conflicts[path])
            continue
        by_name[persona.name], owner[persona.name] = persona, path
    return _Index(entries, by_name, conflicts)
