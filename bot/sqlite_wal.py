"""Switching a SQLite file to WAL when other processes may be opening the same file at that moment.

Changing the journal mode needs the file to itself, and SQLite answers "database is locked" at once, without
waiting out the busy timeout, while another connection is creating the file or switching it too. Several
processes starting together on one data dir (two `knowledge add` runs, `run` beside the CLI) hit exactly that,
so the switch is retried for as long as a writer would wait.
"""
from __future__ import annotations

import sqlite3
import time


def use_wal(db: sqlite3.Connection, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
