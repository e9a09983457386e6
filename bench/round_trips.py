"""PostgreSQL round trips one `Engine.reply` costs, counted on the wire (every statement asyncpg sends).

Two engines on one database (two processes' worth of pools), a model that answers at once, the daily budget
on (so the spend is read), one conversation whose messages alternate between the engines, as a load balancer
would hand them out. Each statement sent is counted and named by its first words; the prepare of a statement
new to a connection is not (the warm-up prepares them). Also the CPU each message costs the PostgreSQL server
(its postmaster and the processes it started, read from /proc) and the bot,
which a noisy machine's throughput figures cannot show. Then the same with every message arriving while the
one before it is being answered in the other engine (bench/scale_out.py's load), so each waits for its turn. Printed: round trips per message, and which statements they were.

    .venv/bin/python bench/round_trips.py [--messages 40]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import os
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "bench")]

import asyncpg  # noqa: E402

COUNTS: collections.Counter = collections.Counter()


def _name(sql: str) -> str:
    sql = " ".join(sql.split())
    if sql.startswith("WITH"):
        return "WITH " + " + ".join(re.findall(r"\b(INSERT INTO \w+|UPDATE \w+|DELETE FROM \w+)", sql))
    return " ".join(sql.split()[:4])[:70]


def instrument() -> None:
    """Count every statement any asyncpg connection sends (the extended protocol and simple queries)."""
    execute, simple = asyncpg.connection.Connection._execute, asyncpg.connection.Connection.execute

    async def counted_execute(self, query, args, *rest, **kw):  # type: ignore[no-untyped-def]
        COUNTS[_name(query)] += 1
        return await execute(self, query, args, *rest, **kw)

    async def counted_simple(self, query, *args, **kw):  # type: ignore[no-untyped-def]
        if not args:
            COUNTS[_name(query)] += 1
        return await simple(self, query, *args, **kw)

    asyncpg.connection.Connection._execute = counted_execute
    asyncpg.connection.Connection.execute = counted_simple


def server_cpu(postmaster: int) -> float:
    """CPU seconds used so far by the bench's PostgreSQL server: its postmaster and every process it started."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, fields = int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
            if pid == postmaster or int(fields[1]) == postmaster:  # fields[1]: the parent's pid
                total += (int(fields[11]) + int(fields[12])) / tick  # utime, stime
        except (OSError, IndexError, ValueError):
            continue
    return total


async def measure(url: str, postmaster: int, messages: int, personas: Path, data: Path) -> None:
    from scale_out import SeenModels

    from bot.config import Settings
    from bot.conversation import ConvKey, Incoming
    from bot.engine import Engine
    from bot.history import open_history
    from bot.personas import PersonaLibrary

    settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=data, PERSONABOT_PERSONAS_DIR=personas,
                        PERSONABOT_DEFAULT_PERSONA="bench", PERSONABOT_DAILY_TOKEN_BUDGET=10**12, DATABASE_URL=url)
    engines = [Engine(settings, PersonaLibrary(personas), await open_history(settings), SeenModels())
               for _ in range(2)]

    async def say(n: int, channel: str, began: asyncio.Event | None = None) -> None:
        incoming = Incoming(ConvKey("slack", "T1", channel), "u1", f"m{n}", user_name="u1")
        async for _ in engines[n % 2].reply(incoming):
            if began is not None:
                began.set()

    try:
        for n in range(6):  # warm up: connections, prepared statements, persona files, caches
            await say(n, "C-warm")
        COUNTS.clear()
        server, client, began = server_cpu(postmaster), time.process_time(), time.perf_counter()
        for n in range(messages):
            await say(n, "C1")
        server, client = server_cpu(postmaster) - server, time.process_time() - client
        wall = time.perf_counter() - began
        alone = dict(COUNTS)
        COUNTS.clear()
        # As bench/scale_out.py's balancer does: the next message arrives as soon as this one's answer began,
        # so it always finds the conversation busy in the other engine and waits for its turn.
        replies = []
        for n in range(messages):
            began_answering = asyncio.Event()
            replies.append(asyncio.ensure_future(say(n, "C2", began_answering)))
            await began_answering.wait()
        await asyncio.gather(*replies)
        waiting = dict(COUNTS)
    finally:
        for engine in engines:
            await engine.close()
    print(f"{sum(alone.values()) / messages:.2f} PostgreSQL round trips per message ({messages} messages, one"
          " conversation, alternating between two engines, daily budget on), one message at a time")
    print(f"per message: {server / messages * 1000:.2f} ms PostgreSQL server CPU, {client / messages * 1000:.2f} ms"
          f" bot CPU (both engines), {wall / messages * 1000:.2f} ms wall")
    for name, count in sorted(alone.items(), key=lambda item: -item[1]):
        print(f"  {count / messages:5.2f}  {name}")
    print(f"{sum(waiting.values()) / messages:.2f} round trips per message when each arrives while the one"
          " before it is being answered in the other engine")
    for name, count in sorted(waiting.items(), key=lambda item: -item[1]):
        print(f"  {count / messages:5.2f}  {name}")


def main() -> None:
    from postgres_server import bench_server

    from scale_out import PERSONA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40)
    args = parser.parse_args()
    instrument()
    with bench_server(durable=False) as cluster, tempfile.TemporaryDirectory() as tmp:
        personas = Path(tmp) / "personas"
        personas.mkdir()
        (personas / "bench.yaml").write_text(PERSONA)
        url = cluster.url(cluster.new_database())
        asyncio.run(measure(url, cluster.postmaster_pid, args.messages, personas, Path(tmp) / "data"))


if __name__ == "__main__":
    main()
