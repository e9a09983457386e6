"""Knowledge replicas: several processes over one data dir, each following the index's change log.

Prints what following costs and how fresh it keeps a process that did not do the writing:
- the freshness check every search makes when nothing changed (µs);
- upload in another *process* (the CLI's `knowledge add`) to searchable here, and what this process embedded;
- catching up with N chunks written elsewhere (stored vectors read back, FAISS add) against rebuilding the
  collection from the store and against embedding the text again;
- what the change log adds to writing chunks (the triggers' rows).

    python bench/replicas.py                 # 20k synthetic chunks for the catch-up figures
    python bench/replicas.py --chunks 5000   # quicker
    python bench/replicas.py --hnsw          # the catch-up figures on an HNSW index
    python bench/replicas.py --postgres      # also with PostgreSQL as the primary (DATABASE_URL or a throwaway one)
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bot.config import Settings  # noqa: E402
from bot.retrieval import Retriever  # noqa: E402
from bot.retrieval.indexing import FOLLOW_SECONDS  # noqa: E402
from bot.retrieval.chunk import Chunk  # noqa: E402
from bot.retrieval.embed import Embedder  # noqa: E402
from bot.retrieval.store import FileEntry, Store  # noqa: E402
from bot.retrieval import vectors as faiss_indexes  # noqa: E402
from bot.retrieval.vectors import Indexes  # noqa: E402

DIM = 384


class Counting:
    """The shared MiniLM, counting the texts this process embeds."""

    def __init__(self, inner):
        self.inner, self.texts = inner, 0

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, progress=None):
        self.texts += len(texts)
        return self.inner.encode(texts, progress)


def unit(rng: np.random.Generator, n: int) -> np.ndarray:
    vectors = rng.standard_normal((n, DIM)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def put(store: Store, source: str, collection: str, vectors: np.ndarray, first: int = 0) -> float:
    """Writes one synthetic document of len(vectors) chunks; returns the seconds the write took."""
    chunks = [Chunk(f"passage {first + i} of {source}", "", f"h{source}{i}", 40) for i in range(len(vectors))]
    start = time.perf_counter()
    store.replace(FileEntry(source, collection, source, 0, 0, len(chunks)), chunks, vectors)
    return time.perf_counter() - start


def per_call(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


async def freshness(root: Path, embedder: Embedder, url: str | None) -> None:
    """With PostgreSQL the other process has a data dir (a replica) of its own, as on another machine."""
    settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=root / "data", PERSONABOT_KNOWLEDGE_DIR=root / "knowledge",
                        DATABASE_URL=url)
    here = await Retriever.open(settings, embedder=Counting(embedder))
    (root / "note.md").write_text("# Parking\n\nVisitors park on level minus two; the barrier code is 4471.\n")
    script = ("import sys, time; from bot.cli.knowledge import app\n"
              "try:\n    app(sys.argv[1:])\nfinally:\n    print('returned', time.time(), file=sys.stderr)\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PERSONABOT_KNOWLEDGE_DIR": str(settings.knowledge_dir),
           "PERSONABOT_DATA_DIR": str(root / "other" if url else settings.data_dir),
           **({"DATABASE_URL": url} if url else {})}
    other = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, "add", str(root / "note.md"), "--collection", "facilities", cwd=root, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    question = "What is the barrier code?"
    before, committed, found = here.store.latest_change(), None, None
    while found is None:
        if committed is None and here.store.latest_change() != before:
            committed = time.time()
        if await here.search(question, ["facilities"], k=1):
            found = time.time()
        else:
            await asyncio.sleep(0.01)
    _, err = await other.communicate()
    returned = float(err.decode().rsplit("returned ", 1)[1])
    print(f"[{'PostgreSQL' if url else 'SQLite'}] upload in another process → searchable here: "
          f"{1000 * (found - committed):.0f} ms after its chunks showed in this process's index file, "
          f"{1000 * (found - returned):+.0f} ms from its `knowledge add` returning (searching every 10 ms); "
          f"this process embedded {here.embedder.texts} text(s): its query, once the collection existed")
    await here.search(question, ["facilities"], k=1)
    idle = min(per_call(lambda: here.indexes.catch_up(0.1, most=256), 5_000) for _ in range(5))  # as a search does
    lookup = min(per_call(here.store.latest_change, 5_000) for _ in range(5))
    print(f"freshness check per search, nothing changed: {idle:.1f} µs (of which the log lookup {lookup:.1f} µs)")
    await here.close()


async def follow_latency(root: Path, embedder: Embedder, url: str | None, uploads: int = 10) -> None:
    """Two retrievers in this process (with PostgreSQL, two data dirs): how long after an upload in one
    returns the other's FAISS index holds it without being searched, and whether a search right away finds it."""
    def settings(name: str) -> Settings:
        return Settings(_env_file=None, PERSONABOT_DATA_DIR=root / (name if url else "data"),
                        PERSONABOT_KNOWLEDGE_DIR=root / "knowledge", DATABASE_URL=url)

    writer = await Retriever.open(settings("a"), embedder=embedder)
    idle = await Retriever.open(settings("b"), embedder=Counting(embedder))
    asking = await Retriever.open(settings("c"), embedder=Counting(embedder))
    waits, found = [], 0
    for n in range(uploads):
        await writer.add_upload(f"note-{n}.md", f"# Note {n}\n\nLocker {n} opens with code {7000 + n}.\n".encode(),
                                "notes")
        returned = time.perf_counter()
        hits = await asking.search(f"Which code opens locker {n}?", ["notes"], k=1)
        found += bool(hits) and hits[0].source == f"notes/note-{n}.md"
        wanted = len(writer.indexes.by_collection["notes"].ids())
        while (index := idle.indexes.by_collection.get("notes")) is None or len(index.ids()) < wanted:
            await asyncio.sleep(0.001)
        waits.append(time.perf_counter() - returned)
    waits.sort()
    print(f"[{'PostgreSQL' if url else 'SQLite'}] after an upload in one process returns: an idle one holds it in "
          f"FAISS p50 {1000 * waits[len(waits) // 2]:.0f} ms, max {1000 * waits[-1]:.0f} ms "
          f"({'NOTIFY' if url else f'polled every {FOLLOW_SECONDS:g} s'}); a search at once found it "
          f"{found}/{uploads}; embedded by the others: {idle.embedder.texts} texts (idle), "
          f"{asking.embedder.texts} (asking: its {uploads} queries)")
    for retriever in (writer, idle, asking):
        await retriever.close()


