"""The history database's schema, as an append-only list of small steps (after simonw/llm's migrations.py).

`PRAGMA user_version` records how many steps a database has had, so opening an old file brings it up to date
and opening it twice does nothing. Never edit a step once it has shipped: add a new one.
"""
from __future__ import annotations

import sqlite3
from collections.abc import Callable

Migration = Callable[[sqlite3.Connection], None]
MIGRATIONS: list[Migration] = []


class SchemaTooNew(RuntimeError):
    """The file was written by a newer personabot; touching it could lose data that version relies on."""


def migration(step: Migration) -> Migration:
    MIGRATIONS.append(step)
    return step


def migrate(db: sqlite3.Connection, upto: int | None = None) -> int:
    """Apply the steps this database lacks (each in its own transaction) and return its new version.

    `db` must be in autocommit mode (`isolation_level=None`) so each step and its version bump commit together.
    """
    target = len(MIGRATIONS) if upto is None else upto
    current = db.execute("PRAGMA user_version").fetchone()[0]
    if current > len(MIGRATIONS):
        raise SchemaTooNew(
            f"this database is at schema version {current}, newer than this personabot knows "
            f"({len(MIGRATIONS)}); upgrade personabot or point PERSONABOT_DATA_DIR elsewhere"
        )
    for version in range(current + 1, target + 1):
        db.execute("BEGIN IMMEDIATE")
        try:
            MIGRATIONS[version - 1](db)
            db.execute(f"PRAGMA user_version = {version}")
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise
    return max(current, target)


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
