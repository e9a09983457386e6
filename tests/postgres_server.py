"""A throwaway PostgreSQL cluster for the tests: initdb in a temp dir, started on a free port on 127.0.0.1,
trust auth, no fsync; each test that asks gets a database of its own.

Uses the binaries of Debian's `postgresql` package (/usr/lib/postgresql/N/bin) or whatever is on PATH; tests
that need it are skipped, saying why, only when there are none. initdb refuses to run as root, so as root the
cluster is run by the `postgres` system user (which the package creates).
"""
from __future__ import annotations

import asyncio
import contextlib
import glob
import itertools
import os
import pwd
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest


# `PERSONABOT_TEST_STORE=postgres` runs every test that takes the `settings` fixture on a fresh PostgreSQL
# database instead of the SQLite file, CLI subprocesses included: `make test` runs the platform tests a second
# time that way, so no part of the bot can come to depend on one store.
ON_POSTGRES = os.environ.get("PERSONABOT_TEST_STORE") == "postgres"
SQLITE_ONLY = pytest.mark.skipif(ON_POSTGRES, reason="exercises the SQLite file itself")


def binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    initdb = found[-1] if found else shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    def __init__(self, bin_dir: Path, *, durable: bool = False):
        """`durable`: PostgreSQL's defaults (fsync on every commit), for benchmarks; tests run without fsync."""
        self.bin_dir = bin_dir
        self.durable = durable
        self.root = Path(tempfile.mkdtemp(prefix="personabot-pg-"))
        self.port = _free_port()
        self.user: str | None = None
        if os.geteuid() == 0:
            self.user = "postgres"
            owner = pwd.getpwnam(self.user)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        self._names = itertools.count(1)

    def _run(self, *args: str) -> None:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        if self.user:
            command = ["runuser", "-u", self.user, "--", *command]
        subprocess.run(command, check=True, capture_output=True, timeout=120)

    def start(self) -> None:
        data = self.root / "data"
        self._run("initdb", "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C",
                  "--no-sync")
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c max_connections=300"
        if not self.durable:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run("pg_ctl", "-D", str(data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        # PostgreSQL 15's default way of copying a template writes it all to the WAL: slow for tiny databases.
        version = int((data / "PG_VERSION").read_text().strip().split(".")[0])
        self._copy = " STRATEGY FILE_COPY" if version >= 15 else ""

    def stop(self) -> None:
        try:
            self._run("pg_ctl", "-D", str(self.root / "data"), "-m", "immediate", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)

    @property
    def postmaster_pid(self) -> int:
        """The server's first process: benchmarks sum the CPU of it and every backend it started."""
        return int((self.root / "data" / "postmaster.pid").read_text().split()[0])

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def admin(self, sql: str) -> None:
        """One statement on the `postgres` database, from a thread of its own (a test's loop may be running)."""
        import asyncpg

        async def run() -> None:
            connection = await asyncpg.connect(self.url())
            try:
                await connection.execute(sql)
            finally:
                await connection.close()

        failure: list[BaseException] = []
        thread = threading.Thread(target=lambda: _capture(failure, lambda: asyncio.run(run())))
        thread.start()
        thread.join()
        if failure:
            raise failure[0]

    def new_database(self) -> str:
        name = f"test_{next(self._names)}"
        self.admin(f"CREATE DATABASE {name}{self._copy}")
        return name


@contextlib.contextmanager
def bench_server(*, durable: bool = True) -> Iterator[Cluster]:
    """A throwaway server for a benchmark, stopped when the block ends; without binaries the bench exits
    saying how to get them. `durable`: PostgreSQL's own defaults, every commit flushed to disk."""
    bin_dir = binaries()
    if bin_dir is None:
        sys.exit("no PostgreSQL binaries here: apt-get install postgresql (or set DATABASE_URL where the bench reads it)")
    cluster = Cluster(bin_dir, durable=durable)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def _capture(failure: list, work) -> None:  # type: ignore[no-untyped-def]
    try:
        work()
    except BaseException as exc:  # handed to the test's thread
        failure.append(exc)


@pytest.fixture(scope="session")
def postgres_cluster():
    bin_dir = binaries()
    if bin_dir is None:
        pytest.skip("no PostgreSQL binaries (initdb) here; apt-get install postgresql to run these tests")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("running as root and there is no `postgres` user to run the test server (initdb refuses root)")
    cluster = Cluster(bin_dir)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def database_url(postgres_cluster):
    """A fresh, empty database on the test cluster; dropped afterwards."""
    name = postgres_cluster.new_database()
    yield postgres_cluster.url(name)
    postgres_cluster.admin(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request):
    """Run the test on each store: None for the SQLite file, a fresh PostgreSQL database's URL otherwise."""
    if request.param == "sqlite":
        return None
    return request.getfixturevalue("database_url")


def query(url: str, sql: str, *params) -> list[tuple]:  # type: ignore[no-untyped-def]
    """Rows of one portable statement (`?` placeholders), from a thread of its own: for sync test helpers."""
    import asyncpg

    from bot.sql_dialect import to_postgres

    async def run() -> list[tuple]:
        connection = await asyncpg.connect(url)
        try:
            return [tuple(row) for row in await connection.fetch(to_postgres(sql), *params)]
        finally:
            await connection.close()

    result: list = []
    failure: list[BaseException] = []
    thread = threading.Thread(target=lambda: _capture(failure, lambda: result.extend(asyncio.run(run()))))
    thread.start()
    thread.join()
    if failure:
        raise failure[0]
    return result
