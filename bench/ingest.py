"""Ingest throughput against its floor, and the cost of a sync with nothing to do.

Embedding is the cost of ingest (MiniLM on 2 cores encodes ~9 chunks of 256 tokens a second), so the
figure that matters is how close a full ingest of a folder gets to SentenceTransformer.encode on the same
chunks in the same process: parse, chunk, hash, SQLite, FTS5 and FAISS are overhead on top of it.

    python bench/ingest.py                        # 500 documents of ~300 words
    python bench/ingest.py --docs 200 --words 120 # a quicker run
"""
from __future__ import annotations

import argparse
import asyncio
import importlib.metadata
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import Settings  # noqa: E402
from bot.retrieval import Retriever  # noqa: E402
from bot.retrieval.embed import Embedder  # noqa: E402


def corpus(docs: int, words: int) -> list[str]:
    """Markdown documents cut from the READMEs of installed packages: real prose, real headings."""
    text = "\n\n".join(
        body for dist in importlib.metadata.distributions()
        if len(body := dist.metadata.get_payload() or "") > 2000
    )
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.split()) >= 8]
    out, index = [], 0
    for n in range(docs):
        parts, count = [f"# Document {n}"], 0
        while count < words:
            paragraph = paragraphs[index % len(paragraphs)]
            index += 1
            if count and index % 4 == 0:
                parts.append(f"## Section {index}")
            parts.append(paragraph)
            count += len(paragraph.split())
        out.append("\n\n".join(parts) + "\n")
    return out


async def run(docs: int, words: int) -> None:
    embedder = Embedder.shared()
    embedder.encode(["warm up the model and its thread pool"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "knowledge" / "bench"
        folder.mkdir(parents=True)
        for n, text in enumerate(corpus(docs, words)):
            (folder / f"doc-{n:04d}.md").write_text(text)
        settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=root / "data", PERSONABOT_KNOWLEDGE_DIR=root / "knowledge")
        retriever = await Retriever.open(settings, embedder=embedder)

        started = time.perf_counter()
        report = await retriever.sync()
        ingest = time.perf_counter() - started

        texts = [f"{header}\n{text}" if header else text for header, text in
                 retriever.store.db.execute("SELECT header, text FROM chunks ORDER BY id")]
        started = time.perf_counter()
        embedder.model.encode(texts, batch_size=32, normalize_embeddings=True, convert_to_numpy=True)
        baseline = time.perf_counter() - started

        started = time.perf_counter()
        idle = await retriever.sync()
        noop = time.perf_counter() - started
        await retriever.close()

    tokens = sum(len(ids) for ids in embedder.tokenizer(texts)["input_ids"]) / len(texts)
    print(f"{docs} documents, {report.chunks} chunks (mean {tokens:.0f} tokens), {report.embedded} embedded")
    print(f"full ingest:  {ingest:7.2f} s  {report.chunks / ingest:7.1f} chunks/s")
    print(f"encode only:  {baseline:7.2f} s  {len(texts) / baseline:7.1f} chunks/s (SentenceTransformer.encode)")
    print(f"ingest / encode throughput ratio: {baseline / ingest:.3f}  (target >= 0.85)")
    print(f"sync with nothing changed: {noop * 1e3:.1f} ms = {noop / ingest:.3%} of full ingest (target < 2%); "
          f"{idle.unchanged} unchanged")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=500)
    parser.add_argument("--words", type=int, default=300, help="words per document (about 1.3 tokens each)")
    args = parser.parse_args()
    asyncio.run(run(args.docs, args.words))


if __name__ == "__main__":
    main()
