"""The database's schema, as an append-only list of small named steps (after simonw/llm's migrations.py).

Each step is a function registered with `@migration`; a table, `schema_migrations`, records the *name* of
every step a database has had, so opening an old database brings it up to date, opening it twice does
nothing, and two branches that each append a step never fight over a number. The same list builds SQLite
files and PostgreSQL databases: a step only calls `db.execute(sql)` with portable SQL (SQLite's spelling;
bot/sql_dialect.py maps the few differences), and never reads. Never edit a step once it has shipped: add
a new one at the end.

SQLite files from before the table (PRAGMA user_version 1..4, the number of steps applied) are recorded by
name on first open; user_version is still kept equal to the number of steps applied.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

Migration = Callable[[Any], None]  # called with a sqlite3.Connection, or with a `Statements` recorder
MIGRATIONS: list[Migration] = []
TABLE = "schema_migrations"
CREATE_TABLE = f"CREATE TABLE IF NOT EXISTS {TABLE} (name TEXT PRIMARY KEY, applied_at TEXT NOT NULL)"


class SchemaTooNew(RuntimeError):
    """The database was written by a newer personabot; touching it could lose data that version relies on."""


def migration(step: Migration) -> Migration:
    MIGRATIONS.append(step)
    return step


def too_new(applied: set[str]) -> SchemaTooNew | None:
    """The refusal for a database that had steps this personabot does not know, if it had any."""
    unknown = sorted(applied - {step.__name__ for step in MIGRATIONS})
    if not unknown:
        return None
    return SchemaTooNew(
        f"this database has schema steps newer than this personabot knows ({', '.join(unknown)}); "
        "upgrade personabot or point PERSONABOT_DATA_DIR / DATABASE_URL elsewhere"
    )


class Statements:
    """Stands in for a connection while a step runs, collecting its statements for another engine."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, tuple]] = []

    def execute(self, sql: str, params: tuple = ()) -> None:
        self.statements.append((sql, tuple(params)))

    def __getattr__(self, name: str) -> None:
        raise AttributeError(f"a migration step may only call db.execute(sql), one statement each (not db.{name}),"
                             " so that every database engine can run it")


def statements(step: Migration) -> list[tuple[str, tuple]]:
    """A step's statements in portable SQL, in order."""
    recorder = Statements()
    step(recorder)
    return recorder.statements


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def migrate(db: sqlite3.Connection, upto: int | None = None) -> int:
    """Apply the steps this SQLite database lacks (each in its own transaction); return how many it has had.

    `db` must be in autocommit mode (`isolation_level=None`) so each step and its record commit together.
    Several processes may open one file at once: each step is re-checked under the write lock.
    """
    target = MIGRATIONS if upto is None else MIGRATIONS[:upto]
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(MIGRATIONS):  # checked before anything is written: a refused file stays untouched
        raise SchemaTooNew(
            f"this database is at schema version {version}, newer than this personabot knows "
            f"({len(MIGRATIONS)}); upgrade personabot or point PERSONABOT_DATA_DIR elsewhere"
        )
    has_table = db.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?", (TABLE,)).fetchone()
    applied = _applied(db) if has_table else set()
    if refusal := too_new(applied):
        raise refusal
    if not has_table or version > len(applied):
        _in_one(db, lambda: _record_numbered(db))
    for step in target:
        _in_one(db, lambda: _apply(db, step))
    return len(_applied(db))


def _in_one(db: sqlite3.Connection, work: Callable[[], None]) -> None:
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _applied(db: sqlite3.Connection) -> set[str]:
    return {name for (name,) in db.execute(f"SELECT name FROM {TABLE}")}


def _record_numbered(db: sqlite3.Connection) -> None:
    """A file from before the table: its user_version says how many of the first steps it has had."""
    db.execute(CREATE_TABLE)
    version = db.execute("PRAGMA user_version").fetchone()[0]
    db.executemany(f"INSERT INTO {TABLE} (name, applied_at) VALUES (?, ?) ON CONFLICT DO NOTHING",
                   [(step.__name__, _now()) for step in MIGRATIONS[:version]])


def _apply(db: sqlite3.Connection, step: Migration) -> None:
    if db.execute(f"SELECT 1 FROM {TABLE} WHERE name = ?", (step.__name__,)).fetchone():
        return  # applied already, perhaps by another process a moment ago
    step(db)
    db.execute(f"INSERT INTO {TABLE} (name, applied_at) VALUES (?, ?)", (step.__name__, _now()))
    db.execute(f"PRAGMA user_version = {len(_applied(db))}")


