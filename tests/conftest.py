import os

import pytest

# Tests never reach a model hub: everything they load is built locally or shipped in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from bot.config import Settings
from postgres_server import ON_POSTGRES, database_url, postgres_cluster, store_url  # noqa: F401  (fixtures)


@pytest.fixture
def settings(request, tmp_path, monkeypatch):
    """Settings isolated in a temporary data dir, with the shipped personas and nothing from the host's env."""
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET",
                 "SLACK_APP_TOKEN", "SLACK_CLIENT_ID", "SLACK_CLIENT_SECRET", "PERSONABOT_ADMINS",
                 "PERSONABOT_BACKEND", "DATABASE_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    url = request.getfixturevalue("database_url") if ON_POSTGRES else None
    if url:
        monkeypatch.setenv("DATABASE_URL", url)
    return Settings(_env_file=None, PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge",
                    DATABASE_URL=url)


@pytest.fixture(scope="session")
def embedder():
    """One MiniLM for the whole session: loading it takes seconds, encoding a test's documents milliseconds."""
    from bot.retrieval.embed import Embedder

    return Embedder.shared()


@pytest.fixture
async def retriever(settings, embedder, store_url, monkeypatch):
    """The real knowledge index (MiniLM, FAISS, FTS5) in the test's own folders, on each store: the SQLite file,
    or a replica of PostgreSQL's knowledge tables. The test's settings and environment (its CLI runs) say the
    same, so every retriever the test opens uses that store."""
    from bot.retrieval import Retriever

    settings.database_url = store_url
    if store_url:
        monkeypatch.setenv("DATABASE_URL", store_url)
    retriever = await Retriever.open(settings, embedder=embedder)
    yield retriever
    await retriever.close()
