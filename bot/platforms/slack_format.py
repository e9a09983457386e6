"""Text to and from Slack: model Markdown to safe mrkdwn, Slack's length limits, mention defusing.

bot.render cuts a reply at these limits, by the same rule as on every other platform.

The model writes Markdown and may echo `<!channel>` or `@here` (from a prompt, a document, a joke); nothing it
writes may ping a channel or a user group, so every outgoing string passes through `defuse_mentions`.
"""
from __future__ import annotations

import html
import re

from markdown_to_mrkdwn import SlackMarkdownConverter

# One posted message: Slack truncates `text` past 40,000 characters and advises staying under 4,000 so a message
# stays readable; answers longer than this become several messages in the same thread.
MESSAGE_LIMIT = 3_900
# One streamed message: chat.startStream/appendStream accept at most 12,000 characters of markdown_text per call,
# and a streamed message is kept to that size before a new one is started.
STREAM_LIMIT = 12_000

_ZWSP = "\u200b"
_SPECIAL_MENTION = re.compile(r"<!(channel|here|everyone)(?:\|[^>]*)?>", re.IGNORECASE)
_GROUP_MENTION = re.compile(r"<!subteam\^[A-Z0-9]+(?:\|@?([^>]*))?>", re.IGNORECASE)
_PLAIN_MENTION = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
_LINK = re.compile(r"<(?:https?://|mailto:)[^<>\s|]+(?:\|[^<>]*)?>")


def defuse_mentions(text: str) -> str:
    """Render broadcast and user-group mentions as plain text that Slack will not notify on."""
    text = _SPECIAL_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(1).lower()}", text)
    text = _GROUP_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(1) or 'group'}", text)
    return _PLAIN_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(1)}", text)


def _escape(text: str) -> str:
    """Escape &, < and > as Slack requires, keeping the links the converter wrote and line-start quote marks."""
    out: list[str] = []
    last = 0
    for link in _LINK.finditer(text):
        out.append(_escape_plain(text[last:link.start()]))
        out.append(link.group(0))
        last = link.end()
    out.append(_escape_plain(text[last:]))
    return "".join(out)


def _escape_plain(text: str) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;")
    return re.sub(r"(?<!^)(?<!\n)>", "&gt;", text)


def to_mrkdwn(markdown: str) -> str:
    """Markdown from the model as Slack mrkdwn: bold, italics, links, lists, code and quotes render, nothing pings."""
    return _escape(SlackMarkdownConverter().convert(defuse_mentions(markdown)))


def from_slack(text: str, bot_user_id: str | None = None) -> str:
    """A user's Slack message as plain text for the model: our own mention dropped, entities decoded."""
    if bot_user_id:
        text = re.sub(rf"<@{re.escape(bot_user_id)}(?:\|[^>]*)?>", "", text)
    text = re.sub(r"<(https?://[^|>]+)\|([^>]+)>", lambda m: m[1] if m[2] in m[1] else f"{m[2]} ({m[1]})", text)
    text = re.sub(r"<(https?://[^|>]+)>", r"\1", text)
    return html.unescape(text).strip()


def safe_to_send(text: str) -> int:
    """How much of streamed `text` can go out now without cutting a `<!…>` or `@here` that may yet complete.

    Only a `<` that may still become `<!…>` is held: a plain one ("if a < b") would stall the stream to the end.
    """
    lt = max(text.rfind("<!"), len(text) - 1 if text.endswith("<") else -1)
    if lt != -1 and ">" not in text[lt:]:
        return lt
    at = text.rfind("@")
    if at != -1 and len(text) - at <= len("@everyone"):
        return at
    return len(text)
