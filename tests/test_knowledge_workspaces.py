"""Knowledge per workspace: every workspace sees global knowledge plus its own uploads and nothing of any other
workspace's. Real MiniLM, real FAISS, real SQLite FTS5, as in test_knowledge.py."""
from __future__ import annotations

import asyncio
import json
import sqlite3

import pytest
from typer.testing import CliRunner

from bot.config import Settings
from bot.conversation import Workspace
from bot.retrieval import Retriever, UploadRefused

A = Workspace("slack", "T1")
B = Workspace("discord", "42")
HANDBOOK = "# Handbook\n\n## Holidays\n\nEvery employee gets 27 days of paid holiday a year.\n"
VAULT = "# Vault\n\n## Access\n\nThe vault door code is 4471 and only the night shift knows it.\n"
PARKING_A = "# Parking\n\n## Visitors\n\nVisitors park on level B2, next to the blue lifts.\n"
PARKING_B = "# Parking\n\n## Visitors\n\nVisitors park in the open lot behind the warehouse.\n"


def own_folder(settings: Settings, workspace: Workspace):
    return settings.data_dir / "workspaces" / workspace.platform / workspace.id / "knowledge"


async def test_a_workspace_never_finds_another_workspaces_upload(retriever):
    await retriever.add_upload("vault.md", VAULT.encode(), "handbook", workspace=B)
    question = "What is the vault door code?"

    for workspace in (A, None):
        assert await retriever.search(question, None, workspace=workspace) == []
        assert await retriever.search(question, ["handbook"], workspace=workspace) == []
        grounding = await retriever.ground(question, ["handbook"], workspace=workspace)
        assert grounding.hits == [] and "4471" not in grounding.system_block
        assert retriever.collections(workspace) == []
        assert retriever.files(workspace=workspace) == [] and retriever.stats(workspace) == []
    hits = await retriever.search(question, ["handbook"], workspace=B)
    assert "4471" in hits[0].text and retriever.collections(B) == ["handbook"]


async def test_same_name_uploads_in_two_workspaces_keep_both_and_the_global_one(retriever, settings):
    await retriever.add_upload("parking.md", b"# Parking\n\nStaff park in the basement garage.\n", "handbook")
    first = await retriever.add_upload("Parking.md", PARKING_A.encode(), "handbook", workspace=A)
    second = await retriever.add_upload("parking.md", PARKING_B.encode(), "handbook", workspace=B)

    assert first.startswith("Added parking.md") and second.startswith("Added parking.md")
    for workspace, text, other in ((A, "level B2", "warehouse"), (B, "warehouse", "level B2")):
        hits = await retriever.search("Where do visitors park?", ["handbook"], workspace=workspace)
        assert text in hits[0].text and hits[0].own and not any(other in hit.text for hit in hits)
        assert [(row.source, row.own) for row in retriever.files("handbook", workspace=workspace)] == [
            ("handbook/parking.md", False), ("handbook/parking.md", True)]
    assert (settings.knowledge_dir / "handbook" / "parking.md").read_text().startswith("# Parking\n\nStaff")
    assert (own_folder(settings, A) / "handbook" / "parking.md").read_text() == PARKING_A
    assert (own_folder(settings, B) / "handbook" / "parking.md").read_text() == PARKING_B


async def test_same_name_upload_in_one_workspace_replaces_it_and_keeps_the_old_bytes_in_the_trash(retriever, settings):
    await retriever.add_upload("parking.md", PARKING_A.encode(), "handbook", workspace=A)

    report = await retriever.add_upload("parking.md", PARKING_B.encode(), "handbook", workspace=A)

    assert report.startswith("Replaced parking.md in collection 'handbook'; the previous version is kept as .trash/")
    kept = report.split("kept as ")[1].split(". ")[0]
    assert kept.endswith("/handbook/parking.md") and (own_folder(settings, A) / kept).read_text() == PARKING_A
    hits = await retriever.search("Where do visitors park?", None, workspace=A)
    assert "warehouse" in hits[0].text and not any("level B2" in hit.text for hit in hits)
    assert [row.source for row in retriever.files(workspace=A)] == ["handbook/parking.md"]  # the trash is not indexed


