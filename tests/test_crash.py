"""kill -9 in the middle of a reply, on the real `personabot chat` process: nothing it began to answer is lost."""
import asyncio
import random
import sqlite3

from openai_server import Reply, openai_server  # noqa: F401  (fixture)
from test_terminal import start_chat

SEED = 11
MESSAGES = 6


async def test_kill_9_mid_reply_keeps_every_user_turn_whose_answer_began(tmp_path, openai_server):
    rng = random.Random(SEED)
    openai_server.reply_with(lambda messages: Reply(chunks=[f" w{n}" for n in range(20)], chunk_delay=0.02))
    db_path = tmp_path / "data" / "personabot.sqlite3"
    kill_at = rng.randrange(1, MESSAGES)
    began: list[str] = []
    slow_disks: list[sqlite3.Connection] = []
    proc = await start_chat(tmp_path, openai_server)
    try:
        for n in range(kill_at + 1):
            if n == kill_at or (n and rng.random() < 0.5):
                # Another connection holds the write lock for a moment, as a slow disk would hold the commit.
                slow_disk = sqlite3.connect(db_path, isolation_level=None)
                slow_disk.execute("BEGIN IMMEDIATE")
                asyncio.get_running_loop().call_later(rng.uniform(0.05, 0.3), slow_disk.rollback)
                slow_disks.append(slow_disk)
            proc.stdin.write(f"message {n}\n".encode())
            await proc.stdin.drain()
            await asyncio.wait_for(proc.stdout.readexactly(1), 20)  # the answer's first visible text
            began.append(f"message {n}")
            if n == kill_at:
                proc.kill()  # SIGKILL: no handler, no `finally`, no clean close
                break
            await asyncio.wait_for(proc.stdout.readline(), 20)
        await asyncio.wait_for(proc.wait(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        for slow_disk in slow_disks:
            slow_disk.close()

    with sqlite3.connect(db_path) as db:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        user_turns = [content for (content,) in db.execute(
            "SELECT content FROM messages WHERE role = 'user' ORDER BY id")]
    assert user_turns == began
