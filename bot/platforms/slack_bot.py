"""The Slack adapter: a slack-bolt `AsyncApp` that turns Slack events and slash commands into `Incoming`.

Every listener acks first and works after, so Slack hears back within its three seconds however slow the
model is; answers arrive later through the command's `response_url` or in the message's thread. A thread is a
conversation (its history key), so two threads in one channel never see each other's turns. Requests reach
these listeners only once slack_http.py has checked their signature. Nothing a bot writes is answered, so two
bots cannot talk to each other forever.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.context.set_status.async_set_status import AsyncSetStatus
from slack_bolt.context.set_suggested_prompts.async_set_suggested_prompts import AsyncSetSuggestedPrompts
from slack_bolt.context.set_title.async_set_title import AsyncSetTitle
from slack_bolt.middleware.assistant.async_assistant import AsyncAssistant
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.web.async_client import AsyncWebClient

from bot import commands
from bot.attachments import read_capped
from bot.conversation import Attachment, ConvKey, Incoming, Role
from bot.platforms.slack_format import MESSAGE_LIMIT, from_slack, to_mrkdwn
from bot.platforms.slack_reply import ChannelPacer, ThreadReply, persona_identity
from bot.render import clip, split_message

if TYPE_CHECKING:
    from bot.engine import Engine

log = logging.getLogger(__name__)

RESPONSE_URL_LIMIT = 5  # Slack accepts at most five replies through one command's response_url
SHARE_A_FILE = (
    "To add a document (admins), share the file with me: drop it in a DM with me, or attach it to a message "
    "that mentions me and says `add`."
)
FORM_CALLBACK = "personabot_form"
MODAL_TITLE_LIMIT = 24  # Slack's cap on a modal's title
# A file shared with no words, or with "add …", is a document for the knowledge base; a file shared with a
# question (a screenshot, a log) is context for that question and must not be met with an admin refusal.
SUGGESTED_PROMPTS = 4  # Slack shows at most four
THREAD_TITLE_LIMIT = 100
THINKING = "is thinking…"  # Slack shows it after the app's name
_UPLOAD_WORDS = re.compile(r"^(add|learn|upload|remember)\b", re.IGNORECASE)


class _Recent:
    """Keys seen within `ttl` seconds, at most `size` of them. Slack retries an event up to three times over
    about five minutes; the cap keeps a flood of events from growing this without bound, at the price of
    answering twice an event retried after `size` newer ones."""

    def __init__(self, ttl: float = 900.0, clock=time.monotonic, size: int = 100_000):
        self._ttl = ttl
        self._clock = clock
        self._size = size
        self._seen: OrderedDict[object, float] = OrderedDict()

    def __len__(self) -> int:
        return len(self._seen)

    def first_time(self, key: object) -> bool:
        now = self._clock()
        while self._seen and (next(iter(self._seen.values())) < now - self._ttl or len(self._seen) >= self._size):
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


class SlackBot:
    """The listeners. Thin: each builds an `Incoming`, runs the command table or the engine, renders the result."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._recent = _Recent()
        self._pacer = ChannelPacer()  # one for every workspace: it keys channels by (workspace, channel)

    def register(self, app: AsyncApp) -> None:
        app.middleware(self._drop_retries)
        for name in commands.groups():
            app.command(f"/{name}")(self.slash)
        app.view(FORM_CALLBACK)(self.form_submitted)
        app.event("app_mention")(self.chat)
        # The app's DM as Slack's AI-app surface: bolt's Assistant takes the assistant events and the messages in
        # the DM's threads; everything else falls through to the listeners here.
        assistant = AsyncAssistant()
        assistant.thread_started(self.assistant_thread_started)
        assistant.user_message(self.assistant_message)
        app.assistant(assistant)
        app.event("message")(self.direct_message)

    async def _drop_retries(self, body: dict, next) -> BoltResponse | None:
        """Slack resends an event (X-Slack-Retry-Num) when it thinks we missed it; answer each event once."""
        event_id = body.get("event_id")
        if event_id and not self._recent.first_time(("event", event_id)):
            log.info("already handled event %s; acknowledging the retry", event_id)
            return BoltResponse(status=200, body="")
        await next()
        return None

    async def _role(self, client: AsyncWebClient, user_id: str) -> Role:
        """Owners by PERSONABOT_ADMINS; workspace admins and owners as Slack's users.info reports them."""
        if (role := self.engine.role("slack", user_id, workspace_admin=False)) is Role.OWNER:
            return role
        try:
            user = (await client.users_info(user=user_id))["user"]
        except SlackApiError as exc:
            log.warning("users.info failed for %s: %s", user_id, exc.response.get("error"))
            return Role.MEMBER
        admin = bool(user.get("is_admin") or user.get("is_owner") or user.get("is_primary_owner"))
        return Role.ADMIN if admin else Role.MEMBER

    async def _incoming(self, team: str, channel: str, user: str, client: AsyncWebClient, *,
                        private: bool) -> Incoming:
        return Incoming(key=ConvKey("slack", team, channel), user_id=user, text="",
                        role=await self._role(client, user), is_private=private)

    # -- slash commands: the command table -----------------------------------------------------------

    async def slash(self, ack, command: dict, respond: AsyncRespond, client: AsyncWebClient) -> None:
        line = f"{command['command']} {from_slack(command.get('text', ''))}"
        try:
            cmd, args = commands.parse(line)
        except commands.Usage as exc:
            await ack(text=to_mrkdwn(str(exc)))
            return
        if any(arg.kind == "file" for arg in cmd.args):
            await ack(text=SHARE_A_FILE)
            return
        # /ask shows the question in the channel while the model works; the rest answer only the asker.
        await ack(response_type="in_channel") if cmd.path == "ask" else await ack()
        channel = command["channel_id"]
        private = channel.startswith("D") or command.get("channel_name") == "directmessage"
        incoming = await self._incoming(command["team_id"], channel, command["user_id"], client, private=private)
        result = await commands.run(self.engine, incoming, cmd.path, args)
        if isinstance(result, commands.Form):
            await client.views_open(trigger_id=command["trigger_id"], view=_modal(result, channel, private))
        elif isinstance(result, commands.Stream):
            await self._respond_stream(respond, result)
        else:
            kind = "in_channel" if result.public else "ephemeral"
            for part in split_message(to_mrkdwn(result.text), MESSAGE_LIMIT):
                await respond(text=part, response_type=kind, replace_original=False)

    async def _respond_stream(self, respond: AsyncRespond, result: commands.Stream) -> None:
        answer = "".join([piece async for piece in result.pieces])
        parts = split_message(to_mrkdwn(answer), MESSAGE_LIMIT)
        if len(parts) > RESPONSE_URL_LIMIT:
            notice = "\n_(cut short: a slash command gets five messages at most; mention me for long answers)_"
            parts = parts[:RESPONSE_URL_LIMIT]
            # Cut at a break with any code block closed, so the notice is not swallowed into a code block.
            parts[-1] = split_message(parts[-1], MESSAGE_LIMIT - len(notice))[0] + notice
        for part in parts:
            await respond(text=part, response_type="in_channel", replace_original=False)

    async def form_submitted(self, ack, body: dict, view: dict, client: AsyncWebClient) -> None:
        """Save on a form the bot opened: validated by the core, errors shown on the form itself."""
        meta = json.loads(view["private_metadata"])
        values = {block: (state.get("value") or {}).get("value") or ""
                  for block, state in view["state"]["values"].items()}
        user = body["user"]["id"]
        incoming = await self._incoming(view.get("team_id") or body["team"]["id"], meta["channel"], user, client,
                                        private=meta["private"])
        reply = await commands.submit(self.engine, incoming, meta["form"], meta["state"], values)
        if not reply.ok:
            await ack(response_action="errors", errors={_field_at_fault(reply.text, values): reply.text[:1900]})
            return
        await ack()
        await client.chat_postEphemeral(channel=meta["channel"], user=user, text=to_mrkdwn(reply.text))

    # -- conversation ---------------------------------------------------------------------------------

    async def direct_message(self, event: dict, body: dict, client: AsyncWebClient, context: dict) -> None:
        """DMs with the bot, and every message in a channel an admin turned on with `/channel enable` (Slack
        sends those only to an app subscribed to message.channels / message.groups)."""
        if _written_by_a_bot(event):
            return
        if event.get("channel_type") != "im":
            subtype = event.get("subtype")
            # A file with words is a question about it; a file dropped in a busy channel without a word is
            # not for the bot, and is never an upload there (an upload is a DM or a mention).
            text = event.get("text", "")
            if subtype not in (None, "thread_broadcast") and not (subtype == "file_share" and text.strip()):
                return
            if subtype == "file_share" and f"<@{context.get('bot_user_id')}>" in text:
                return  # a mention: app_mention answers it, as an upload if it asks for one
            key = ConvKey("slack", body.get("team_id") or event.get("team", ""), event.get("channel", ""))
            if not await self.engine.channel_enabled(key):
                return
            await self.chat(event, body, client, context, uploads=False)
            return
        if event.get("subtype") not in (None, "file_share", "thread_broadcast"):
            return  # edits, deletions, joins: nothing to answer
        await self.chat(event, body, client, context)

    async def assistant_thread_started(self, event: dict, body: dict,
                                       set_suggested_prompts: AsyncSetSuggestedPrompts) -> None:
        """A new assistant thread offers the questions the persona's own examples ask."""
        thread = event["assistant_thread"]
        key = ConvKey("slack", body.get("team_id") or "", thread["channel_id"])
        persona = await self.engine.active_persona(key)
        prompts = [turn["content"] for turn in persona.examples if turn["role"] == "user"][:SUGGESTED_PROMPTS]
        if prompts:
            await set_suggested_prompts(prompts=[{"title": clip(text, 75), "message": text} for text in prompts],
                                        title=f"Ask {persona.display_name}")

    async def assistant_message(self, event: dict, body: dict, client: AsyncWebClient, context: dict,
                                set_status: AsyncSetStatus, set_title: AsyncSetTitle) -> None:
        """A question in an assistant thread: titled after the thread's first question, "is thinking…" until
        the answer starts (Slack clears the status when the reply posts), then answered like any DM."""
        if _written_by_a_bot(event) or event.get("subtype") not in (None, "file_share"):
            return
        team = body.get("team_id") or event.get("team", "")
        text = from_slack(event.get("text", ""), context.get("bot_user_id"))
        try:
            if text and self._recent.first_time(("title", team, event["channel"], event["thread_ts"])):
                await set_title(clip(text, THREAD_TITLE_LIMIT))
            await set_status(THINKING)
        except SlackApiError as exc:  # bolt also routes plain DM threads here, which have no assistant status
            log.info("assistant thread status refused (%s); answering anyway", exc.response.get("error"))
        await self.chat(event, body, client, context)

    async def chat(self, event: dict, body: dict, client: AsyncWebClient, context: dict, *,
                   uploads: bool = True) -> None:
        if _written_by_a_bot(event):
            return
        channel, ts, user = event["channel"], event["ts"], event.get("user", "")
        team = body.get("team_id") or event.get("team", "")
        # A mention can arrive both as a message event and as app_mention: answer the message once. Channel
        # ids are only unique within a workspace, so the workspace is part of what makes a message the same.
        if not user or not self._recent.first_time(("message", team, channel, ts)):
            return
        thread = event.get("thread_ts") or ts
        files = event.get("files") or []
        incoming = Incoming(
            key=ConvKey("slack", team, channel, thread),
            user_id=user,
            text=from_slack(event.get("text", ""), context.get("bot_user_id")),
            is_private=event.get("channel_type") == "im" or channel.startswith("D"),
        )
        identity = persona_identity(await self.engine.active_persona(incoming.key), self.engine.settings.public_url)
        # Images shared without words are something to look at, not documents for the knowledge base.
        wordless_upload = not incoming.text and not all(_is_image(shared) for shared in files)
        if uploads and files and (wordless_upload or _UPLOAD_WORDS.match(incoming.text)):
            await self._add_files(client, files, incoming, thread, identity)
            return
        # Whatever else came with the message goes to the engine, which decides what to download.
        incoming = dataclasses.replace(incoming, attachments=tuple(self._attachment(client, f) for f in files))
        if not incoming.text and not files:
            await client.chat_postMessage(channel=channel, thread_ts=thread, text="Yes? Ask me something.",
                                          **identity)
            return
        reply = ThreadReply(client, channel=channel, thread_ts=thread, team_id=team, user_id=user,
                            pacer=self._pacer, identity=identity)
        async for piece in self.engine.reply(incoming):
            await reply.write(piece)
        await reply.close()

    async def _add_files(self, client: AsyncWebClient, files: list[dict], incoming: Incoming, thread: str,
                         identity: dict[str, str]) -> None:
        """Files shared with the bot run `/knowledge add`; each gets its own report line in the thread."""
        incoming = dataclasses.replace(incoming, role=await self._role(client, incoming.user_id))
        reports: list[str] = []
        for shared in files:
            name = shared.get("name") or shared["id"]
            try:
                info: dict[str, Any] = (await client.files_info(file=shared["id"]))["file"]
            except SlackApiError as exc:
                reports.append(f"{name}: couldn't read it from Slack ({exc.response.get('error')}).")
                continue
            file = Attachment(info.get("name") or name, info.get("size", 0),
                              lambda limit, info=info: self._download(client, info, limit))
            try:
                result = await commands.run(self.engine, incoming, "knowledge add", {"file": file})
            except aiohttp.ClientError as exc:
                log.warning("could not fetch %s: %s", file.name, exc)
                reports.append(f"{file.name}: couldn't download it from Slack ({exc}).")
                continue
            reports.append(result.text)
        await client.chat_postMessage(channel=incoming.key.channel, thread_ts=thread,
                                      text=to_mrkdwn("\n".join(dict.fromkeys(reports))), **identity)

    def _attachment(self, client: AsyncWebClient, shared: dict[str, Any]) -> Attachment:
        """A file from the event as the engine takes it: downloaded only if the engine reads it, with this
        workspace's bot token; files.info first only when the event left out its URL (Slack Connect files)."""
        async def read(limit: int) -> bytes:
            info = shared
            if not (info.get("url_private_download") or info.get("url_private")):
                info = (await client.files_info(file=shared["id"]))["file"]
            return await self._download(client, info, limit)

        return Attachment(shared.get("name") or shared.get("title") or shared.get("id", "file"),
                          shared.get("size") or 0, read, shared.get("mimetype") or "")

    async def _download(self, client: AsyncWebClient, info: dict[str, Any], limit: int) -> bytes:
        """The file's bytes with this workspace's token, read no further than one byte past `limit`: a file's
        `size` can be missing (Slack Connect, external files), so the body itself is capped."""
        url = info.get("url_private_download") or info["url_private"]
        headers = {"Authorization": f"Bearer {client.token}"}
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            async with session.get(url, headers=headers) as response:
                if response.content_type == "text/html":  # Slack's sign-in page: the token lacks files:read
                    raise aiohttp.ClientError("Slack answered with a sign-in page; does the app have files:read?")
                return await read_capped(response.content.iter_chunked(64 * 1024), limit)


