"""kill -9 in the middle of a busy run: answers begun, user turns lost, database integrity, first-text latency.

The bot runs in a child process: the real engine, history store and `openai` client, against the local test
server (tests/openai_server.py) streaming slowly. CHANNELS channels talk at once, each sending its share of
MESSAGES one after another, as people in a conversation do. Once a seeded share of the answers has begun, the
bench kill -9's the child and opens its database: every message whose first text the child had shown must
have its user turn stored. Half the channels run each way, in the same process under the same load:
  - "before text": the bot as it is, committing the user's turn before the first visible text;
  - "behind text": the bot as it was, where the turn commits while the model thinks but nothing waits for it
    (restored only inside the child, by a history wrapper), which is what lost turns on a crash;
so the first-text latency ratio between them is measured on the same machine at the same moments.
`--disk-ms` makes every commit that much slower, as on a busy network volume, which widens the moment in
which the old way loses turns.

    .venv/bin/python bench/crash.py [--runs 5] [--messages 200] [--channels 40] [--think 0] [--disk-ms 0]
"""
from __future__ import annotations

import argparse
import asyncio
import random
import sqlite3
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from bot.config import Settings  # noqa: E402
from bot.conversation import ConvKey, Incoming  # noqa: E402
from bot.engine import Engine  # noqa: E402
from bot.history import HistoryStore  # noqa: E402
from openai_server import OpenAIServer, Reply  # noqa: E402

MODES = ("before text", "behind text")


def mode_of(channel: int) -> str:
    return MODES[channel % 2]


# -- the child: the bot under load ---------------------------------------------------------------------------


def commit_behind_first_text(history: HistoryStore, channels: set[str]) -> None:
    """The bot as it was, in these channels: a user turn's append returns at once and commits in the
    background, so the engine's wait for it before the first text costs nothing and guards nothing."""
    append, pending = history.append, set()

    async def append_behind(key, role, *args, **kwargs):  # type: ignore[no-untyped-def]
        if role != "user" or key.channel not in channels:
            return await append(key, role, *args, **kwargs)
        task = asyncio.ensure_future(append(key, role, *args, **kwargs))
        pending.add(task)
        task.add_done_callback(pending.discard)
        return 0

    history.append = append_behind  # type: ignore[method-assign]


def slow_disk(history: HistoryStore, seconds: float) -> None:
    commit = history._commit_in_one

    def slow_commit(batch, results):  # type: ignore[no-untyped-def]
        time.sleep(seconds)  # on the writer thread, where the disk's time is spent
        commit(batch, results)

    history._commit_in_one = slow_commit  # type: ignore[method-assign]


async def bot(args: argparse.Namespace) -> None:
    settings = Settings(_env_file=None, OPENAI_API_KEY="sk-bench", OPENAI_BASE_URL=args.url,
                        PERSONABOT_BACKEND="openai", PERSONABOT_DATA_DIR=args.data,
                        PERSONABOT_PERSONAS_DIR=ROOT / "personas")
    engine = await Engine.create(settings, knowledge=False)
    commit_behind_first_text(engine.history, {f"c{c}" for c in range(args.channels) if mode_of(c) == MODES[1]})
    if args.disk_ms:
        slow_disk(engine.history, args.disk_ms / 1000)

    keys = [ConvKey("discord", "guild", f"c{c}") for c in range(args.channels)]
    # One reply first loads the token counter and opens the model's connection: the latencies are of a bot
    # already talking, not of a cold start.
    async for _ in engine.reply(Incoming(ConvKey("discord", "guild", "warm-up"), "u", "hello", user_name="u")):
        pass

    async def channel(c: int) -> None:
        for n in range(c, args.messages, args.channels):
            incoming = Incoming(keys[c], f"u{c}", f"message {n}", user_name=f"u{c}")
            asked, shown = time.perf_counter(), False
            async for _ in engine.reply(incoming):
                if not shown:  # the platform would show this piece now
                    print(f"began {n} {time.perf_counter() - asked:.6f}", flush=True)
                    shown = True

    await asyncio.gather(*(channel(c) for c in range(args.channels)))
    await engine.close()


