"""Blocks to chunks sized in the embedding model's own tokens.

A sentence-transformers model silently truncates input past `max_seq_length` word pieces (256 for MiniLM),
so a chunk that is too long is embedded as if its tail did not exist. Chunks are packed from whole
paragraphs under one heading, long paragraphs are split at lines, then sentences, then token windows, and
every chunk is measured once more at the end so none can exceed the limit.

A document is refused past MAX_CHUNKS chunks: embedding that many takes minutes on a CPU (about 8 on two
cores), and a file that big is better split. Counting goes through the tokenizer in slices, so the memory a
long file costs is its counts, not a million encodings at once.
"""
from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from typing import Protocol

from bot.retrieval.parse import Block, Document, UnsupportedDocument

_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[\"'(\[A-Z0-9])")
# Bump whenever the same file would be cut differently, so existing indexes re-chunk on the next sync.
VERSION = 3
MAX_CHUNKS = 5_000  # per document
_COUNT_SLICE = 4096  # texts per tokenizer call


class Tokenizer(Protocol):
    def __call__(self, texts: list[str], **kwargs) -> dict: ...


@dataclass(frozen=True)
class Chunk:
    text: str  # the passage shown to the model and the user
    header: str  # document title and heading path, embedded with the text so a chunk knows where it is
    locator: str
    tokens: int  # of header + text, in the embedding model's tokens, without special tokens

    @property
    def embed_text(self) -> str:
        return f"{self.header}\n{self.text}" if self.header else self.text

    @property
    def hash(self) -> str:
        return hashlib.sha256(self.embed_text.encode()).hexdigest()


@dataclass(slots=True)  # a file of short lines makes millions of these
class _Piece:
    text: str
    tokens: int
    start: int
    end: int
    sep: str  # joins it to the piece before
    carried: bool = False  # overlap from the chunk before: context, not what the chunk's locator points at


