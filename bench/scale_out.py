"""Several `personabot` processes on one PostgreSQL server: messages/s, p50/p99 per message, ordering violations.

A load balancer in front of N bot processes hands each message to any of them, so consecutive messages of
one conversation land on different processes. This bench plays that balancer: CONVERSATIONS conversations
talk at once, each sending MESSAGES messages one after another, and message k+1 goes to the next process as
soon as message k's answer has begun (the moment its user turn is stored), so it arrives while another
process is still answering k. Each process runs the real engine and history store with a model that answers
instantly and says which of the conversation's messages it was shown, so an answer that missed an earlier
turn of its conversation, or came before one, is counted as an ordering violation (it must be 0).

Figures for 1, 2 and 4 processes on PostgreSQL (the server's defaults: every commit is flushed to disk), and
one process on SQLite (the embedded default) with the same load, as a ratio. Also the CPU each message costs
the PostgreSQL server (its postmaster and every process it started) and the bot processes, which a busy
machine's throughput cannot hide: on C cores, messages/s can be at most C × 1000 ÷ their sum.

`--sticky` routes all of a conversation's messages to one process instead (as Discord's shards do with a
guild's), which leaves only the database's own cost of several processes, with no handoff between them.

    .venv/bin/python bench/scale_out.py [--processes 1,2,4] [--conversations 100] [--messages 20] [--sticky]
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import multiprocessing as mp
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

PERSONA = """\
name: bench
display_name: Bench
description: Says which messages of the conversation it was shown.
system: You are a benchmark.
model: {context_window: 65536, max_tokens: 16}
"""
MARK = re.compile(r"^m(\d+)$")


class SeenModel:
    """Answers at once with the sequence numbers of the user turns it was shown, e.g. `seen 0,1,2`."""

    name = "instant"
    context_window = 65536

    def count_tokens(self, messages) -> int:  # type: ignore[no-untyped-def]
        return sum(len(m["content"]) // 4 + 4 for m in messages)

    async def stream(self, messages, params):  # type: ignore[no-untyped-def]
        from bot.models.base import Chunk, Usage

        seen = [MARK.match(m["content"]).group(1) for m in messages
                if m["role"] == "user" and MARK.match(m["content"])]
        replies = sum(m["role"] == "assistant" for m in messages)
        yield Chunk(f"seen {','.join(seen)} after {replies}")
        yield Chunk("", finish_reason="stop", usage=Usage(prompt_tokens=10, completion_tokens=3))


class SeenModels:
    def __init__(self) -> None:
        self.model = SeenModel()

    @contextlib.asynccontextmanager
    async def use(self, spec=None):  # type: ignore[no-untyped-def]
        yield self.model

    async def close(self) -> None:
        pass


# -- one bot process ----------------------------------------------------------------------------------------


def worker(store: str, personas: str, data: str, inbox, outbox) -> None:  # type: ignore[no-untyped-def]
    asyncio.run(_serve(store, Path(personas), Path(data), inbox, outbox))


async def _serve(store: str, personas: Path, data: Path, inbox, outbox) -> None:  # type: ignore[no-untyped-def]
    from bot.config import Settings
    from bot.conversation import ConvKey, Incoming
    from bot.engine import Engine
    from bot.history import open_history
    from bot.personas import PersonaLibrary

    settings = Settings(
        _env_file=None, PERSONABOT_DATA_DIR=data, PERSONABOT_PERSONAS_DIR=personas,
        PERSONABOT_DEFAULT_PERSONA="bench", PERSONABOT_DAILY_TOKEN_BUDGET=10**12,
        DATABASE_URL=store if store.startswith("postgresql") else None,
    )
    engine = Engine(settings, PersonaLibrary(personas), await open_history(settings), SeenModels())
    loop = asyncio.get_running_loop()
    arrived: asyncio.Queue = asyncio.Queue()
    loop.add_reader(inbox.fileno(), lambda: arrived.put_nowait(inbox.recv()))
    tasks: set[asyncio.Task] = set()

    async def answer(conversation: int, seq: int) -> None:
        incoming = Incoming(ConvKey("slack", "T1", f"C{conversation}"), "u1", f"m{seq}", user_name="u1")
        text = ""
        async for piece in engine.reply(incoming):
            if not text:
                outbox.send(("began", conversation, seq))
            text += piece
        outbox.send(("done", conversation, seq, text))

    outbox.send(("ready",))
    while (message := await arrived.get()) != "stop":
        task = asyncio.create_task(answer(*message))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    loop.remove_reader(inbox.fileno())
    await engine.close()
    outbox.send(("closed",))


# -- the balancer -------------------------------------------------------------------------------------------


def cpu_seconds(pids: set[int], children_of: int | None = None) -> float:
    """CPU seconds (user + system) used so far by `pids` and, when given, every process `children_of` started."""
    total, tick = 0.0, os.sysconf("SC_CLK_TCK")
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            pid, fields = int(stat.parent.name), stat.read_text().rsplit(")", 1)[1].split()
            if pid in pids or (children_of is not None and int(fields[1]) == children_of):
                total += (int(fields[11]) + int(fields[12])) / tick
        except (OSError, IndexError, ValueError):
            continue
    return total


def run(store: str, processes: int, conversations: int, messages: int, personas: Path, data: Path,
        postmaster: int | None = None, sticky: bool = False) -> dict:
    """One run: start the processes (not timed), play the conversations, check every answer."""
    ctx = mp.get_context("spawn")
    pipes, procs = [], []
    for _ in range(processes):
        to_worker, inbox = ctx.Pipe()
        outbox, from_worker = ctx.Pipe()
        proc = ctx.Process(target=worker, args=(store, str(personas), str(data), inbox, outbox), daemon=True)
        proc.start()
        pipes.append((to_worker, from_worker))
        procs.append(proc)
    for _, from_worker in pipes:
        assert from_worker.recv() == ("ready",)
    # Warm each process up (first queries, connections, imports) on conversations of its own, untimed.
    for n, (to_worker, from_worker) in enumerate(pipes):
        for seq in range(3):
            to_worker.send((-1 - n, seq))
            while from_worker.recv()[0] != "done":
                pass

    sent: dict[tuple[int, int], float] = {}
    latencies: list[float] = []
    violations = 0
    done = 0
    bots = {proc.pid for proc in procs}
    server_cpu = cpu_seconds({postmaster}, postmaster) if postmaster else 0.0
    bots_cpu = cpu_seconds(bots)
    began = time.perf_counter()

    def send(conversation: int, seq: int) -> None:
        # Each message of a conversation goes to the next process, so consecutive turns never share one; or,
        # `sticky`, every message of a conversation to the same process, as Discord's shards route a guild.
        to_worker, _ = pipes[(conversation + (0 if sticky else seq)) % processes]
        sent[conversation, seq] = time.perf_counter()
        to_worker.send((conversation, seq))

    for conversation in range(conversations):
        send(conversation, 0)
    readers = [from_worker for _, from_worker in pipes]
    while done < conversations * messages:
        for ready in mp.connection.wait(readers):
            event = ready.recv()
            if event[0] == "began" and event[2] + 1 < messages:
                send(event[1], event[2] + 1)
            elif event[0] == "done":
                _, conversation, seq, text = event
                latencies.append(time.perf_counter() - sent[conversation, seq])
                expected = f"seen {','.join(str(i) for i in range(seq + 1))} after {seq}"
                violations += text != expected
                done += 1
    elapsed = time.perf_counter() - began
    server_cpu = (cpu_seconds({postmaster}, postmaster) - server_cpu) if postmaster else 0.0
    bots_cpu = cpu_seconds(bots) - bots_cpu
    for to_worker, from_worker in pipes:
        to_worker.send("stop")
        assert from_worker.recv() == ("closed",)
    for proc in procs:
        proc.join()
    latencies.sort()
    return {"rate": done / elapsed, "p50": statistics.median(latencies) * 1000,
            "server_cpu": server_cpu / done * 1000, "bots_cpu": bots_cpu / done * 1000,
            "p99": latencies[int(0.99 * (len(latencies) - 1))] * 1000, "violations": violations, "n": done}


def main() -> None:
    from postgres_server import bench_server

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", default="1,2,4")
    parser.add_argument("--conversations", type=int, default=100, help="conversations talking at once")
    parser.add_argument("--messages", type=int, default=20, help="messages in each conversation")
    parser.add_argument("--sticky", action="store_true",
                        help="route every message of a conversation to one process (Discord shards) instead")
    args = parser.parse_args()
    counts = sorted({int(p) for p in args.processes.split(",")} | {1})  # 1 is every ratio's baseline
    rows = []
    with bench_server() as cluster, tempfile.TemporaryDirectory() as tmp:
        personas = Path(tmp) / "personas"
        personas.mkdir()
        (personas / "bench.yaml").write_text(PERSONA)
        shape = (args.conversations, args.messages, personas)
        sqlite = run("sqlite", 1, *shape, Path(tmp) / "sqlite")
        rows.append(("SQLite, 1 process", sqlite))
        for n in counts:
            url = cluster.url(cluster.new_database())
            rows.append((f"PostgreSQL, {n} process{'es' if n > 1 else ''}",
                         run(url, n, *shape, Path(tmp) / f"pg{n}", cluster.postmaster_pid, args.sticky)))

    print(f"{args.conversations} conversations at once x {args.messages} messages each; "
          + ("all of a conversation's messages to one process" if args.sticky
             else "each message handed to a different process than the one before it"))
    print(f"{'':<26}{'msg/s':>9}{'p50 ms':>9}{'p99 ms':>9}{'violations':>12}"
          f"{'CPU ms/msg: server':>21}{'bots':>7}")
    for label, row in rows:
        print(f"{label:<26}{row['rate']:9.0f}{row['p50']:9.1f}{row['p99']:9.1f}{row['violations']:8d} / {row['n']}"
              f"{row['server_cpu']:21.2f}{row['bots_cpu']:7.2f}")
    pg1 = next(row for label, row in rows if label == "PostgreSQL, 1 process")
    print(f"PostgreSQL ÷ SQLite, one process: {pg1['rate'] / sqlite['rate']:.2f}x messages/s")
    for label, row in rows[2:]:
        print(f"{label} ÷ PostgreSQL, 1 process: {row['rate'] / pg1['rate']:.2f}x messages/s")


if __name__ == "__main__":
    main()
