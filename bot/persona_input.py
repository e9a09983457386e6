"""Persona input read defensively: files anyone could have put there, and YAML that could be hostile.

A persona is a few keys of plain text in a small file. Reading stops at a size limit and refuses anything
but a regular file (a FIFO blocks, a link to /dev/zero never ends). In the YAML, anchors and aliases let 400
characters expand to billions of nodes, deep nesting overflows the recursive composer, explicit tags reach
constructors that crash on odd input, and thousands of nodes cost seconds to build; a persona needs none of
these, so they are refused from the event stream, with their line, before PyYAML builds a single node.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_DEPTH = 8  # collections inside collections; a persona needs 3 (file → examples → turn)
# Keys, values and collections; the largest persona the limits allow has about 400. Building and checking
# nodes holds the GIL, so this keeps the worst file to milliseconds on the worker thread, not a stalled loop.
MAX_NODES = 5000

# libyaml when it is there: parsing the largest file a persona may be takes milliseconds instead of a second.
_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class Refused(Exception):
    """Why an input is not a persona, and the 1-based line where that shows."""

    def __init__(self, line: int, message: str):
        super().__init__(message)
        self.line = line
        self.message = message


def read_bytes(path: Path, limit: int) -> bytes:
    """A regular file's bytes, refused unread when over `limit`."""
    try:
        with open(path, "rb", opener=lambda name, flags: os.open(name, flags | getattr(os, "O_NONBLOCK", 0))) as f:
            info = os.fstat(f.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise Refused(1, "not a regular file")
            data = b"" if info.st_size > limit else f.read(limit + 1)  # one byte more shows a file still growing
    except OSError as exc:
        raise Refused(1, f"cannot read: {exc.strerror or exc}") from None
    if (size := max(info.st_size, len(data))) > limit:
        raise Refused(1, too_big(size, limit))
    return data


def read_text(path: Path, limit: int) -> str:
    data = read_bytes(path, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise Refused(line, f"not UTF-8 text (byte {exc.start} is {data[exc.start]:#04x})") from None


def too_big(size: int, limit: int) -> str:
    return f"too big: {size:,} bytes (at most {limit:,})"


class _Loader(_Base):  # type: ignore[misc, valid-type]
    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # An implicit date such as 2024-13-45 raises a bare ValueError, with no line; give it the node's.
        try:
            return super().construct_object(node, deep)
        except ValueError as exc:
            raise yaml.constructor.ConstructorError(None, None, str(exc), node.start_mark) from None

    def construct_bounded_int(self, node: yaml.ScalarNode) -> int:
        # YAML 1.1 reads 1:59:59:… as base 60, in time that grows with the square of its length.
        if len(node.value) > 64:
            raise yaml.constructor.ConstructorError(None, None, "a number this long is no setting; quote it if it "
                                                    "is text", node.start_mark)
        return self.construct_yaml_int(node)


_Loader.add_constructor("tag:yaml.org,2002:int", _Loader.construct_bounded_int)


def load_yaml(text: str) -> tuple[yaml.Node | None, Any]:
    """The node tree (for line numbers) and the data of a single YAML document; Refused if refused."""
    try:
        _check_events(_Loader(text))
        loader = _Loader(text)
        try:
            root = loader.get_single_node()
            return root, (loader.construct_document(root) if root is not None else None)
        finally:
            loader.dispose()
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        raise Refused(line, f"YAML syntax error: character #x{exc.character:04x} is not allowed") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        kind = "cannot read this value" if isinstance(exc, yaml.constructor.ConstructorError) else "YAML syntax error"
        raise Refused(mark.line + 1 if mark else 1, f"{kind}: {exc.problem or exc}") from None
    except yaml.YAMLError as exc:
        raise Refused(1, f"YAML syntax error: {exc}") from None


def _check_events(loader: yaml.SafeLoader) -> None:
    """Walk the parse events (no nodes yet) and refuse aliases, anchors, tags, merge keys, deep nesting and
    too many nodes."""
    open_: list[int] = []  # per open collection: for a mapping the nodes seen so far, for a sequence -1
    nodes = 0
    try:
        while loader.check_event():
            event = loader.get_event()
            if isinstance(event, yaml.CollectionEndEvent):
                open_.pop()
            if not isinstance(event, yaml.NodeEvent):
                continue
            line = event.start_mark.line + 1
            if (nodes := nodes + 1) > MAX_NODES:
                raise Refused(line, f"more than {MAX_NODES:,} keys and values (a persona has a few hundred)")
            in_mapping = bool(open_) and open_[-1] >= 0
            is_key = in_mapping and open_[-1] % 2 == 0
            if in_mapping:
                open_[-1] += 1
            if isinstance(event, yaml.AliasEvent):
                raise Refused(line, f"aliases (*{event.anchor}) are not allowed in a persona; write the text out")
            if event.anchor is not None:
                raise Refused(line, f"anchors (&{event.anchor}) are not allowed in a persona")
            if event.tag is not None:
                raise Refused(line, f"tags ({event.tag}) are not allowed in a persona; quote the value instead")
            if is_key and isinstance(event, yaml.ScalarEvent) and event.value == "<<" and event.implicit[0]:
                raise Refused(line, "merge keys (<<) are not allowed in a persona; write the keys out")
            if isinstance(event, yaml.CollectionStartEvent):
                open_.append(0 if isinstance(event, yaml.MappingStartEvent) else -1)
                if len(open_) > MAX_DEPTH:
                    raise Refused(line, f"nested more than {MAX_DEPTH} levels deep (a persona needs 3)")
    finally:
        loader.dispose()


def line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
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


def duplicate_keys(node: yaml.Node | None, path: str = "") -> list[tuple[int, str]]:
    """PyYAML keeps the last of two equal keys without a word; an admin would rather hear about it."""
    found: list[tuple[int, str]] = []
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key, value in node.value:
            name = str(key.value)
            where = f"{path}.{name}" if path else name
            if name in seen:
                found.append((key.start_mark.line + 1, f"{where}: duplicate key (only the last one would count)"))
            seen.add(name)
            found += duplicate_keys(value, where)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            found += duplicate_keys(item, f"{path}[{index}]")
    return found
