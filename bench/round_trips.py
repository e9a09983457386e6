"""PostgreSQL round trips one `Engine.reply` costs, counted on the wire (every statement asyncpg sends).

Two engines on one database (two processes' worth of pools), a model that answers at once, the daily budget
on (so the spend is read), one conversation whose messages alternate between the engines, as a load balancer
would hand them out. Each statement sent is counted and named by its first words; the prepare of a statement
new to a connection is not (the warm-up prepares them). Printed: round trips per message, and which statements they were.

    .venv/bin/python bench/round_trips.py [--messages 40]
"""
from __future__ import annotations

import argparse
import asyncio
import collections
import re
import sys
import tempfile
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


async def measure(url: str, messages: int, personas: Path, data: Path) -> None:
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

    async def say(n: int, channel: str) -> None:
        incoming = Incoming(ConvKey("slack", "T1", channel), "u1", f"m{n}", user_name="u1")
        async for _ in engines[n % 2].reply(incoming):
            pass

    try:
        for n in range(6):  # warm up: connections, prepared statements, persona files, caches
            await say(n, "C-warm")
        COUNTS.clear()
        for n in range(messages):
            await say(n, "C1")
    finally:
        for engine in engines:
            await engine.close()
    total = sum(count for name, count in COUNTS.items())
    print(f"{total / messages:.2f} PostgreSQL round trips per message ({messages} messages, one conversation,"
          " alternating between two engines, daily budget on)")
    for name, count in COUNTS.most_common():
        print(f"  {count / messages:5.2f}  {name}")


def main() -> None:
    from postgres_server import Cluster, binaries

    from scale_out import PERSONA

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=40)
    args = parser.parse_args()
    bin_dir = binaries()
    if bin_dir is None:
        sys.exit("no PostgreSQL binaries here: apt-get install postgresql")
    instrument()
    cluster = Cluster(bin_dir)
    cluster.start()
    try:
        with tempfile.TemporaryDirectory() as tmp:
            personas = Path(tmp) / "personas"
            personas.mkdir()
            (personas / "bench.yaml").write_text(PERSONA)
            url = cluster.url(cluster.new_database())
            asyncio.run(measure(url, args.messages, personas, Path(tmp) / "data"))
    finally:
        cluster.stop()


if __name__ == "__main__":
    main()
