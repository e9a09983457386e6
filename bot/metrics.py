"""Prometheus metrics, served at `GET /metrics` beside `/healthz`: what an operator watches to see the bot
answering, how fast, and what it costs."""
from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest

REPLIES = Counter("personabot_replies_total", "Messages answered, by platform and outcome.", ["platform", "outcome"])
TOKENS = Counter("personabot_tokens_total", "Tokens the models reported, by platform and kind.", ["platform", "kind"])
FIRST_TEXT = Histogram(
    "personabot_first_text_seconds", "From a message reaching the engine to the first text of its reply.",
    ["platform"], buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60),
)
REPLY = Histogram(
    "personabot_reply_seconds", "From a message reaching the engine to the end of its reply.",
    ["platform"], buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120),
)


def exposition() -> tuple[bytes, str]:
    """The metrics text and its content type."""
    return generate_latest(), CONTENT_TYPE_LATEST