class Chunker:
    def __init__(self, tokenizer: Tokenizer, max_tokens: int, chunk_tokens: int = 200, overlap: int = 32):
        """`max_tokens` is the model's limit less its special tokens; `chunk_tokens` the size aimed for."""
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is not None:
            # A private copy: the model's own one carries whatever padding and truncation its last
            # encode call set, and either would falsify the counts.
            from tokenizers import Tokenizer as RustTokenizer

            backend = RustTokenizer.from_str(backend.to_str())
            backend.no_padding()
            backend.no_truncation()
        self._backend = backend
        self.max_tokens = max_tokens
        self.chunk_tokens = min(chunk_tokens, max_tokens)
        self.overlap = overlap

    def _encode(self, texts: list[str]) -> list[tuple[int, list[tuple[int, int]]]]:
        """(token count, character offsets) per text; through the Rust tokenizer when there is one, which is
        faster and does not warn about texts longer than the model reads (measuring them is the point)."""
        if self._backend is not None:
            return [(len(e.ids), e.offsets) for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        out = self.tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [(len(ids), offsets) for ids, offsets in zip(out["input_ids"], out["offset_mapping"])]

    def count(self, texts: list[str]) -> list[int]:
        counts: list[int] = []
        for first in range(0, len(texts), _COUNT_SLICE):
            part = texts[first : first + _COUNT_SLICE]
            if self._backend is not None:  # lengths alone: building every offset list doubled the time
                counts.extend(map(len, self._backend.encode_batch(part, add_special_tokens=False)))
            else:
                counts.extend(n for n, _ in self._encode(part))
        return counts

    def split(self, doc: Document) -> list[Chunk]:
        sections: list[tuple[str, list[Block]]] = []
        for block in doc.blocks:
            if sections and sections[-1][0] == block.section:
                sections[-1][1].append(block)
            else:
                sections.append((block.section, [block]))
        headers = [" › ".join(part for part in (doc.title, section) if part) for section, _ in sections]
        header_tokens = self.count(headers)
        block_tokens = iter(self.count([block.text for _, blocks in sections for block in blocks]))
        chunks: list[Chunk] = []
        for (section, blocks), header, h_tokens in zip(sections, headers, header_tokens):
            if h_tokens > self.chunk_tokens // 2:  # a runaway heading must not crowd out the text
                header = self._window(header, self.chunk_tokens // 2)
                h_tokens = self.count([header])[0]
            budget = self.chunk_tokens - h_tokens - 1
            pieces: list[_Piece] = []
            for block in blocks:
                tokens = next(block_tokens)
                if tokens <= budget:
                    pieces.append(_Piece(block.text, tokens, block.start, block.end, "\n\n"))
                else:
                    pieces.extend(self._split_long(block, budget, doc.unit == "line"))
            for text, start, end in self._pack(pieces, budget):
                chunks.append(Chunk(text, header, doc.locator(section, start, end), 0))
            _check_count(chunks)
        return _check_count(self._measured(chunks))

    def _pack(self, pieces: list[_Piece], budget: int) -> list[tuple[str, int, int]]:
        out: list[tuple[str, int, int]] = []
        current: list[_Piece] = []
        size = 0
        for piece in pieces:
            if current and size + piece.tokens > budget:
                out.append(self._join(current))
                carried, kept = self._carried(current)
                if kept + piece.tokens > budget:
                    carried, kept = [], 0
                current, size = carried, kept
            current.append(piece)
            size += piece.tokens
        if current:
            out.append(self._join(current))
        return out

    def _carried(self, pieces: list[_Piece]) -> tuple[list[_Piece], int]:
        """The overlap a chunk hands to the next: whole trailing pieces when they fit in `overlap` tokens,
        otherwise the tail of the last piece (its closing sentences, or failing that its last words), since
        paragraphs are usually longer than the overlap and a fact cut at a boundary must survive in one chunk."""
        carried: list[_Piece] = []
        kept = 0
        for previous in reversed(pieces):
            if kept + previous.tokens > self.overlap:
                break
            carried.insert(0, replace(previous, carried=True))
            kept += previous.tokens
        if carried or self.overlap <= 0:
            return carried, kept
        last = pieces[-1]
        tail = self._tail(last.text)
        if not tail:
            return [], 0
        tokens = self.count([tail])[0]
        return [_Piece(tail, tokens, last.end, last.end, last.sep, carried=True)], tokens

    def _tail(self, text: str) -> str:
        sentences = [s for s in _SENTENCE.split(text) if s.strip()]
        kept: list[str] = []
        size = 0
        for sentence, tokens in zip(reversed(sentences), reversed(self.count(sentences))):
            if size + tokens > self.overlap:
                break
            kept.insert(0, sentence)
            size += tokens
        if kept:
            return " ".join(kept)
        offsets = self._encode([text])[0][1]
        first = max(0, len(offsets) - self.overlap)
        while 0 < first < len(offsets) and offsets[first][0] == offsets[first - 1][1]:
            first += 1  # start at a word, not inside one
        return text[offsets[first][0] :] if first < len(offsets) else ""

    @staticmethod
    def _join(pieces: list[_Piece]) -> tuple[str, int, int]:
        text = pieces[0].text + "".join(p.sep + p.text for p in pieces[1:])
        located = [p for p in pieces if not p.carried] or pieces
        return text, min(p.start for p in located), max(p.end for p in located)

    def _split_long(self, block: Block, budget: int, by_line: bool) -> list[_Piece]:
        """Lines, then sentences, then token windows: the coarsest cut that fits keeps the most meaning."""
        pieces: list[_Piece] = []
        lines = block.text.split("\n")
        for offset, (line, tokens) in enumerate(zip(lines, self.count(lines))):
            number = block.start + offset if by_line else block.start
            first = "\n\n" if offset == 0 else "\n"
            if not line.strip():
                continue
            if tokens <= budget:
                pieces.append(_Piece(line, tokens, number, number, first))
                continue
            sentences = [s for s in _SENTENCE.split(line) if s.strip()]
            for index, (sentence, s_tokens) in enumerate(zip(sentences, self.count(sentences))):
                sep = first if index == 0 else " "
                if s_tokens <= budget:
                    pieces.append(_Piece(sentence, s_tokens, number, number, sep))
                    continue
                for w_index, window in enumerate(self._windows(sentence, budget)):
                    pieces.append(_Piece(window, self.count([window])[0], number, number, sep if w_index == 0 else " "))
        return pieces

    def _windows(self, text: str, size: int) -> list[str]:
        """Token windows overlapping by `overlap` tokens, cut at the tokenizer's own character offsets."""
        offsets = self._encode([text])[0][1]
        step = max(1, size - self.overlap)
        windows = []
        for first in range(0, len(offsets), step):
            last = min(first + size, len(offsets)) - 1
            windows.append(text[offsets[first][0] : offsets[last][1]])
            if last == len(offsets) - 1:
                break
        return windows

    def _window(self, text: str, size: int) -> str:
        return self._windows(text, size)[0]

    def _measured(self, chunks: list[Chunk]) -> list[Chunk]:
        """Counts of joined text can differ from the sum of the parts' counts by a token; measure the real thing."""
        out: list[Chunk] = []
        for chunk, tokens in zip(chunks, self.count([c.embed_text for c in chunks])):
            if tokens <= self.max_tokens:
                out.append(Chunk(chunk.text, chunk.header, chunk.locator, tokens))
                continue
            budget = self.max_tokens - self.count([chunk.header])[0] - 1
            for window in self._windows(chunk.text, budget):
                piece = Chunk(window, chunk.header, chunk.locator, 0)
                out.append(Chunk(window, chunk.header, chunk.locator, self.count([piece.embed_text])[0]))
        return out


def _check_count(chunks: list[Chunk]) -> list[Chunk]:
    if len(chunks) > MAX_CHUNKS:
        raise UnsupportedDocument(f"it makes more than {MAX_CHUNKS:,} chunks, the limit per document; "
                                  "split it into smaller files.")
    return chunks
