"""What the engine itself costs per message, with an instant model, on a history database of 100k messages.

Per message the engine looks up the channel's persona, checks the daily token budget, reads the history
window, stores the user's turn and stores the reply. The yardstick is the least any SQLite-backed bot could
do, run in the same process on the same file: a bare aiosqlite loop that reads the last 50 turns, inserts
one row and commits.

  (a) steady: CHANNELS channels sending RATE messages/s in total — engine time per message, p50 and p99;
  (b) burst: every channel sends at the same instant, ROUNDS times — messages/s against the bare loop
      given the same burst on one connection.

    .venv/bin/python bench/reply_overhead.py [--messages 100000] [--channels 200] [--rate 200] [--seconds 10]
                                             [--rounds 20]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sqlite3
import statistics
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import aiosqlite

from bot.config import Settings
from bot.conversation import ConvKey, Incoming
from bot.engine import Engine
from bot.history import INSERT_MESSAGE, HistoryStore
from bot.models.base import Chunk, GenParams, Message, Usage
from bot.personas import PersonaLibrary

PERSONAS = Path(__file__).resolve().parent.parent / "personas"
WORDS = ("model data token channel persona reply history budget window thread latency answer question "
         "sqlite commit index cache stream prompt context user assistant bot slack discord").split()


class InstantModel:
    """Answers at once, so everything measured is the engine's own work."""

    name = "instant"
    context_window = 8192

    def count_tokens(self, messages: list[Message]) -> int:
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    async def stream(self, messages: list[Message], params: GenParams):
        yield Chunk("Sure, here you go.", finish_reason="stop", usage=Usage(prompt_tokens=1500, completion_tokens=5))


class InstantModels:
    def __init__(self) -> None:
        self.model = InstantModel()

    @contextlib.asynccontextmanager
    async def use(self, spec=None):  # type: ignore[no-untyped-def]
        yield self.model

    async def close(self) -> None:
        pass


def key_for(channel: int) -> ConvKey:
    return ConvKey("discord", "guild", f"c{channel}")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 40)))


def seed(db_path: Path, messages: int, channels: int) -> None:
    rng = random.Random(7)
    start = datetime.now(timezone.utc) - timedelta(days=30)
    step = timedelta(days=30) / messages
    rows = []
    for i in range(messages):
        k = key_for(i % channels)
        role = "user" if (i // channels) % 2 == 0 else "assistant"
        text = sentence(rng)
        tokens = len(text) // 4 + 4
        usage = (400, tokens) if role == "assistant" else (0, 0)
        rows.append((k.platform, k.workspace, k.channel, "", 0, role, "u1", text, "assistant", tokens, *usage,
                     "stop" if role == "assistant" else None, (start + i * step).isoformat(timespec="milliseconds")))
    with sqlite3.connect(db_path) as db:
        db.executemany(INSERT_MESSAGE, rows)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] * 1000


def line(label: str, latencies: list[float], elapsed: float | None = None) -> str:
    rate = f"  {len(latencies) / elapsed:8.0f} msg/s" if elapsed else ""
    return f"{label:<44} p50 {pct(latencies, 50):7.2f} ms  p99 {pct(latencies, 99):7.2f} ms{rate}"


# -- the bare loop ------------------------------------------------------------------------------------------


async def bare_request(db: aiosqlite.Connection, channel: int) -> float:
    k = key_for(channel)
    began = time.perf_counter()
    await db.execute_fetchall(
        "SELECT role, content FROM messages WHERE platform = ? AND workspace = ? AND channel = ? AND thread = ''"
        " AND context = 0 ORDER BY id DESC LIMIT 50",
        (k.platform, k.workspace, k.channel),
    )
    now = datetime.now(timezone.utc).isoformat(timespec="milliseconds")
    await db.execute(INSERT_MESSAGE, (k.platform, k.workspace, k.channel, "", 0, "user", "u1", "hello there", "", 3,
                                      0, 0, None, now))
    await db.commit()
    return time.perf_counter() - began


# -- the engine ---------------------------------------------------------------------------------------------


