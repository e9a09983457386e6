"""What `OpenAIChatModel.stream` costs over the bare `openai` client, streaming from the local test server.

The backend adds a `wait_for` around every chunk (the silence timeout), error translation and usage
bookkeeping. Both sides stream the same scripted replies from the same server in the same process, in
alternating rounds, best round each; the figure is replies/s of the backend over the bare client.
Target: ratio >= 0.9.

    python bench/openai_stream.py [--replies 200] [--chunks 50] [--rounds 5]
"""
from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

import openai  # noqa: E402

from bot.models.base import GenParams  # noqa: E402
from bot.models.openai import OpenAIChatModel  # noqa: E402
from openai_server import OpenAIServer, Reply  # noqa: E402

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a story."}]


async def bare(client: openai.AsyncOpenAI, replies: int) -> int:
    pieces = 0
    for _ in range(replies):
        stream = await client.chat.completions.create(model="gpt-4o-mini", messages=MESSAGES, stream=True,
                                                      stream_options={"include_usage": True},
                                                      temperature=0.7, max_tokens=400)
        async for event in stream:
            pieces += bool(event.choices and event.choices[0].delta.content)
    return pieces


async def backend(model: OpenAIChatModel, replies: int) -> int:
    pieces = 0
    for _ in range(replies):
        async for chunk in model.stream(MESSAGES, GenParams()):
            pieces += bool(chunk.text)
    return pieces


async def main(replies: int, chunks: int, rounds: int) -> None:
    async with OpenAIServer() as server:
        server.reply_with(lambda messages: Reply(chunks=[f" w{n}" for n in range(chunks)]))
        client = openai.AsyncOpenAI(api_key="sk-bench", base_url=server.base_url)
        model = OpenAIChatModel("gpt-4o-mini", api_key="sk-bench", base_url=server.base_url)
        await bare(client, 5), await backend(model, 5)  # warm connections
        best = {"bare": 0.0, "backend": 0.0}
        for _ in range(rounds):
            for name, run in (("bare", lambda: bare(client, replies)), ("backend", lambda: backend(model, replies))):
                start = time.perf_counter()
                got = await run()
                assert got == replies * chunks, (name, got)
                best[name] = max(best[name], replies / (time.perf_counter() - start))
        await client.close(), await model.aclose()
    print(f"bare openai client: {best['bare']:.0f} replies/s ({chunks} chunks each)")
    print(f"OpenAIChatModel:    {best['backend']:.0f} replies/s")
    print(f"ratio backend/bare: {best['backend'] / best['bare']:.2f}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replies", type=int, default=200)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    asyncio.run(main(args.replies, args.chunks, args.rounds))