@migration
def m001_initial(db: sqlite3.Connection) -> None:
    db.execute(
        """
        CREATE TABLE messages (
            id INTEGER PRIMARY KEY,
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            context INTEGER NOT NULL DEFAULT 0,
            role TEXT NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
            author TEXT NOT NULL DEFAULT '',
            content TEXT NOT NULL,
            persona TEXT NOT NULL DEFAULT '',
            tokens INTEGER NOT NULL DEFAULT 0,
            prompt_tokens INTEGER NOT NULL DEFAULT 0,
            completion_tokens INTEGER NOT NULL DEFAULT 0,
            finish_reason TEXT,
            created_at TEXT NOT NULL
        )
        """
    )
    # Equality on the whole key and context, then id order: the window is one backwards range scan, and
    # export walks conversations in order without sorting.
    db.execute("CREATE INDEX messages_by_conversation ON messages (platform, workspace, channel, thread, context, id)")
    db.execute(
        """
        CREATE TABLE contexts (
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            context INTEGER NOT NULL,
            reset_at TEXT NOT NULL,
            PRIMARY KEY (platform, workspace, channel, thread)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE channels (
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            persona TEXT,
            updated_at TEXT NOT NULL,
            PRIMARY KEY (platform, workspace, channel)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE channel_settings (
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            name TEXT NOT NULL,
            value TEXT NOT NULL,
            PRIMARY KEY (platform, workspace, channel, name)
        ) WITHOUT ROWID
        """
    )
    db.execute(
        """
        CREATE TABLE audit (
            id INTEGER PRIMARY KEY,
            time TEXT NOT NULL,
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            user_id TEXT NOT NULL,
            action TEXT NOT NULL,
            detail TEXT NOT NULL DEFAULT ''
        )
        """
    )


@migration
def m002_usage_index(db: sqlite3.Connection) -> None:
    # Only model replies carry usage, so the partial index stays a fraction of the table and the daily budget
    # check reads just today's replies on one channel.
    db.execute(
        """
        CREATE INDEX messages_usage ON messages (platform, workspace, channel, created_at)
        WHERE prompt_tokens + completion_tokens > 0
        """
    )