async def engine_request(engine: Engine, channel: int, n: int) -> float:
    incoming = Incoming(key_for(channel), "u1", f"question number {n}: what is a token budget?", user_name="u1")
    began = time.perf_counter()
    async for _ in engine.reply(incoming):
        pass
    return time.perf_counter() - began


async def burst(request, channels: int, rounds: int) -> tuple[list[float], float]:  # type: ignore[no-untyped-def]
    latencies: list[float] = []
    began = time.perf_counter()
    for r in range(rounds):
        latencies += await asyncio.gather(*(request(c, r * channels + c) for c in range(channels)))
    return latencies, time.perf_counter() - began


async def steady(request, channels: int, rate: float, seconds: float) -> list[float]:  # type: ignore[no-untyped-def]
    rng = random.Random(11)
    tasks = []
    began = time.perf_counter()
    for n in range(int(rate * seconds)):
        delay = began + n / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(request(rng.randrange(channels), n)))
    return list(await asyncio.gather(*tasks))


async def main(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings(
            _env_file=None, PERSONABOT_DATA_DIR=Path(tmp), PERSONABOT_PERSONAS_DIR=PERSONAS,
            PERSONABOT_DEFAULT_PERSONA="assistant", PERSONABOT_DAILY_TOKEN_BUDGET=10**12,
        )
        await (await HistoryStore.open(settings.db_path)).close()
        began = time.perf_counter()
        seed(settings.db_path, args.messages, args.channels)
        print(f"seeded {args.messages:,} messages over {args.channels} channels in {time.perf_counter() - began:.1f} s")

        bare = await aiosqlite.connect(settings.db_path)
        await bare.execute("PRAGMA synchronous = NORMAL")
        bare_one = lambda c, n: bare_request(bare, c)  # noqa: E731
        await burst(bare_one, args.channels, 1)  # warm the page cache
        sequential = [await bare_one(n % args.channels, n) for n in range(500)]

        history = await HistoryStore.open(settings.db_path)
        engine = Engine(settings, PersonaLibrary(settings.personas_dir), history, InstantModels())
        engine_one = lambda c, n: engine_request(engine, c, n)  # noqa: E731
        await burst(engine_one, args.channels, 1)  # warm caches
        paced = await steady(engine_one, args.channels, args.rate, args.seconds)
        # Bursts alternate between the two, so a slow moment of the machine lands on both sides alike.
        bare_burst, engine_burst, bare_elapsed, engine_elapsed = [], [], 0.0, 0.0
        for _ in range(args.rounds):
            latencies, elapsed = await burst(bare_one, args.channels, 1)
            bare_burst, bare_elapsed = bare_burst + latencies, bare_elapsed + elapsed
            latencies, elapsed = await burst(engine_one, args.channels, 1)
            engine_burst, engine_elapsed = engine_burst + latencies, engine_elapsed + elapsed
        await engine.close()
        await bare.close()

    print(line("bare loop, one request at a time", sequential))
    print(line(f"(a) engine, {args.channels} channels at {args.rate:g} msg/s", paced))
    print(line(f"bare loop, {args.channels} at once x {args.rounds}", bare_burst, bare_elapsed))
    print(line(f"(b) engine, {args.channels} at once x {args.rounds}", engine_burst, engine_elapsed))
    bare_rate, engine_rate = len(bare_burst) / bare_elapsed, len(engine_burst) / engine_elapsed
    print(f"(b) engine messages/s vs bare loop: {engine_rate / bare_rate:.2f}x "
          "(each engine message also stores the reply, checks the budget and reads a 200-turn window)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=100_000, help="messages seeded before measuring")
    parser.add_argument("--channels", type=int, default=200)
    parser.add_argument("--rate", type=float, default=200, help="(a) messages per second, all channels together")
    parser.add_argument("--seconds", type=float, default=10, help="(a) how long to send")
    parser.add_argument("--rounds", type=int, default=20, help="(b) how many simultaneous bursts")
    asyncio.run(main(parser.parse_args()))
