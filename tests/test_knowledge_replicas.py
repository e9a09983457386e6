"""Several processes over one data dir: each keeps its FAISS indexes in step with the shared index.sqlite3 by
following its change log, from the stored vectors: what one process uploads or removes, the others search
within a second, embedding nothing but their queries. Real MiniLM, FAISS and SQLite; real processes where
the point is two of them writing at once."""
from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import sys
import time
from pathlib import Path

import pytest
from openai_server import openai_server  # noqa: F401  (fixture)
from postgres_server import query

from bot.config import Settings
from bot.conversation import ConvKey, Incoming, Role
from bot.engine import Engine
from bot.history import HistoryStore
from bot.models.registry import ModelRegistry
from bot.personas import PersonaLibrary
from bot.retrieval import Retriever

ROOT = Path(__file__).resolve().parent.parent

PARKING = """\
# Parking

Visitors park on level minus two of the north garage; the barrier code is 4471.
"""

CONCIERGE = """\
name: concierge
display_name: Concierge
description: Answers from the facilities notes.
system: You answer visitors' questions from the facilities notes.
knowledge: [facilities]
"""

CATERING = """\
# Catering

The canteen serves vegetarian lasagne every Thursday; the kitchen closes at 14:30.
"""


class CountingEmbedder:
    """The shared MiniLM, recording every text this process asks it to embed."""

    def __init__(self, inner):
        self.inner = inner
        self.texts: list[str] = []

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def encode(self, texts, progress=None):
        self.texts.extend(texts)
        return self.inner.encode(texts, progress)


def machine_settings(tmp_path: Path, name: str, url: str | None) -> Settings:
    """With PostgreSQL, each process has a data dir (its replica) of its own, as on two machines; with SQLite
    they share one. The knowledge folder is shared either way (a volume, on several machines)."""
    data = tmp_path / (name if url else "data")
    return Settings(_env_file=None, PERSONABOT_DATA_DIR=data, PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge",
                    DATABASE_URL=url)


@pytest.fixture
async def processes(tmp_path, embedder, store_url):
    """Two processes' views of one knowledge index: each its own store connections, FAISS indexes, follower."""
    pair = [await Retriever.open(machine_settings(tmp_path, name, store_url), embedder=CountingEmbedder(embedder))
            for name in ("a", "b")]
    yield pair
    for retriever in pair:
        await retriever.close()


def chunk_ids(retriever: Retriever, collection: str) -> set[int]:
    index = retriever.indexes.by_collection.get(collection)
    return set() if index is None else set(index.ids().tolist()) - index.dead


async def eventually(check, seconds: float = 5.0) -> float:
    """Seconds until check() held (at most `seconds`)."""
    start = time.monotonic()
    while not check() and time.monotonic() - start < seconds:
        await asyncio.sleep(0.01)
    return time.monotonic() - start


async def test_an_upload_in_one_process_is_searchable_in_another_which_embeds_only_its_query(processes):
    a, b = processes
    question = "What is the barrier code for visitor parking?"
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    await eventually(lambda: b.store.files())  # PostgreSQL: the replica pulls on NOTIFY, within milliseconds

    hits = await b.search(question, ["facilities"], k=3)

    assert hits and hits[0].source == "facilities/parking.md" and "4471" in hits[0].text
    assert b.embedder.texts == [question]


async def test_an_idle_process_catches_up_within_seconds_without_a_search(processes):
    a, b = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")

    await eventually(lambda: chunk_ids(b, "facilities"))

    assert chunk_ids(b, "facilities") == chunk_ids(a, "facilities") != set()
    assert b.embedder.texts == []


async def test_a_process_that_only_follows_never_loads_the_embedding_model(tmp_path, processes, store_url):
    from bot.retrieval.embed import Embedder

    a, _ = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    lazy = Embedder()  # its own instance: the model loads on first use
    follower = await Retriever.open(machine_settings(tmp_path, "c", store_url), embedder=lazy)
    try:
        await a.add_upload("catering.md", CATERING.encode(), "canteen")
        await eventually(lambda: chunk_ids(follower, "canteen"))

        assert chunk_ids(follower, "canteen") == chunk_ids(a, "canteen") != set()
        assert lazy._model is None and lazy.encoded == 0
    finally:
        await follower.close()