@migration
def m003_workspace_personas(db: sqlite3.Connection) -> None:
    # Personas made in chat belong to one workspace. Every save is a new row and a delete is a row without
    # YAML, so an edit never loses the version it replaced; a workspace's personas are its newest row per name.
    db.execute(
        """
        CREATE TABLE personas (
            id INTEGER PRIMARY KEY,
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            name TEXT NOT NULL,
            yaml TEXT,
            saved_by TEXT NOT NULL,
            by_owner INTEGER NOT NULL DEFAULT 0,
            saved_at TEXT NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX personas_by_workspace ON personas (platform, workspace, name, id)")
    # Audit and usage are read per workspace now (/usage, the audit trail of one server).
    db.execute("CREATE INDEX audit_by_workspace ON audit (platform, workspace, id)")


@migration
def m004_slack_requests(db: sqlite3.Connection) -> None:
    # Signed Slack requests already served, so a copy sent again inside Slack's five-minute window is refused
    # by whichever process receives it (bot/platforms/slack_replay.py). The key leads with the timestamp, so
    # pruning rows past the window is one range delete.
    db.execute(
        """
        CREATE TABLE slack_requests (
            timestamp INTEGER NOT NULL,
            signature TEXT NOT NULL,
            PRIMARY KEY (timestamp, signature)
        ) WITHOUT ROWID
        """
    )


@migration
def m005_slack_installs(db: sqlite3.Connection) -> None:
    # The Slack workspaces that installed the app through OAuth (bot/platforms/slack_installs.py), as slack_sdk's
    # Bot and Installation objects in JSON beside readable keys. '' stands for an absent enterprise or team id
    # (a key column is never NULL). Bot tokens live only in slack_bots, so deleting a workspace's bot row
    # (tokens_revoked, app_uninstalled) leaves no copy of its token anywhere. Tokens are secrets: never log rows.
    db.execute(
        """
        CREATE TABLE slack_bots (
            enterprise_id TEXT NOT NULL,
            team_id TEXT NOT NULL,
            installed_at INTEGER NOT NULL,
            bot TEXT NOT NULL,
            PRIMARY KEY (enterprise_id, team_id)
        )
        """
    )
    db.execute(
        """
        CREATE TABLE slack_installations (
            enterprise_id TEXT NOT NULL,
            team_id TEXT NOT NULL,
            user_id TEXT NOT NULL,
            installed_at INTEGER NOT NULL,
            installation TEXT NOT NULL,
            PRIMARY KEY (enterprise_id, team_id, user_id)
        )
        """
    )
    # OAuth `state` values handed out by GET /slack/install, each consumed at most once before it expires.
    db.execute("CREATE TABLE slack_oauth_states (state TEXT NOT NULL PRIMARY KEY, expires_at INTEGER NOT NULL)")


@migration
def m006_knowledge(db: sqlite3.Connection) -> None:
    # With DATABASE_URL, the knowledge index's source of truth (bot/retrieval/replica.py): each process's
    # data/knowledge/index.sqlite3 and FAISS are replicas, caught up by change number. Vectors are float32 bytes,
    # unit length; chunk ids are the FAISS ids everywhere. Every write appends a change naming its document
    # (present 1: as the tables now hold it, 0: removed); a change superseded by a later one for the same
    # document is pruned. An SQLite history database carries these tables unused: its index is the folder's.
    db.execute(
        """
        CREATE TABLE knowledge_files (
            source TEXT PRIMARY KEY,
            collection TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            size INTEGER NOT NULL,
            mtime_ns INTEGER NOT NULL,
            chunks INTEGER NOT NULL,
            indexed_at TEXT NOT NULL
        )
        """
    )
    db.execute(
        """
        CREATE TABLE knowledge_chunks (
            id INTEGER PRIMARY KEY,
            source TEXT NOT NULL,
            collection TEXT NOT NULL,
            ord INTEGER NOT NULL,
            locator TEXT NOT NULL,
            header TEXT NOT NULL,
            text TEXT NOT NULL,
            tokens INTEGER NOT NULL,
            hash TEXT NOT NULL,
            vector BLOB NOT NULL
        )
        """
    )
    db.execute("CREATE INDEX knowledge_chunks_source ON knowledge_chunks (source)")
    db.execute(
        "CREATE TABLE knowledge_changes (seq INTEGER PRIMARY KEY, source TEXT NOT NULL, present INTEGER NOT NULL)")
    db.execute("CREATE INDEX knowledge_changes_source ON knowledge_changes (source, seq)")
    db.execute("CREATE TABLE knowledge_names (source TEXT PRIMARY KEY, given TEXT NOT NULL)")
    # How the index was built (embedding model, chunking), so that no process re-chunks what another built alike.
    db.execute("CREATE TABLE knowledge_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")


@migration
def m007_notices_said(db: sqlite3.Connection) -> None:
    # Notes the bot says once per channel (e.g. Discord: "give me Manage Webhooks and personas answer in their
    # own name"), so that a restart or a second process does not say them again. A row is claimed with
    # INSERT ... ON CONFLICT DO NOTHING: whichever process inserts it is the one that speaks.
    db.execute(
        """
        CREATE TABLE notices_said (
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            notice TEXT NOT NULL,
            said_at TEXT NOT NULL,
            PRIMARY KEY (platform, workspace, channel, notice)
        ) WITHOUT ROWID
        """
    )


@migration
def m008_turn_tickets(db: sqlite3.Connection) -> None:
    # The order in which several processes answer one conversation's messages (PostgreSQL; one SQLite process
    # orders them in memory and leaves these empty). Each message takes the conversation's next ticket as it
    # arrives (`issued`) and is answered once `served` reaches the ticket before it. PostgreSQL keeps both
    # tables UNLOGGED (bot/sql_dialect.py): after a server restart no connection, so no turn, survives anyway.
    db.execute(
        """
        CREATE TABLE turns (
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            issued INTEGER NOT NULL,
            served INTEGER NOT NULL,
            pid INTEGER NOT NULL,
            before_pid INTEGER,
            PRIMARY KEY (platform, workspace, channel, thread)
        ) WITHOUT ROWID
        """
    )
    # The tickets that had to wait, with the server pid of the connection their process listens on (`turns.pid`
    # is the newest ticket's) and of the ticket before theirs: a ticket whose process is gone (its connections
    # closed) is skipped, so a crash never stalls a conversation. A message that needs no wait writes no row.
    db.execute(
        """
        CREATE TABLE turn_tickets (
            platform TEXT NOT NULL,
            workspace TEXT NOT NULL,
            channel TEXT NOT NULL,
            thread TEXT NOT NULL DEFAULT '',
            ticket INTEGER NOT NULL,
            pid INTEGER NOT NULL,
            before_pid INTEGER,
            PRIMARY KEY (platform, workspace, channel, thread, ticket)
        ) WITHOUT ROWID
        """
    )


@migration
def m009_slack_rotations(db: sqlite3.Connection) -> None:
    # Who is exchanging a workspace's expiring Slack bot token right now (bot/platforms/slack_installs.py): a
    # row is claimed by the one caller that may spend the single-use refresh token, until `claimed_until`
    # (ms), and deleted when the new token is saved.
    db.execute(
        """
        CREATE TABLE slack_rotations (
            enterprise_id TEXT NOT NULL,
            team_id TEXT NOT NULL,
            claimed_until INTEGER NOT NULL,
            PRIMARY KEY (enterprise_id, team_id)
        ) WITHOUT ROWID
        """
    )