# -- the parent: load, kill, check ----------------------------------------------------------------------------


async def run_once(server: OpenAIServer, kill_after: int, args: argparse.Namespace) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--child", "--data", tmp, "--url", server.base_url, "--disk-ms",
            str(args.disk_ms), "--messages", str(args.messages), "--channels", str(args.channels),
            stdout=asyncio.subprocess.PIPE,
        )
        assert proc.stdout is not None
        began: dict[int, float] = {}
        while line := await proc.stdout.readline():
            _, n, latency = line.split()
            began[int(n)] = float(latency)
            if len(began) == kill_after:
                proc.kill()
                break
        for line in (await proc.stdout.read()).splitlines():  # shown before the kill landed
            _, n, latency = line.split()
            began[int(n)] = float(latency)
        killed = await proc.wait() == -9
        db = sqlite3.connect(Path(tmp) / "personabot.sqlite3")
        integrity = ", ".join(row for (row,) in db.execute("PRAGMA integrity_check"))
        stored = {int(content.split()[1]) for (content,) in db.execute(
            "SELECT content FROM messages WHERE role = 'user' AND channel != 'warm-up'")}
        db.close()
    by_mode = {mode: {n: latency for n, latency in began.items() if mode_of(n % args.channels) == mode}
               for mode in MODES}
    return {"began": by_mode, "lost": {mode: sorted(set(by_mode[mode]) - stored) for mode in MODES},
            "integrity": integrity, "killed": killed}


def ms(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] * 1000


async def main(args: argparse.Namespace) -> None:
    rng = random.Random(args.seed)
    words = [f" w{n}" for n in range(args.words)]
    async with OpenAIServer() as server:
        server.reply_with(lambda messages: Reply(chunks=words, delay=args.think, chunk_delay=args.chunk_delay))
        latencies: dict[str, list[float]] = {mode: [] for mode in MODES}
        lost = {mode: 0 for mode in MODES}
        print(f"{args.messages} messages over {args.channels} channels (half each way), first chunk after "
              f"{args.think * 1000:g} ms, {args.words} chunks {args.chunk_delay * 1000:g} ms apart, commits "
              f"+{args.disk_ms:g} ms; kill -9 once 30-70% have begun")
        print(f"{'run':>3}  {'commit':<12} {'began':>5} {'lost':>4}  {'integrity':<9}  first text p50     p90")
        for run in range(1, args.runs + 1):
            result = await run_once(server, rng.randint(int(args.messages * 0.3), int(args.messages * 0.7)), args)
            for mode in MODES:
                began = list(result["began"][mode].values())
                latencies[mode] += began
                lost[mode] += len(result["lost"][mode])
                note = "" if result["killed"] else "  (finished before the kill)"
                print(f"{run:>3}  {mode:<12} {len(began):>5} {len(result['lost'][mode]):>4}  "
                      f"{result['integrity']:<9}  {ms(began, 50):8.1f} ms {ms(began, 90):6.1f} ms{note}")
    for mode in MODES:
        print(f"commit {mode}: {len(latencies[mode])} answers began, {lost[mode]} user turns lost")
    now, before = latencies["before text"], latencies["behind text"]
    print(f"first-text latency, commit before text / behind text: p50 {ms(now, 50) / ms(before, 50):.2f}x, "
          f"p90 {ms(now, 90) / ms(before, 90):.2f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="kill -9 runs per mode")
    parser.add_argument("--messages", type=int, default=200)
    parser.add_argument("--channels", type=int, default=40)
    parser.add_argument("--think", type=float, default=0.0, help="seconds before the model's first chunk")
    parser.add_argument("--chunk-delay", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument("--words", type=int, default=20, help="chunks per answer")
    parser.add_argument("--disk-ms", type=float, default=0.0, help="extra milliseconds every commit takes")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    args = parser.parse_args()
    asyncio.run(bot(args) if args.child else main(args))
