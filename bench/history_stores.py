"""The history store's own cost per message on SQLite and on PostgreSQL: what a reply asks of it.

A message is what the engine does with the store: `window()` for the history, `append()` of the user's turn,
`append()` of the reply (tokens and usage set). Printed: per-call p50/p99 with one conversation at a time
(latency), and messages/s with many conversations at once (throughput); for PostgreSQL also two stores with
pools of their own on one database, as two processes would have.

    .venv/bin/python bench/history_stores.py [--conversations 64] [--messages 20]

PostgreSQL: `DATABASE_URL` when set (an empty database you can spare), else a throwaway server from Debian's
binaries (tests/postgres_server.py) with PostgreSQL's durable defaults (fsync and synchronous_commit on); the
SQLite store runs with its own settings (WAL, synchronous=NORMAL: no fsync per commit). `--no-sync` starts the
throwaway server with synchronous_commit off too, the fairer match for SQLite's NORMAL.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bot.conversation import ConvKey  # noqa: E402
from bot.history import HistoryStore  # noqa: E402
from bot.history_pg import PostgresHistoryStore  # noqa: E402

BUDGET = 3000


async def message(store, key: ConvKey, n: int, timings: dict[str, list[float]] | None = None, *,
                  turn: bool = False, held=None) -> None:  # type: ignore[no-untyped-def]
    if turn:  # as the engine does: the turn (which reads the persona, spend and window), the two appends,
        async with store.turn(key, spend=True) as held:  # the reply's ending the turn
            assert held.persona is None
            await message(store, key, n, timings, held=held)
        return
    await _message(store, key, n, timings, held)


async def _message(store, key: ConvKey, n: int, timings: dict[str, list[float]] | None, held) -> None:
    began = time.perf_counter()
    await (held.window(BUDGET) if held is not None else store.window(key, BUDGET))
    windowed = time.perf_counter()
    await store.append(key, "user", f"question {n} " * 8, author="u1", persona="assistant", tokens=20)
    asked = time.perf_counter()
    await store.append(key, "assistant", f"answer {n} " * 30, author="bot", persona="assistant", tokens=60,
                       finish_reason="stop", prompt_tokens=400, completion_tokens=60, ending=held)
    answered = time.perf_counter()
    if timings is not None:
        timings["window"].append(windowed - began)
        timings["append"] += [asked - windowed, answered - asked]
        timings["message"].append(answered - began)


async def latency(store, messages: int) -> dict[str, list[float]]:
    timings: dict[str, list[float]] = {"window": [], "append": [], "message": []}
    key = ConvKey("slack", "T1", "C-latency", "")
    for n in range(messages):
        await message(store, key, n, timings)
    return timings


async def throughput(stores: list, conversations: int, messages: int, *, turn: bool = False) -> float:
    async def talk(c: int) -> None:
        key = ConvKey("slack", "T1", f"C{c}{'-turn' if turn else ''}", f"t{c}")
        for n in range(messages):
            await message(stores[c % len(stores)], key, n, turn=turn)

    began = time.perf_counter()
    await asyncio.gather(*(talk(c) for c in range(conversations)))
    return conversations * messages / (time.perf_counter() - began)


def ms(values: list[float], q: float) -> str:
    values = sorted(values)
    return f"{values[min(len(values) - 1, int(q * len(values)))] * 1000:.2f}"


def report(name: str, timings: dict[str, list[float]], rate: float, extra: str = "") -> None:
    cells = "  ".join(f"{call} p50 {ms(v, 0.5)} p99 {ms(v, 0.99)} ms" for call, v in timings.items())
    print(f"{name:<12} {cells}  |  {rate:,.0f} messages/s{extra}")


async def measure(store, args: argparse.Namespace) -> tuple[dict[str, list[float]], float, float]:
    """Latency per call, then messages/s without and with the engine's turn(); closes `store`."""
    try:
        timings = await latency(store, args.messages * 5)
        rate = await throughput([store], args.conversations, args.messages)
        turns = await throughput([store], args.conversations, args.messages, turn=True)
    finally:
        await store.close()
    return timings, rate, turns


async def run(url: str, args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        timings, rate, turns = await measure(await HistoryStore.open(Path(tmp) / "personabot.sqlite3"), args)
        report("sqlite", timings, rate, f"; with turn(): {turns:,.0f}/s")
        sqlite_rate, sqlite_message = rate, statistics.median(timings["message"])

    timings, rate, turns = await measure(await PostgresHistoryStore.open(url), args)
    report("postgresql", timings, rate, f"; with turn(): {turns:,.0f}/s"
           f"  ({rate / sqlite_rate:.2f}x SQLite's rate,"
           f" {statistics.median(timings['message']) / sqlite_message:.2f}x its per-message latency)")

    pair = [await PostgresHistoryStore.open(url), await PostgresHistoryStore.open(url)]
    try:
        rate = await throughput(pair, args.conversations, args.messages)
    finally:
        for store in pair:
            await store.close()
    print(f"{'pg, 2 pools':<12} {rate:,.0f} messages/s (two stores, one event loop: the client's CPU is shared)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=64)
    parser.add_argument("--messages", type=int, default=20, help="messages per conversation")
    parser.add_argument("--no-sync", action="store_true", help="throwaway server with synchronous_commit off")
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs; {args.conversations} conversations x {args.messages} messages;"
          f" a message = window + 2 appends")
    if url := os.environ.get("DATABASE_URL"):
        asyncio.run(run(url, args))
        return
    from postgres_server import bench_server

    with bench_server() as cluster:
        if args.no_sync:
            cluster.admin("ALTER SYSTEM SET synchronous_commit = off")
            cluster.admin("SELECT pg_reload_conf()")
        print(f"PostgreSQL: throwaway server, synchronous_commit {'off' if args.no_sync else 'on'}")
        asyncio.run(run(cluster.url(cluster.new_database()), args))


if __name__ == "__main__":
    main()