async def test_duplicate_check_sees_only_what_the_workspace_sees(retriever):
    await retriever.add_upload("vault.md", VAULT.encode(), "secrets", workspace=B)
    await retriever.add_upload("handbook.md", HANDBOOK.encode(), "handbook")

    accepted = await retriever.add_upload("copy.md", VAULT.encode(), "notes", workspace=A)
    with pytest.raises(UploadRefused) as own_copy:
        await retriever.add_upload("again.md", VAULT.encode(), "other", workspace=A)
    with pytest.raises(UploadRefused) as global_copy:
        await retriever.add_upload("mine.md", HANDBOOK.encode(), "notes", workspace=A)

    assert accepted.startswith("Added copy.md in collection 'notes'")
    assert "already in the knowledge base as notes/copy.md" in str(own_copy.value)
    assert "already in the knowledge base as handbook/handbook.md" in str(global_copy.value)
    assert "secrets" not in str(own_copy.value) + str(global_copy.value)


async def test_global_documents_are_visible_to_every_workspace(retriever):
    await retriever.add_upload("handbook.md", HANDBOOK.encode(), "handbook")

    for workspace in (A, B, None):
        grounding = await retriever.ground("How many days of paid holiday do I get?", ["handbook"], workspace=workspace)
        assert "27 days" in grounding.hits[0].text and not grounding.hits[0].own
        assert retriever.collections(workspace) == ["handbook"]
        assert [row.source for row in retriever.files(workspace=workspace)] == ["handbook/handbook.md"]
        assert retriever.stats(workspace)[0][:2] == ("handbook", 1)


async def test_citations_of_a_workspaces_own_document_show_no_scope_prefix(retriever):
    await retriever.add_upload("handbook.md", HANDBOOK.encode(), "handbook", workspace=A)

    grounding = await retriever.ground("How many days of paid holiday do I get?", ["handbook"], workspace=A)

    hit = grounding.hits[0]
    assert (hit.source, hit.collection, hit.own) == ("handbook/handbook.md", "handbook", True)
    assert grounding.sources_footer == "Sources: [1] handbook/handbook.md § Handbook › Holidays"
    assert "@" not in grounding.system_block and "slack" not in grounding.system_block
    assert hit.as_json()["source"] == "handbook/handbook.md"


async def test_remove_in_a_workspace_touches_only_its_own_documents(retriever, settings):
    await retriever.add_upload("handbook.md", HANDBOOK.encode(), "handbook")
    await retriever.add_upload("handbook.md", VAULT.encode(), "handbook", workspace=B)

    assert not await retriever.remove("handbook/handbook.md", workspace=A)
    assert (settings.knowledge_dir / "handbook" / "handbook.md").is_file()
    assert (own_folder(settings, B) / "handbook" / "handbook.md").is_file()
    with pytest.raises(UploadRefused, match="outside the knowledge folder"):
        await retriever.remove("../../../../../knowledge/handbook/handbook.md", workspace=A)

    assert await retriever.remove("handbook/handbook.md", workspace=B)
    assert [row.own for row in retriever.files(workspace=B)] == [False]
    trashed = list((own_folder(settings, B) / ".trash").glob("*/handbook/handbook.md"))
    assert [path.read_text() for path in trashed] == [VAULT]
    assert await retriever.remove("handbook/handbook.md")
    assert retriever.files(workspace=B) == [] and list((settings.knowledge_dir / ".trash").glob("*/handbook/*.md"))