async def test_a_removal_in_one_process_is_gone_from_the_others_search(processes):
    a, b = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    await a.add_upload("catering.md", CATERING.encode(), "facilities")
    await eventually(lambda: len(chunk_ids(b, "facilities")) == 2)
    assert "facilities/parking.md" in {h.source for h in await b.search("barrier code", ["facilities"], k=5)}

    assert await a.remove("facilities/parking.md")
    await eventually(lambda: len(chunk_ids(b, "facilities")) == 1)
    hits = await b.search("barrier code", ["facilities"], k=5)

    assert {h.source for h in hits} == {"facilities/catering.md"}
    assert chunk_ids(b, "facilities") == chunk_ids(a, "facilities")


async def test_a_collection_emptied_elsewhere_leaves_this_process_too(processes):
    a, b = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    await eventually(lambda: chunk_ids(b, "facilities"))
    assert await b.search("barrier code", ["facilities"])

    await a.remove("facilities/parking.md")
    await eventually(lambda: "facilities" not in b.indexes.names())

    assert await b.search("barrier code", ["facilities"]) == []
    assert "facilities" not in b.indexes.names()


async def test_a_sync_in_the_other_process_finds_the_upload_indexed_and_embeds_nothing(processes):
    a, b = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")

    report = await b.sync()

    assert report.embedded == 0 and not report.changed and report.unchanged == 1
    assert b.embedder.texts == []


async def test_a_process_that_sees_no_knowledge_folder_removes_nothing_for_the_others(tmp_path, processes,
                                                                                      store_url, embedder):
    a, _ = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    astray = machine_settings(tmp_path, "c", store_url).model_copy(update={"knowledge_dir": tmp_path / "elsewhere"})
    started_elsewhere = await Retriever.open(astray, embedder=embedder)  # e.g. the default ./knowledge, another cwd
    try:
        report = await started_elsewhere.sync()
    finally:
        await started_elsewhere.close()

    assert report.removed == []
    assert [h.source for h in await a.search("barrier code", ["facilities"], k=1)] == ["facilities/parking.md"]


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
async def test_a_process_behind_a_pruned_log_compares_whole_collections(processes):
    a, b = processes
    b.indexer._stop_following.set()  # only the search below catches up
    b.indexer._wake.set()
    b.indexer._follower.join()
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    await a.add_upload("catering.md", CATERING.encode(), "canteen")
    a.store.prune_changes(keep=1)
    assert b.store.changes_since(b.indexes.seen) is None

    hits = await b.search("Which day is lasagne served?", ["canteen"], k=1)

    assert hits[0].source == "canteen/catering.md"
    assert chunk_ids(b, "facilities") == chunk_ids(a, "facilities") != set()
    assert b.indexes.seen == b.store.latest_change()


async def test_nothing_changed_costs_a_search_one_lookup(processes):
    a, b = processes
    await a.add_upload("parking.md", PARKING.encode(), "facilities")
    await eventually(lambda: chunk_ids(b, "facilities"))
    b.indexes.catch_up()
    indexes_before = dict(b.indexes.by_collection)

    assert b.indexes.catch_up(wait=1) and b.indexes.seen == b.store.latest_change()
    assert b.indexes.by_collection == indexes_before  # the same index objects: nothing rebuilt or copied


