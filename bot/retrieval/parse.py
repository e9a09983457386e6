"""Documents to blocks: the paragraphs of a file, each tagged with where it sits (heading path, page or lines).

Parsing works on bytes so an upload is checked and parsed in memory before anything is written to disk.

Every document is hostile until parsed: whatever goes wrong inside a parser becomes UnsupportedDocument, so a
bad file costs its own entry and never a whole sync. The work one document may cost is bounded: a file read
by sync is at most MAX_FILE_BYTES, its text at most MAX_TEXT_CHARS (a 750-page book; a million-row CSV is
many times that), a PDF at most MAX_PDF_PAGES pages read within PDF_SECONDS, on top of pypdf's own limits
(pypdf.Configuration: 75 MB per decoded stream, 2 million tokens per content stream), and JSON as deep as
Python's parser goes (about 1,000 levels). chunk.MAX_CHUNKS caps what is left to embed.
"""
from __future__ import annotations

import io
import json
import re
import time
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import PurePath

FORMATS = {
    ".md": "markdown", ".markdown": "markdown",
    ".txt": "text", ".text": "text",
    ".html": "html", ".htm": "html",
    ".pdf": "pdf",
    ".json": "json",
    ".csv": "csv",
}
SUPPORTED = ", ".join(sorted(FORMATS))
MAX_FILE_BYTES = 64 * 1024 * 1024
MAX_TEXT_CHARS = 2_000_000
MAX_PDF_PAGES = 2_000
PDF_SECONDS = 120.0


class UnsupportedDocument(ValueError):
    """The file cannot become knowledge; the message says why, fit to show the person who supplied it."""


@dataclass(frozen=True)
class Block:
    """A paragraph (or code block, or page) that chunking may join with its neighbours but never cut lightly."""

    text: str
    section: str  # heading path, "" where the format has none
    start: int  # first line, or page
    end: int


@dataclass(frozen=True)
class Document:
    title: str
    unit: str  # "line" or "page": what Block.start/end count
    blocks: list[Block]

    def locator(self, section: str, start: int, end: int) -> str:
        if section:
            return section
        noun = self.unit if start == end else f"{self.unit}s"
        return f"{noun} {start}" if start == end else f"{noun} {start}–{end}"


def format_of(name: str) -> str:
    suffix = PurePath(name).suffix.lower()
    if suffix not in FORMATS:
        raise UnsupportedDocument(f"{PurePath(name).name}: unsupported file type {suffix or '(none)'}; "
                                  f"knowledge accepts {SUPPORTED}.")
    return FORMATS[suffix]


def decode_text(name: str, data: bytes) -> str:
    if b"\x00" in data:
        raise UnsupportedDocument(f"{name}: contains binary data (NUL bytes), not text.")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UnsupportedDocument(f"{name}: is not UTF-8 text (bad byte at offset {exc.start}).") from None


def parse(name: str, data: bytes) -> Document:
    """Raises UnsupportedDocument, and only that: for unknown types, undecodable or oversized text, broken
    JSON, unreadable PDFs, and any failure of a parser on input it was never meant to see."""
    try:
        return _parse(name, data)
    except UnsupportedDocument:
        raise
    except Exception as exc:  # a parser's bug on a hostile file must cost that file, not the sync
        raise UnsupportedDocument(f"{name}: cannot be read ({type(exc).__name__}: {exc}).") from None


def _parse(name: str, data: bytes) -> Document:
    kind = format_of(name)
    title = PurePath(name).stem
    if kind == "pdf":
        return _parse_pdf(name, title, data)
    text = decode_text(name, data).replace("\r\n", "\n").replace("\r", "\n")
    _check_length(name, len(text))
    if kind == "json":
        try:
            json.loads(text)
        except json.JSONDecodeError as exc:
            raise UnsupportedDocument(f"{name}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}.") from None
        except RecursionError:
            raise UnsupportedDocument(f"{name}: the JSON is nested too deeply (about 1,000 levels at most).") from None
    if kind == "markdown":
        return Document(title, "line", _markdown_blocks(text))
    if kind == "html":
        return _parse_html(title, text)
    return Document(title, "line", _paragraphs(text.split("\n"), 1, ""))