def _is_image(shared: dict[str, Any]) -> bool:
    return str(shared.get("mimetype", "")).startswith("image/")


def _written_by_a_bot(event: dict) -> bool:
    """Another bot's message: answering it could start two bots talking to each other forever. (bolt's
    IgnoringSelfEvents middleware already drops the events our own bot user writes.)"""
    return bool(event.get("bot_id") or event.get("subtype") == "bot_message")


def _modal(form: commands.Form, channel: str, private: bool) -> dict[str, Any]:
    """A core form as a Slack modal (views.open); `private_metadata` carries what the submission needs."""
    blocks = []
    for field in form.fields:
        element: dict[str, Any] = {"type": "plain_text_input", "action_id": "value", "multiline": field.multiline,
                                   "max_length": field.max_length}
        if field.value:
            element["initial_value"] = field.value
        if field.placeholder:
            element["placeholder"] = {"type": "plain_text", "text": field.placeholder[:150]}
        blocks.append({"type": "input", "block_id": field.id, "optional": not field.required,
                       "label": {"type": "plain_text", "text": field.label[:2000]}, "element": element})
    return {
        "type": "modal", "callback_id": FORM_CALLBACK,
        "title": {"type": "plain_text", "text": clip(form.title, MODAL_TITLE_LIMIT)},
        "submit": {"type": "plain_text", "text": "Save"}, "close": {"type": "plain_text", "text": "Cancel"},
        "private_metadata": json.dumps({"form": form.id, "state": form.state, "channel": channel,
                                        "private": private}),
        "blocks": blocks,
    }


def _field_at_fault(text: str, values: dict[str, str]) -> str:
    """The form field an error names (`system: required`), else the free YAML field, where most errors are."""
    for field in values:
        if f" {field}:" in text or f" {field}." in text:
            return field
    return "extra" if "extra" in values else next(iter(values))
