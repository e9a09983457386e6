"""Hostile documents and colliding names: each is refused or skipped with its reason, no sync or upload fails
because of it, and the other documents still index and answer. Real MiniLM, FAISS and SQLite FTS5, as in
test_knowledge.py. The time bounds are generous guards against runaway parsing, not benchmarks: before the
limits, each input here escaped its parser, or held a sync for minutes to hours."""
from __future__ import annotations

import asyncio
import functools
import io
import re
import time
import zlib

import pytest
from test_knowledge import HANDBOOK, folder_files

from bot.retrieval import UploadRefused
from bot.retrieval import parse as parsing

PARKING = "# Parking\n\nVisitors park on level B2, next to the blue lifts.\n"


def pdf(pages: list[bytes], *, encrypt: dict[str, str] | None = None) -> bytes:
    """A PDF whose pages run the given content streams (Flate, level 1: a bomb is as good and quick to make),
    in Helvetica; `encrypt` becomes the trailer's /Encrypt dictionary."""
    from pypdf import PdfWriter
    from pypdf.generic import DictionaryObject, NameObject, StreamObject

    writer = PdfWriter()
    font = writer._add_object(DictionaryObject({
        NameObject("/Type"): NameObject("/Font"), NameObject("/Subtype"): NameObject("/Type1"),
        NameObject("/BaseFont"): NameObject("/Helvetica"),
    }))
    resources = DictionaryObject({NameObject("/Font"): DictionaryObject({NameObject("/F1"): font})})
    for content in pages:
        page = writer.add_blank_page(612, 792)
        stream = StreamObject()
        stream._data = zlib.compress(content, 1)
        stream[NameObject("/Filter")] = NameObject("/FlateDecode")
        page[NameObject("/Contents")] = writer._add_object(stream)
        page[NameObject("/Resources")] = resources
    if encrypt:
        entry = DictionaryObject({NameObject(k): NameObject(v) for k, v in encrypt.items()})
        writer._add_object(entry)
        writer._encrypt_entry = entry
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


@functools.cache
def hostile() -> dict[str, bytes]:
    return {
        # pypdf reads only the Standard security handler: any other raised NotImplementedError.
        "locked.pdf": pdf([b"BT /F1 12 Tf 72 720 Td (secret) Tj ET"], encrypt={"/Filter": "/FooSecurity"}),
        # 100 MB of text operators in one 100 KB stream, past pypdf's 75 MB limit: its error escaped.
        "bomb.pdf": pdf([b"BT /F1 12 Tf 72 720 Td (boom) Tj ET\n" * 2_800_000]),
        "deep.json": b"[" * 50_000 + b"]" * 50_000,  # RecursionError
        "rows.csv": b"".join(b"%d,item-%d,%d\n" % (n, n, n * 7 % 1000) for n in range(200_000)),  # 4 MB
        "sections.md": b"".join(b"# Part %d\n\nx\n\n" % n for n in range(6_000)),  # 6,000 chunks to embed
        "notes.md": b"\x7fELF\x02\x01\x01" + bytes(200),  # a binary named like a document
    }


REASONS = {  # the folder's reason | the upload's
    "locked.pdf": "encrypted", "bomb.pdf": "Limit reached", "deep.json": "nested too deeply",
    "rows.csv": "2,000,000 characters", "sections.md": "5,000 chunks", "notes.md": "binary data|not UTF-8 text",
}


