"""The chat format for models without a chat template (GPT-2 and its fine-tunes).

Training (`finetune/`) and inference (`bot/models/local.py`) must render conversations byte-for-byte the
same way, so this module is the only place that knows the format. Each turn is a role header line, the
content, then the tokenizer's end-of-sequence token as the end-of-turn marker, so generation stops on it.

    <|system|>
    You are ...<|endoftext|>
    <|user|>
    Hi<|endoftext|>
    <|assistant|>
    Hello!<|endoftext|>
"""
from __future__ import annotations

from bot.models.base import Message

ROLE_HEADER = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
DEFAULT_END_OF_TURN = "<|endoftext|>"


def render_turn(message: Message, end_of_turn: str = DEFAULT_END_OF_TURN) -> str:
    return f"{ROLE_HEADER[message['role']]}{message['content'].strip()}{end_of_turn}\n"


def render(messages: list[Message], end_of_turn: str = DEFAULT_END_OF_TURN, add_generation_prompt: bool = True) -> str:
    """The whole prompt; with `add_generation_prompt` it ends with the assistant header, ready to generate."""
    text = "".join(render_turn(m, end_of_turn) for m in messages)
    return text + ROLE_HEADER["assistant"] if add_generation_prompt else text


def render_segments(messages: list[Message], end_of_turn: str = DEFAULT_END_OF_TURN) -> list[tuple[str, bool]]:
    """The rendered conversation as (text, trainable) pieces: only assistant content and its end marker
    are trainable, so fine-tuning puts loss on exactly what the model will be asked to generate."""
    pieces: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "assistant":
            pieces.append((ROLE_HEADER["assistant"], False))
            pieces.append((f"{m['content'].strip()}{end_of_turn}", True))
            pieces.append(("\n", False))
        else:
            pieces.append((render_turn(m, end_of_turn), False))
    return pieces