async def test_an_index_of_global_documents_from_before_workspaces_opens_without_reembedding(settings, embedder):
    folder = settings.knowledge_dir / "handbook"
    folder.mkdir(parents=True)
    (folder / "handbook.md").write_text(HANDBOOK)
    first = await Retriever.open(settings, embedder=embedder)
    await first.sync()
    await first.close()
    # The format every index in the field has (plain sources, one FAISS file per collection name): pinned, so
    # a change to it cannot pass unnoticed.
    index = settings.data_dir / "knowledge"
    with sqlite3.connect(index / "index.sqlite3") as db:
        assert db.execute("SELECT source, collection FROM files").fetchall() == [("handbook/handbook.md", "handbook")]
    assert [p.name for p in (index / "faiss").iterdir()] == ["handbook.faiss"]
    faiss_bytes = (index / "faiss" / "handbook.faiss").read_bytes()
    encoded = embedder.encoded

    second = await Retriever.open(settings, embedder=embedder)
    try:
        from_a = await second.search("paid holiday", None, k=1, workspace=A)
        from_cli = await second.search("paid holiday", ["handbook"], k=1)
        report = await second.sync()
    finally:
        await second.close()

    assert from_a[0].source == from_cli[0].source == "handbook/handbook.md"
    assert report.unchanged == 1 and not report.changed
    assert embedder.encoded - encoded == 2  # the two queries, nothing else
    assert (index / "faiss" / "handbook.faiss").read_bytes() == faiss_bytes


async def test_watcher_indexes_a_file_dropped_into_a_workspace_folder(retriever, settings):
    stop = asyncio.Event()
    watcher = asyncio.create_task(retriever.watch(stop))
    try:
        await asyncio.sleep(0.5)  # the first sync has run and the watch is armed
        folder = own_folder(settings, A) / "handbook"
        folder.mkdir(parents=True)
        (folder / "parking.md").write_text(PARKING_A)

        for _ in range(100):
            hits = await retriever.search("Where do visitors park?", ["handbook"], k=1, workspace=A)
            if hits:
                break
            await asyncio.sleep(0.1)
        assert hits and hits[0].source == "handbook/parking.md" and hits[0].own
        assert await retriever.search("Where do visitors park?", None, workspace=B) == []
    finally:
        stop.set()
        await asyncio.wait_for(watcher, 10)


def test_cli_manages_one_workspaces_knowledge(settings, embedder, tmp_path, monkeypatch):
    from bot.cli.knowledge import app

    monkeypatch.setenv("PERSONABOT_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("PERSONABOT_KNOWLEDGE_DIR", str(settings.knowledge_dir))
    monkeypatch.chdir(tmp_path)
    doc = tmp_path / "Handbook.md"
    doc.write_text(HANDBOOK)
    runner = CliRunner()

    added = runner.invoke(app, ["add", str(doc), "--collection", "hr", "--workspace", "slack:T1"])
    stored = (own_folder(settings, A) / "hr" / "handbook.md").is_file()
    mine = runner.invoke(app, ["search", "paid holiday", "--json", "--workspace", "slack:T1"])
    others = runner.invoke(app, ["search", "paid holiday", "--json", "--workspace", "discord:42"])
    global_only = runner.invoke(app, ["search", "paid holiday", "--json"])
    listed = runner.invoke(app, ["list", "--workspace", "slack:T1"])
    not_global = runner.invoke(app, ["remove", "hr/handbook.md"])
    removed = runner.invoke(app, ["remove", "hr/handbook.md", "--workspace", "slack:T1"])
    bad = runner.invoke(app, ["list", "--workspace", "irc:x"])

    assert added.exit_code == 0, added.output
    assert stored and not (settings.knowledge_dir / "hr").exists()
    assert json.loads(mine.stdout)[0]["source"] == "hr/handbook.md"
    assert json.loads(others.stdout) == json.loads(global_only.stdout) == []
    assert "hr: 1 files" in listed.stdout and "  hr/handbook.md  (" in listed.stdout
    assert not_global.exit_code == 1 and removed.exit_code == 0
    assert not (own_folder(settings, A) / "hr" / "handbook.md").exists()
    assert bad.exit_code == 2 and "not a workspace" in bad.output