def catch_up(root: Path, chunks: int, embedder: Embedder) -> None:
    rng = np.random.default_rng(0)
    writer = Store(root / "index.sqlite3")
    writer.set_meta("dim", str(DIM))
    put(writer, "big/base.md", "big", unit(rng, chunks))
    follower_store = Store(root / "index.sqlite3")
    follower = Indexes(root / "faiss", follower_store, lambda: DIM)
    follower.load()
    kind = "hnsw" if follower.by_collection["big"].hnsw else "flat"
    for batch in (1, 10, 100, 1000, 2000):
        put(writer, f"big/more-{batch}.md", "big", unit(rng, batch), chunks)
        start = time.perf_counter()
        follower.catch_up()
        took = time.perf_counter() - start
        print(f"catch up with {batch:>5} chunks added elsewhere ({chunks}+ in a {kind} index): {1000 * took:8.1f} ms")
    for batch in (10, 2000):
        writer.remove(f"big/more-{batch}.md")
        start = time.perf_counter()
        follower.catch_up()
        took = time.perf_counter() - start
        print(f"catch up with {batch:>5} chunks removed elsewhere: {1000 * took:8.1f} ms")
    follower.by_collection.clear()
    start = time.perf_counter()
    follower.reconcile("big", save=False)
    rebuilt = time.perf_counter() - start
    size = follower.by_collection["big"].size
    print(f"rebuild the whole collection from stored vectors ({size} chunks): {1000 * rebuilt:8.1f} ms")
    texts = [f"A passage of about forty tokens, number {i}, " * 4 for i in range(64)]
    start = time.perf_counter()
    embedder.encode(texts)
    rate = len(texts) / (time.perf_counter() - start)
    print(f"embedding them again instead (MiniLM here): {rate:.0f} chunks/s, {size / rate:.0f} s for the collection")
    follower_store.close()
    writer.close()


