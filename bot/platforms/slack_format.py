"""Text to and from Slack: model Markdown to safe mrkdwn, Slack's length limits, mention defusing.

bot.render cuts a reply at these limits, by the same rule as on every other platform.

The model writes Markdown and may echo `<!channel>`, `@here` or `<@U123>` (from a prompt, a document, a joke);
nothing it writes may ping a channel, a user group or a person, so every outgoing string passes through
`defuse_mentions`. Channel links (`<#C123>`) and dates (`<!date^…>`) notify nobody and stay as Slack shows them.
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
_SPECIAL_MENTION = re.compile(r"<!(channel|here|everyone|group)(?:\|[^>]*)?>", re.IGNORECASE)
_GROUP_MENTION = re.compile(r"<!subteam\^[A-Z0-9]+(?:\|@?([^>]*))?>", re.IGNORECASE)
_USER_MENTION = re.compile(r"<@([A-Z0-9]+)(?:\|@?([^>]*))?>", re.IGNORECASE)
# What is left of `<!` or `<@` after the above (an unknown `<!foo>`, an opener cut off or nested in another
# token's label) is broken up, so no text written after it can ever close it into a live mention.
_OPENER = re.compile(r"<(?=[!@])(?!!date\^)", re.IGNORECASE)
_PLAIN_MENTION = re.compile(r"@(channel|here|everyone)\b", re.IGNORECASE)
_LINK = re.compile(r"<(?:(?:https?://|mailto:)[^<>\s|]+|#C[A-Z0-9]+)(?:\|[^<>]*)?>")
# The start of a `<!…>`, `<@…>` or `<#…>`, or a `<` at the very end that may begin one; with any `<` just before
# it, so a write never ends in a `<` that the next one's `@…` or `!…` would complete. Matched only from the
# first `<` of a run, so a long run of them costs one pass.
_TOKEN_START = re.compile(r"(?<!<)<+(?:[!@#]|$)")
# A trailing `@word` that may still grow into (or, pending the next character, be) @here, @channel or @everyone.
_TRAILING_AT = re.compile(r"@(\w*)$")
_PLAIN_PREFIXES = {word[:n] for word in ("here", "channel", "everyone") for n in range(len(word) + 1)}


def defuse_mentions(text: str) -> str:
    """Render broadcast, user-group and user mentions as plain text that Slack will not notify on.

    A label is closed with a zero-width space where its `>` was, so a label ending in `@` or `<` cannot join
    the text after it (in this write or the next) into a new mention.
    """
    text = _SPECIAL_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(1).lower()}", text)
    text = _GROUP_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(1) or 'group'}{_ZWSP}", text)
    text = _USER_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(2) or m.group(1)}{_ZWSP}", text)
    text = _OPENER.sub(f"<{_ZWSP}", text)
    return _PLAIN_MENTION.sub(lambda m: f"@{_ZWSP}{m.group(1)}", text)


def _escape(text: str) -> str:
    """Escape &, < and > as Slack requires, keeping links, channel links and line-start quote marks."""
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
    """How much of streamed `text` can go out now without cutting a `<!…>`, `<@…>` or `@here` that may yet
    complete. Each write is defused on its own and Slack shows their concatenation, so a cut must never fall
    inside a token: the earliest unclosed opener is held, not the last (`<!channel|a<b` may still close as one).

    Only a `<` that may still become a token is held: a plain one ("if a < b") would stall the stream to the end.
    """
    if unclosed := _TOKEN_START.search(text, text.rfind(">") + 1):  # an opener after the last `>` is unclosed
        return unclosed.start()
    if (at := _TRAILING_AT.search(text)) and at.group(1).lower() in _PLAIN_PREFIXES:
        return at.start()
    return len(text)