def _check_length(name: str, chars: int) -> None:
    if chars > MAX_TEXT_CHARS:
        raise UnsupportedDocument(f"{name}: has more than {MAX_TEXT_CHARS:,} characters of text, the limit per "
                                  "document; split it into smaller files.")


def _paragraphs(lines: list[str], first_line: int, section: str) -> list[Block]:
    blocks, current, start = [], [], 0
    for number, line in enumerate(lines, first_line):
        if line.strip():
            if not current:
                start = number
            current.append(line.rstrip())
        elif current:
            blocks.append(Block("\n".join(current), section, start, number - 1))
            current = []
    if current:
        blocks.append(Block("\n".join(current), section, start, start + len(current) - 1))
    return blocks


_ATX = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*)$")
_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_SETEXT = re.compile(r"^ {0,3}(=+|-+)[ \t]*$")


def _markdown_blocks(text: str) -> list[Block]:
    """Paragraphs under their heading path; fenced code stays whole; YAML front matter is skipped."""
    lines = text.split("\n")
    number = 0
    if lines and lines[0].strip() == "---":
        closing = next((i for i, line in enumerate(lines[1:], 1) if line.strip() in ("---", "...")), None)
        if closing is not None:
            number = closing + 1
    headings: list[tuple[int, str]] = []
    blocks: list[Block] = []
    current: list[str] = []
    start = 0
    fence = ""

    def section() -> str:
        return " › ".join(title for _, title in headings)

    def flush(end: int) -> None:
        nonlocal current
        if current:
            blocks.append(Block("\n".join(current), section(), start, end))
            current = []

    def open_heading(level: int, title: str) -> None:
        while headings and headings[-1][0] >= level:
            headings.pop()
        headings.append((level, re.sub(r"[*_`]", "", title).strip() or "untitled"))

    while number < len(lines):
        line = lines[number]
        lineno = number + 1
        number += 1
        if fence:
            current.append(line.rstrip())
            if line.strip().startswith(fence):
                fence = ""
                flush(lineno)
            continue
        if match := _FENCE.match(line):
            flush(lineno - 1)
            fence, start, current = match.group(1), lineno, [line.rstrip()]
            continue
        if match := _ATX.match(line):
            flush(lineno - 1)
            open_heading(len(match.group(1)), _atx_title(match.group(2)))
            continue
        if (len(current) == 1 and _SETEXT.match(line) and current[0].strip()
                and not current[0].lstrip().startswith(("-", "*", "+", ">"))):
            level = 1 if line.strip().startswith("=") else 2
            heading, current = current[0], []
            open_heading(level, heading)
            continue
        if line.strip():
            if not current:
                start = lineno
            current.append(line.rstrip())
        else:
            flush(lineno - 1)
    flush(len(lines))
    return blocks


def _atx_title(rest: str) -> str:
    """The heading text without its optional closing run of #s. Done by hand: as one regex (lazy title, then
    optional closing sequence) a long line of spaces and #s backtracked for minutes."""
    stripped = rest.rstrip(" \t")
    head = stripped.rstrip("#")
    return head if head.endswith((" ", "\t")) else stripped