def replica_pull(root: Path, url: str, chunks: int) -> None:
    """A replica applying one small document, and a new replica pulling a whole index, from PostgreSQL."""
    from bot.retrieval.replica import ReplicatedStore

    rng = np.random.default_rng(2)
    writer = ReplicatedStore(root / "writer.sqlite3", url)
    writer.set_meta("dim", str(DIM))
    start = time.perf_counter()
    for first in range(0, chunks, 2000):
        put(writer, f"big/part-{first}.md", "big", unit(rng, min(2000, chunks - first)), first)
    written = time.perf_counter() - start
    start = time.perf_counter()
    joined = ReplicatedStore(root / "joined.sqlite3", url)
    joined.pull()
    pulled = time.perf_counter() - start
    print(f"[PostgreSQL] {chunks} chunks written through one replica in {written:.1f} s (to PostgreSQL and back "
          f"into its own file); a new replica pulls them all in {pulled:.1f} s ({chunks / pulled:.0f} chunks/s)")
    times = []
    for n in range(20):
        put(writer, f"small/doc-{n}.md", "small", unit(rng, 10))
        start = time.perf_counter()
        joined.pull()
        times.append(time.perf_counter() - start)
    check = per_call(joined.primary.latest, 200)
    print(f"[PostgreSQL] a replica applying one 10-chunk document: p50 {1000 * sorted(times)[10]:.1f} ms; "
          f"asking PostgreSQL for its latest change: {check:.0f} µs (the follower thread's, not a search's)")
    joined.close()
    writer.close()


def log_overhead(root: Path, chunks: int) -> None:
    rng = np.random.default_rng(1)
    vectors = unit(rng, chunks)
    timings: dict[bool, list[float]] = {True: [], False: []}
    for attempt in range(3):
        for logged in (True, False):
            store = Store(root / f"{attempt}-{logged}.sqlite3")
            if not logged:
                store.db.executescript("DROP TRIGGER chunks_logged_ai; DROP TRIGGER chunks_logged_ad;")
            timings[logged].append(put(store, "w/doc.md", "w", vectors))
            store.close()
    logged, plain = min(timings[True]), min(timings[False])
    print(f"writing {chunks} chunks: {1000 * logged:.0f} ms with the change log, {1000 * plain:.0f} ms without "
          f"({100 * (logged / plain - 1):+.0f}%)")


@contextlib.contextmanager
def postgres():
    """Yields a function that gives a new empty database's URL ($DATABASE_URL's, every time, when set)."""
    if url := os.environ.get("DATABASE_URL"):
        yield lambda: url
        return
    sys.path.insert(0, str(ROOT / "tests"))
    from postgres_server import bench_server

    with bench_server() as cluster:
        yield lambda: cluster.url(cluster.new_database())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--chunks", type=int, default=20_000, help="synthetic chunks for the catch-up figures")
    parser.add_argument("--hnsw", action="store_true", help="an HNSW index (its threshold lowered below --chunks)")
    parser.add_argument("--postgres", action="store_true",
                        help="also with PostgreSQL as the primary: $DATABASE_URL, or a throwaway server")
    args = parser.parse_args()
    embedder = Embedder.shared()
    embedder.encode(["warm up the model"])
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        asyncio.run(freshness(root / "fresh", embedder, None))
        asyncio.run(follow_latency(root / "latency", embedder, None))
        if args.postgres:
            with postgres() as database:
                asyncio.run(freshness(root / "fresh-pg", embedder, database()))
                asyncio.run(follow_latency(root / "latency-pg", embedder, database()))
                replica_pull(root / "pull", database(), args.chunks)
        if args.hnsw:
            faiss_indexes.HNSW_THRESHOLD = args.chunks // 2
        catch_up(root / "follow", args.chunks, embedder)
        log_overhead(root / "log", args.chunks)


if __name__ == "__main__":
    main()
