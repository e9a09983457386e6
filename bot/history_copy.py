"""Copy a SQLite history file into a PostgreSQL database, for a bot moving from one process to several.

Every table a user would miss is copied with its ids; state that is the target's own or that rebuilds
itself is not (see SKIPPED). The copy is one transaction: a failure, or Ctrl-C, leaves the target as it was.
"""
from __future__ import annotations

import sqlite3
import sys
from dataclasses import dataclass
from pathlib import Path

import asyncpg
from tqdm import tqdm

from bot.history import HistoryError, HistoryStore
from bot.history_pg import migrate, redacted

# In foreign-key-free dependency order (there are none today); each keeps its ids.
COPIED = ("messages", "contexts", "channels", "channel_settings", "audit", "personas",
          "slack_bots", "slack_installations", "notices_said")
SKIPPED = {
    "schema_migrations": "the target's own record of its schema",
    "slack_requests": "only Slack's five-minute replay window",
    "slack_oauth_states": "install links that expire within minutes",
    "knowledge_files": "the knowledge index re-syncs from its folders",
    "knowledge_chunks": "the knowledge index re-syncs from its folders",
    "knowledge_changes": "the knowledge index re-syncs from its folders",
    "knowledge_names": "the knowledge index re-syncs from its folders",
    "knowledge_meta": "the knowledge index re-syncs from its folders",
    "turns": "tickets of messages being answered right now",
    "turn_tickets": "tickets of messages being answered right now",
    "slack_rotations": "claims on token exchanges happening right now",
}
BATCH = 10_000


class TargetNotEmpty(HistoryError):
    """The PostgreSQL database already holds history: copying into it would mix two histories."""


@dataclass
class Copied:
    table: str
    rows: int


async def copy_history(db_path: Path, url: str) -> list[Copied]:
    """Copy every table in COPIED from the SQLite file into the (migrated) database at `url`; rows per table."""
    store = await HistoryStore.open(db_path)  # brings an older file up to the schema the target will have
    await store.close()
    source = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True, isolation_level=None)
    source.execute("BEGIN")  # every table read from one snapshot, even if a bot still writes the file
    try:
        try:
            target = await asyncpg.connect(url)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            raise HistoryError(f"could not connect to {redacted(url)}: {exc}") from exc
        try:
            await migrate(target)
            async with target.transaction():
                # Held to the commit: a bot already running on the target waits instead of writing in between.
                await target.execute(f"LOCK TABLE {', '.join(COPIED)} IN EXCLUSIVE MODE")
                if occupied := [table for table in COPIED
                                if await target.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})")]:
                    raise TargetNotEmpty(f"{redacted(url)} already has history ({', '.join(occupied)} not empty);"
                                         " copy only into a database no bot has used")
                return [Copied(table, await _copy_table(source, target, table)) for table in COPIED]
        finally:
            await target.close()
    finally:
        source.close()


async def _copy_table(source: sqlite3.Connection, target: asyncpg.Connection, table: str) -> int:
    total = source.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
    cursor = source.execute(f"SELECT * FROM {table}")
    columns = [column[0] for column in cursor.description]
    with tqdm(total=total, desc=table, unit="row", disable=None, file=sys.stderr) as progress:
        def rows():  # type: ignore[no-untyped-def]
            while batch := cursor.fetchmany(BATCH):
                yield from batch
                progress.update(len(batch))

        try:
            await target.copy_records_to_table(table, records=rows(), columns=columns)
        except (asyncpg.PostgresError, asyncpg.InterfaceError, TypeError, ValueError) as exc:  # a row it rejects
            raise HistoryError(f"could not copy {table} (nothing was written): {exc}") from exc
    if "id" in columns:
        # Identity columns hand out ids from their own sequence: start it past the copied ids.
        await target.execute(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), max(id))"
                             f" FROM {table} HAVING max(id) IS NOT NULL")
    return total
