"""Structured, quiet-by-default logging: one key=value line per event on stderr, WARNING and up unless
PERSONABOT_LOG_LEVEL says otherwise, so a chat in the terminal stays clean and a host's log search works."""
from __future__ import annotations

import logging

import structlog


def configure(level: str = "WARNING") -> None:
    shared = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                structlog.processors.KeyValueRenderer(key_order=["timestamp", "level", "logger", "event"]),
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("httpx", "httpcore", "discord", "slack_bolt", "transformers", "sentence_transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # slack_sdk's DEBUG lines carry request and response bodies: auth.test's token, oauth.v2.access's new token.
    logging.getLogger("slack_sdk").setLevel(max(logging.INFO, root.level))