async def test_a_document_uploaded_through_one_engine_grounds_the_other_engines_reply(tmp_path, openai_server,
                                                                                      embedder):
    personas = tmp_path / "personas"
    personas.mkdir()
    (personas / "concierge.yaml").write_text(CONCIERGE)
    settings = Settings(
        _env_file=None, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url,
        PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=personas,
        PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge", PERSONABOT_DEFAULT_PERSONA="concierge")
    engines = [Engine(settings, PersonaLibrary(personas), await HistoryStore.open(settings.db_path),
                      ModelRegistry(settings), await Retriever.open(settings, embedder=CountingEmbedder(embedder)))
               for _ in range(2)]
    try:
        channel = ConvKey("terminal", "local", "lobby")
        await engines[0].add_knowledge(Incoming(channel, "boss", "", role=Role.ADMIN), "parking.md", PARKING.encode())
        openai_server.script("It is 4471 [1].")

        reply = "".join([piece async for piece in engines[1].reply(
            Incoming(channel, "guest", "What is the barrier code for visitor parking?"))])

        assert "4471" in openai_server.requests[-1]["messages"][0]["content"]
        assert reply.endswith("Sources: [1] facilities/parking.md § Parking")
        assert len(engines[1].retriever.embedder.texts) == 1  # the question; the document was embedded once, by 0
    finally:
        for engine in engines:
            await engine.close()


ADDER = """
import sys, time
from bot.cli.knowledge import app
time.sleep(max(0.0, float(sys.argv[1]) - time.time()))
app(sys.argv[2:])
"""


def documents(folder: Path, prefix: str, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        (folder / f"{prefix}-{i}.md").write_text(
            f"# {prefix} note {i}\n\nThe {prefix} locker {i} opens with code {prefix}-{1000 + i}.\n\n"
            + "Filler sentence about the office so that notes differ in length. " * (i % 5 + 1))
    return folder


async def test_two_processes_adding_at_once_leave_one_consistent_index(tmp_path, embedder, store_url):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    start = str(time.time() + 3)  # both past their imports and the model load, then adding together
    adders = []
    for name in ("north", "south"):
        settings = machine_settings(tmp_path, name, store_url)
        adders.append(await asyncio.create_subprocess_exec(
            sys.executable, "-c", ADDER, start, "add", str(documents(tmp_path / name / "in", name, 12)),
            "--collection", "lockers", cwd=tmp_path, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            env={**env, "PERSONABOT_DATA_DIR": str(settings.data_dir),
                 "PERSONABOT_KNOWLEDGE_DIR": str(settings.knowledge_dir),
                 **({"DATABASE_URL": store_url} if store_url else {})}))
    results = [await asyncio.wait_for(adder.communicate(), 300) for adder in adders]

    assert [adder.returncode for adder in adders] == [0, 0], [err.decode()[-2000:] for _, err in results]
    if store_url:
        assert query(store_url, "SELECT COUNT(*), SUM(chunks) FROM knowledge_files") == [(24, 24)]
        stored = [i for (i,) in query(store_url, "SELECT id FROM knowledge_chunks ORDER BY id")]
    # each document was embedded once, by whichever process indexed it: the other found it done
    assert sum(int(re.search(r"(\d+) embedded", out.decode())[1]) for out, _ in results) == 24
    # both writers' replicas (brought up to date as they open) and a new one, or the one shared SQLite index
    for name in ("north", "south", "reader") if store_url else ("data",):
        reader = await Retriever.open(machine_settings(tmp_path, name, store_url),
                                      embedder=CountingEmbedder(embedder))
        try:
            db = sqlite3.connect(reader.store.path, isolation_level=None)  # autocommit: the FTS5 check locks nothing
            assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
            db.execute("INSERT INTO chunks_fts(chunks_fts) VALUES ('integrity-check')")  # raises when FTS5 disagrees
            files, listed = db.execute("SELECT COUNT(*), SUM(chunks) FROM files").fetchone()
            here = [i for (i,) in db.execute("SELECT id FROM chunks ORDER BY id")]
            indexed = db.execute("SELECT COUNT(*) FROM chunks_fts").fetchone()[0]
            assert files == 24 and listed == len(here) == indexed == 24
            assert here == (stored if store_url else here)
            db.close()
            hits = await reader.search("Which code opens south locker 7?", ["lockers"], k=1)
            assert hits[0].source == "lockers/south-7.md"
            assert sorted(chunk_ids(reader, "lockers")) == here
            assert reader.embedder.texts == ["Which code opens south locker 7?"]
        finally:
            await reader.close()


HOLDER = """
import sys, time
from bot.retrieval.replica import Primary
Primary(sys.argv[1]).take_turn()
print("holding", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)
async def test_a_process_killed_in_its_turn_lets_the_next_one_index(store_url):
    from bot.retrieval.replica import Primary

    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", HOLDER, store_url, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=asyncio.subprocess.PIPE)
    assert await asyncio.wait_for(holder.stdout.readline(), 60) == b"holding\n"
    holder.kill()  # SIGKILL: no cleanup runs; PostgreSQL drops its session lock with its connection
    await holder.wait()
    next_one = await asyncio.to_thread(Primary, store_url)
    try:
        await asyncio.wait_for(asyncio.to_thread(next_one.take_turn), 10)
        next_one.end_turn()
    finally:
        next_one.close()