def _parse_pdf(name: str, title: str, data: bytes) -> Document:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError

    try:
        reader = PdfReader(io.BytesIO(data))
    except (NotImplementedError, DependencyError) as exc:  # pypdf knows the Standard security handler alone
        raise UnsupportedDocument(f"{name}: the PDF is encrypted in a way that cannot be read ({exc}); "
                                  "upload an unlocked copy.") from None
    if reader.is_encrypted:
        raise UnsupportedDocument(f"{name}: the PDF is encrypted; upload an unlocked copy.")
    if len(reader.pages) > MAX_PDF_PAGES:
        raise UnsupportedDocument(f"{name}: the PDF has {len(reader.pages):,} pages; the limit is {MAX_PDF_PAGES:,}.")
    # pypdf bounds each stream, not the document: pages sharing one costly content stream cost it each time.
    deadline = time.monotonic() + PDF_SECONDS
    pages: list[str] = []
    chars = 0
    for number, page in enumerate(reader.pages, 1):
        if time.monotonic() > deadline:
            raise UnsupportedDocument(f"{name}: reading the PDF took over {PDF_SECONDS:g} s (stopped at page "
                                      f"{number} of {len(reader.pages)}).")
        pages.append(page.extract_text() or "")
        chars += len(pages[-1])
        _check_length(name, chars)
    meta_title = (reader.metadata or {}).get("/Title") if reader.metadata else None
    blocks = [
        Block(re.sub(r"[ \t]+\n", "\n", text).strip(), "", page, page)
        for page, text in enumerate(pages, 1)
        if text.strip()
    ]
    if not blocks:
        raise UnsupportedDocument(f"{name}: the PDF has no text layer (a scan?); run OCR on it first.")
    return Document(str(meta_title or title), "page", blocks)


_BLOCK_TAGS = {
    "p", "div", "li", "ul", "ol", "br", "tr", "table", "pre", "section", "article", "blockquote", "dd", "dt",
    "dl", "main", "header", "footer", "aside", "figure", "figcaption", "hr", "td", "th", "form",
}
_SKIP_TAGS = {"script", "style", "template", "noscript", "svg", "nav", "head"}


class _HTMLBlocks(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self.title = ""
        self._headings: list[tuple[int, str]] = []
        self._text: list[str] = []
        self._skip = 0
        self._heading_level = 0
        self._in_title = False
        self._pre = 0
        self._count = 0

    def handle_starttag(self, tag: str, attrs) -> None:
        if tag == "title":
            self._in_title = True
        elif tag in _SKIP_TAGS:
            self._skip += 1
        elif re.fullmatch(r"h[1-6]", tag):
            self._flush()
            self._heading_level = int(tag[1])
        elif tag in _BLOCK_TAGS:
            self._flush()
            self._pre += tag == "pre"

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        elif tag in _SKIP_TAGS:
            self._skip = max(0, self._skip - 1)
        elif re.fullmatch(r"h[1-6]", tag) and self._heading_level:
            title = " ".join("".join(self._text).split()) or "untitled"
            self._text = []
            while self._headings and self._headings[-1][0] >= self._heading_level:
                self._headings.pop()
            self._headings.append((self._heading_level, title))
            self._heading_level = 0
        elif tag in _BLOCK_TAGS:
            self._flush()
            self._pre -= tag == "pre" and self._pre > 0

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        elif not self._skip:
            self._text.append(data)

    def _flush(self) -> None:
        raw = "".join(self._text)
        self._text = []
        text = raw.strip("\n") if self._pre else " ".join(raw.split())
        if text.strip():
            self._count += 1
            section = " › ".join(title for _, title in self._headings)
            self.blocks.append(Block(text, section, self._count, self._count))

    def close(self) -> None:
        super().close()
        self._flush()


def _parse_html(title: str, text: str) -> Document:
    """One feed, then whatever markup is left unterminated at the end is dropped, as HTML5 drops a tag cut off
    by the end of the file. Python before 3.12.11/3.13.4 (gh-135462) instead retries every unterminated `<`
    against the rest of the file on close(), which is quadratic: 80 KB of `<a` took 2 s, 4 MB would take hours.
    Text left waiting (a possible `&…` at the end) does not start with `<` and is kept."""
    parser = _HTMLBlocks()
    parser.feed(text)
    if parser.rawdata.startswith("<"):
        parser.rawdata = ""
    parser.close()
    return Document(" ".join(parser.title.split()) or title, "paragraph", parser.blocks)