async def test_hostile_documents_in_the_folder_are_skipped_and_the_rest_still_index(retriever, settings):
    folder = settings.knowledge_dir / "handbook"
    folder.mkdir(parents=True)
    for name, data in hostile().items():
        (folder / name).write_bytes(data)
    (folder / "parking.md").write_text(PARKING)
    # Once quadratic: 300 KB of unclosed `<a` took over a minute in html.parser, an 80 KB `#` heading line
    # as long in the Markdown heading pattern. Their real text must survive.
    (folder / "page.html").write_text("<p>The cafeteria opens at eight.</p>" + "<a" * 150_000)
    (folder / "titles.md").write_text("###### a" + " " * 40_000 + "#" * 40_000 + "b\n\nThe gym opens at six.\n")
    with open(folder / "huge.txt", "wb") as huge:  # sparse: 65 MB that cost no disk
        huge.truncate(65 * 2**20)

    started = time.monotonic()
    report = await retriever.sync()
    elapsed = time.monotonic() - started

    assert sorted(report.added) == ["handbook/page.html", "handbook/parking.md", "handbook/titles.md"]
    skipped = dict(report.skipped)
    assert sorted(skipped) == sorted([f"handbook/{name}" for name in REASONS] + ["handbook/huge.txt"])
    for name, reason in REASONS.items():
        assert re.search(reason, skipped[f"handbook/{name}"]), skipped[f"handbook/{name}"]
    assert "a document may have at most 64 MB" in skipped["handbook/huge.txt"]
    assert elapsed < 60, f"sync took {elapsed:.0f} s"
    for question, answer in [("Where do visitors park?", "B2"), ("When does the cafeteria open?", "eight"),
                             ("When does the gym open?", "six")]:
        hits = await retriever.search(question, ["handbook"], k=1)
        assert answer in hits[0].text
    (settings.knowledge_dir / "handbook" / "vault.md").write_text("# Vault\n\nThe vault code is 4471.\n")
    again = await retriever.sync()  # what stays in the folder never blocks a later sync or upload
    assert again.added == ["handbook/vault.md"] and len(again.skipped) == len(report.skipped)
    added = await retriever.add_upload("holidays.md", HANDBOOK.encode(), "handbook")
    assert added.startswith("Added holidays.md")


@pytest.mark.parametrize("name", sorted(REASONS))
async def test_hostile_upload_is_refused_with_its_reason_and_nothing_saved(retriever, settings, name):
    started = time.monotonic()
    with pytest.raises(UploadRefused, match=REASONS[name]) as refused:
        await retriever.add_upload(name, hostile()[name], "handbook")

    assert time.monotonic() - started < 30
    assert "Nothing was saved" in str(refused.value)
    assert folder_files(settings) == [] and retriever.files() == []


def test_a_pdf_stops_being_read_at_its_time_budget(monkeypatch):
    """Each page of text operators costs pypdf a fraction of a second and stays inside its per-stream limits;
    2,000 such pages, 1.5 MB on disk, would hold the sync for minutes, and heavier ones for hours."""
    slow = pdf([b"BT /F1 12 Tf 72 720 Td () Tj ET\n" * 5_000] * 40)
    monkeypatch.setattr(parsing, "PDF_SECONDS", 0.5)

    started = time.monotonic()
    with pytest.raises(parsing.UnsupportedDocument, match="took over 0.5 s"):
        parsing.parse("slow.pdf", slow)
    assert time.monotonic() - started < 5


def test_a_pdf_with_too_many_pages_is_refused_before_reading_them():
    many = pdf([b"BT /F1 12 Tf 72 720 Td (page) Tj ET"] * 2_001)

    with pytest.raises(parsing.UnsupportedDocument, match="2,001 pages; the limit is 2,000"):
        parsing.parse("many.pdf", many)


async def test_a_search_is_answered_promptly_during_a_long_ingest(retriever, settings):
    await retriever.add_upload("parking.md", PARKING.encode(), "handbook")
    words = ["amber", "basil", "cedar", "dahlia", "ember", "fennel", "garnet", "hazel", "iris", "juniper"]
    body = "\n\n".join(f"## Part {n}\n\n" + " ".join(f"{words[(n + i) % 10]}{n}q{i}" for i in range(40))
                       for n in range(150))
    (settings.knowledge_dir / "archive").mkdir()
    (settings.knowledge_dir / "archive" / "log.md").write_text(body)

    sync = asyncio.create_task(retriever.sync())
    latencies = []
    while not sync.done():
        started = time.monotonic()
        hits = await retriever.search("Where do visitors park?", ["handbook"], k=1)
        latencies.append(time.monotonic() - started)
        assert hits and "B2" in hits[0].text
        await asyncio.sleep(0.05)
    report = await sync

    assert report.chunks >= 150 and len(latencies) >= 5
    assert max(latencies) < 5, f"slowest search {max(latencies):.1f} s during a {len(latencies)}-search ingest"


def test_a_search_never_waits_for_another_collections_index_to_be_rebuilt(tmp_path, monkeypatch):
    """Crossing into HNSW rebuilds a collection's index, which took 13 s at 35,000 vectors with every search
    waiting. Random unit vectors and a lower threshold stand in for the real ones: embedding that many takes
    an hour on a CPU, and FAISS cannot tell the difference."""
    import threading

    import numpy as np

    from bot.retrieval import vectors
    from bot.retrieval.chunk import Chunk
    from bot.retrieval.store import FileEntry, Store

    monkeypatch.setattr(vectors, "HNSW_THRESHOLD", 4_000)
    store = Store(tmp_path / "index.sqlite3")
    store.set_meta("dim", "384")
    rng = np.random.default_rng(0)

    def put(collection: str, n: int) -> None:
        unit = rng.standard_normal((n, 384)).astype(np.float32)
        unit /= np.linalg.norm(unit, axis=1, keepdims=True)
        chunks = [Chunk(f"{collection} {i}", "", "", 2) for i in range(n)]
        store.replace(FileEntry(f"{collection}/a.md", collection, collection, 0, 0, n), chunks, unit)

    put("small", 10)
    indexes = vectors.Indexes(tmp_path / "faiss", store, lambda: 384)
    indexes.load()
    put("big", 6_000)
    rebuild = threading.Thread(target=indexes.reconcile, args=("big",))
    rebuild.start()
    time.sleep(0.2)  # the build is under way (it takes a second or more)

    hits = indexes.search(["small"], rng.standard_normal(384).astype(np.float32), 3)
    answered_during_rebuild = rebuild.is_alive()
    rebuild.join()

    assert len(hits) == 3 and answered_during_rebuild
    assert indexes.by_collection["big"].hnsw and indexes.by_collection["big"].size == 6_000
    store.close()


@pytest.mark.parametrize("given", ["x.MD", "\uff58.md", "x\r.md"], ids=["upper-case", "full-width", "carriage-return"])
async def test_a_name_that_collapses_onto_another_document_is_refused_naming_both(retriever, settings, given):
    await retriever.add_upload("x.md", PARKING.encode(), "handbook")

    with pytest.raises(UploadRefused) as refused:
        await retriever.add_upload(given, HANDBOOK.encode(), "handbook")

    message = str(refused.value)
    assert repr(given) in message and "handbook/x.md" in message and "'x.md'" in message
    assert "Nothing was saved" in message
    assert (settings.knowledge_dir / "handbook" / "x.md").read_text() == PARKING
    assert folder_files(settings) == ["handbook", "handbook/x.md"]


async def test_the_same_given_name_replaces_and_says_so_even_when_its_safe_name_differs(retriever, settings):
    await retriever.add_upload("Parking Rules.md", PARKING.encode(), "handbook")

    replaced = await retriever.add_upload("Parking Rules.md", PARKING.replace("B2", "B3").encode(), "handbook")
    with pytest.raises(UploadRefused, match="'parking-rules.md' would be saved as handbook/parking-rules.md"):
        await retriever.add_upload("parking-rules.md", HANDBOOK.encode(), "handbook")

    assert replaced.startswith("Replaced parking-rules.md in collection 'handbook'; the previous version is kept")
    assert "B3" in (settings.knowledge_dir / "handbook" / "parking-rules.md").read_text()


async def test_cli_add_of_two_names_that_collapse_keeps_the_first_and_refuses_the_second(retriever, settings, tmp_path):
    source = tmp_path / "incoming"
    source.mkdir()
    (source / "Notes.md").write_text(PARKING)
    (source / "notes.md").write_text(HANDBOOK)

    notes, report = await retriever.add_files([source], "handbook")

    assert report.added == ["handbook/notes.md"]
    assert len(notes) == 1 and notes[0].startswith(f"refused {source / 'notes.md'}: 'notes.md' would be saved as")
    assert (settings.knowledge_dir / "handbook" / "notes.md").read_text() == PARKING
