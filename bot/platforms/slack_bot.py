"""The Slack adapter: a slack-bolt `AsyncApp` that turns Slack events and slash commands into `Incoming`.

Every listener acks first and works after, so Slack hears back within its three seconds however slow the
model is; answers arrive later through the command's `response_url` or in the message's thread. A thread is a
conversation (its history key), so two threads in one channel never see each other's turns.
Signatures and timestamps are checked by bolt's request verification before any of this code runs.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import re
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import aiohttp
from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.context.respond.async_respond import AsyncRespond
from slack_bolt.response import BoltResponse
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.web.async_client import AsyncWebClient

from bot import metrics
from bot.config import Settings
from bot.conversation import ConvKey, Incoming
from bot.engine import KnowledgeDisabled, NotAdmin
from bot.personas import Persona, UnknownPersona
from bot.platforms.slack_format import MESSAGE_LIMIT, from_slack, split_message, to_mrkdwn
from bot.platforms.slack_reply import ChannelPacer, ThreadReply

if TYPE_CHECKING:
    from bot.engine import Engine

log = logging.getLogger(__name__)

SLACK_API_URL = "https://slack.com/api/"
RESPONSE_URL_LIMIT = 5  # Slack accepts at most five replies through one command's response_url
PERSONA_USAGE = "Usage: `/persona list`, `/persona show [NAME]`, `/persona set NAME` (admins)."
KNOWLEDGE_USAGE = (
    "Usage: `/knowledge search QUERY`. To add a document (admins), share the file with me: drop it in a DM "
    "with me, or attach it to a message that mentions me and says `add`."
)
# A file shared with no words, or with "add …", is a document for the knowledge base; a file shared with a
# question (a screenshot, a log) is context for that question and must not be met with an admin refusal.
_UPLOAD_WORDS = re.compile(r"^(add|learn|upload|remember)\b", re.IGNORECASE)


class SlackConfigError(ValueError):
    """Slack credentials that cannot start either mode; the message names the missing variable."""


def slack_configured(settings: Settings) -> bool:
    """Whether `personabot run` should start Slack at all."""
    return bool(settings.slack_bot_token and (settings.slack_app_token or settings.slack_signing_secret))


def _web_client(settings: Settings) -> AsyncWebClient:
    base_url = settings.slack_api_url or SLACK_API_URL
    return AsyncWebClient(
        token=settings.slack_bot_token,
        base_url=base_url if base_url.endswith("/") else base_url + "/",
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
    )


class _Recent:
    """Keys seen within `ttl` seconds. Slack retries an event up to three times over about five minutes."""

    def __init__(self, ttl: float = 900.0, clock=time.monotonic):
        self._ttl = ttl
        self._clock = clock
        self._seen: OrderedDict[object, float] = OrderedDict()

    def first_time(self, key: object) -> bool:
        now = self._clock()
        while self._seen and next(iter(self._seen.values())) < now - self._ttl:
            self._seen.popitem(last=False)
        if key in self._seen:
            return False
        self._seen[key] = now
        return True


def create_slack_app(engine: "Engine", settings: Settings) -> AsyncApp:
    """The bolt app with every listener registered; serve it with `create_web_app` or Socket Mode."""
    if not settings.slack_bot_token:
        raise SlackConfigError("SLACK_BOT_TOKEN is not set (the bot token, xoxb-…, from the app's OAuth page).")
    if not (settings.slack_signing_secret or settings.slack_app_token):
        raise SlackConfigError(
            "Set SLACK_SIGNING_SECRET to receive events over HTTP, or SLACK_APP_TOKEN (xapp-…) for Socket Mode."
        )
    app = AsyncApp(
        client=_web_client(settings),
        signing_secret=settings.slack_signing_secret or "",
        process_before_response=False,  # ack goes back at once; the listener keeps running after it
    )
    SlackBot(engine).register(app)
    return app


def create_web_app(slack_app: AsyncApp | None) -> web.Application:
    """`GET /healthz` and `GET /metrics` for the host, and `POST /slack/events` (events and slash commands)
    when Slack talks over HTTP. In Socket Mode there is no signing secret, so that route is left out."""

    async def events(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await slack_app.async_dispatch(await to_bolt_request(request)))

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics_text(request: web.Request) -> web.Response:
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics_text)])
    if slack_app is not None:
        app.add_routes([web.post("/slack/events", events)])
    return app


async def run_slack(engine: "Engine", settings: Settings) -> None:
    """Serve Slack until cancelled: Socket Mode when SLACK_APP_TOKEN is set, else events over HTTP. Either
    way `$PORT` answers `/healthz` and `/metrics`, so the Procfile's web process is healthy in both modes."""
    slack_app = create_slack_app(engine, settings)
    socket_mode = bool(settings.slack_app_token)
    runner = web.AppRunner(create_web_app(None if socket_mode else slack_app), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", settings.port).start()
    log.info("Slack: listening on port %d (%s)", settings.port,
             "GET /healthz, GET /metrics" if socket_mode else "POST /slack/events, GET /healthz, GET /metrics")
    try:
        if socket_mode:
            from slack_bolt.adapter.socket_mode.aiohttp import AsyncSocketModeHandler

            handler = AsyncSocketModeHandler(slack_app, settings.slack_app_token)
            try:
                await handler.connect_async()
                log.info("Slack: connected in Socket Mode")
                await asyncio.Event().wait()
            finally:
                await handler.close_async()
        else:
            await asyncio.Event().wait()
    finally:
        await runner.cleanup()


class SlackBot:
    """The listeners. Thin: each builds an `Incoming`, asks the engine, and renders what comes back."""

    def __init__(self, engine: "Engine"):
        self.engine = engine
        self._recent = _Recent()
        self._pacer = ChannelPacer()

    def register(self, app: AsyncApp) -> None:
        app.middleware(self._drop_retries)
        app.command("/ask")(self.ask)
        app.command("/persona")(self.persona)
        app.command("/reset")(self.reset)
        app.command("/knowledge")(self.knowledge)
        app.event("app_mention")(self.chat)
        app.event("message")(self.direct_message)

    async def _drop_retries(self, body: dict, next) -> BoltResponse | None:
        """Slack resends an event (X-Slack-Retry-Num) when it thinks we missed it; answer each event once."""
        event_id = body.get("event_id")
        if event_id and not self._recent.first_time(("event", event_id)):
            log.info("already handled event %s; acknowledging the retry", event_id)
            return BoltResponse(status=200, body="")
        await next()
        return None

    async def _is_admin(self, client: AsyncWebClient, user_id: str) -> bool:
        if self.engine.is_admin("slack", user_id):
            return True
        try:
            user = (await client.users_info(user=user_id))["user"]
        except SlackApiError as exc:
            log.warning("users.info failed for %s: %s", user_id, exc.response.get("error"))
            return False
        return bool(user.get("is_admin") or user.get("is_owner") or user.get("is_primary_owner"))

    async def _incoming(self, command: dict, client: AsyncWebClient, text: str = "", *, admin: bool = False) -> Incoming:
        channel = command["channel_id"]
        return Incoming(
            key=ConvKey("slack", command["team_id"], channel),
            user_id=command["user_id"],
            text=text,
            user_name=command.get("user_name", ""),
            is_admin=await self._is_admin(client, command["user_id"]) if admin else False,
            is_private=channel.startswith("D") or command.get("channel_name") == "directmessage",
        )

    # -- slash commands ------------------------------------------------------------------------------

    async def ask(self, ack, command: dict, respond: AsyncRespond, client: AsyncWebClient) -> None:
        question = from_slack(command.get("text", ""))
        if not question:
            await ack(text="Usage: `/ask QUESTION`: the channel's persona answers here, for everyone to see.")
            return
        await ack(response_type="in_channel")  # shows the question in the channel while the model works
        incoming = await self._incoming(command, client, question)
        answer = "".join([piece async for piece in self.engine.reply(incoming)])
        parts = split_message(to_mrkdwn(answer))
        if len(parts) > RESPONSE_URL_LIMIT:
            notice = "\n_(cut short: a slash command gets five messages at most; mention me for long answers)_"
            parts = parts[:RESPONSE_URL_LIMIT]
            # Cut at a break with any code block closed, so the notice is not swallowed into a code block.
            parts[-1] = split_message(parts[-1], MESSAGE_LIMIT - len(notice))[0] + notice
        for part in parts:
            await respond(text=part, response_type="in_channel", replace_original=False)

    async def persona(self, ack, command: dict, respond: AsyncRespond, client: AsyncWebClient) -> None:
        await ack()
        args = command.get("text", "").split()
        action = args[0].lower() if args else "show"
        key = ConvKey("slack", command["team_id"], command["channel_id"])
        active = await self.engine.active_persona(key)
        if action == "list" and len(args) == 1:
            lines = [
                f"• **{p.name}**: {p.display_name}" + (f" ({p.description})" if p.description else "")
                + ("  ← active here" if p.name == active.name else "")
                for p in self.engine.personas.all()
            ]
            await respond(to_mrkdwn("\n".join(lines) or "No personas are installed."))
        elif action == "show" and len(args) <= 2:
            try:
                persona = self.engine.personas.get(args[1]) if len(args) == 2 else active
            except UnknownPersona as exc:
                await respond(to_mrkdwn(str(exc)[0].upper() + str(exc)[1:]))
                return
            await respond(_describe(persona, active=persona.name == active.name))
        elif action == "set" and len(args) == 2:
            incoming = await self._incoming(command, client, admin=True)
            try:
                persona = await self.engine.set_persona(incoming, args[1])
            except (NotAdmin, UnknownPersona) as exc:
                await respond(to_mrkdwn(str(exc)[0].upper() + str(exc)[1:]))
                return
            await respond(
                f"<@{incoming.user_id}> switched this channel to *{to_mrkdwn(persona.display_name)}* "
                f"(`{persona.name}`); the conversation starts fresh.",
                response_type="in_channel",
            )
        else:
            await respond(PERSONA_USAGE)

    async def reset(self, ack, command: dict, respond: AsyncRespond, client: AsyncWebClient) -> None:
        await ack()
        incoming = await self._incoming(command, client, admin=True)
        try:
            await self.engine.reset(incoming)
        except NotAdmin as exc:
            await respond(to_mrkdwn(str(exc)))
            return
        await respond(
            "Done: this channel's `/ask` conversation starts fresh. Threads keep their own history; "
            "start a new thread for a clean slate there."
        )

    async def knowledge(self, ack, command: dict, respond: AsyncRespond, client: AsyncWebClient) -> None:
        await ack()
        action, _, query = command.get("text", "").strip().partition(" ")
        if action.lower() != "search" or not query.strip():
            await respond(KNOWLEDGE_USAGE)
            return
        key = ConvKey("slack", command["team_id"], command["channel_id"])
        try:
            hits = await self.engine.search_knowledge(from_slack(query), key)
        except KnowledgeDisabled as exc:
            await respond(to_mrkdwn(f"{exc} An admin can enable it by starting the bot with a knowledge folder."))
            return
        if not hits:
            await respond("Nothing in the knowledge base matches that.")
            return
        lines = [
            f"**{hit.source}** § {hit.locator} ({hit.score:.2f})\n> {' '.join(hit.text.split())[:300]}"
            for hit in hits
        ]
        await respond(split_message(to_mrkdwn("\n\n".join(lines)))[0])

    # -- conversation ---------------------------------------------------------------------------------

    async def direct_message(self, event: dict, body: dict, client: AsyncWebClient, context: dict) -> None:
        """DMs with the bot. Channel messages reach us only as app_mention (no message.channels scope)."""
        if event.get("channel_type") != "im" or event.get("bot_id"):
            return
        if event.get("subtype") not in (None, "file_share", "thread_broadcast"):
            return  # edits, deletions, joins: nothing to answer
        await self.chat(event, body, client, context)

    async def chat(self, event: dict, body: dict, client: AsyncWebClient, context: dict) -> None:
        channel, ts, user = event["channel"], event["ts"], event.get("user", "")
        # A mention inside a DM can arrive both as message.im and app_mention: answer the message once.
        if not user or not self._recent.first_time(("message", channel, ts)):
            return
        team = body.get("team_id") or event.get("team", "")
        thread = event.get("thread_ts") or ts
        incoming = Incoming(
            key=ConvKey("slack", team, channel, thread),
            user_id=user,
            text=from_slack(event.get("text", ""), context.get("bot_user_id")),
            is_private=event.get("channel_type") == "im" or channel.startswith("D"),
        )
        if event.get("files") and (not incoming.text or _UPLOAD_WORDS.match(incoming.text)):
            await self._add_files(client, event["files"], incoming, thread)
            return
        if not incoming.text:
            await client.chat_postMessage(channel=channel, thread_ts=thread, text="Yes? Ask me something.")
            return
        reply = ThreadReply(client, channel=channel, thread_ts=thread, team_id=team, user_id=user, pacer=self._pacer)
        async for piece in self.engine.reply(incoming):
            await reply.write(piece)
        await reply.close()

    async def _add_files(self, client: AsyncWebClient, files: list[dict], incoming: Incoming, thread: str) -> None:
        """Files shared with the bot become knowledge; each gets its own report line in the thread."""
        incoming = dataclasses.replace(incoming, is_admin=await self._is_admin(client, incoming.user_id))
        reports: list[str] = []
        for shared in files:
            name = shared.get("name") or shared["id"]
            try:
                info: dict[str, Any] = (await client.files_info(file=shared["id"]))["file"]
                name = info.get("name") or name
                self.engine.check_upload(incoming, name, info.get("size", 0))  # before a byte is downloaded
                data = await self._download(client, info)
                reports.append(await self.engine.add_knowledge(incoming, name, data))
            except (NotAdmin, KnowledgeDisabled) as exc:
                reports = [str(exc)]
                break
            except ValueError as exc:  # UploadRefused and friends: the file, not the bot, is at fault
                reports.append(f"{name}: {exc}")
            except (SlackApiError, aiohttp.ClientError) as exc:
                log.warning("could not fetch %s: %s", name, exc)
                reports.append(f"{name}: couldn't download it from Slack ({exc}).")
        await client.chat_postMessage(
            channel=incoming.key.channel, thread_ts=thread, text=to_mrkdwn("\n".join(reports))
        )

    async def _download(self, client: AsyncWebClient, info: dict[str, Any]) -> bytes:
        url = info.get("url_private_download") or info["url_private"]
        headers = {"Authorization": f"Bearer {client.token}"}
        async with aiohttp.ClientSession(raise_for_status=True) as session:
            async with session.get(url, headers=headers) as response:
                if response.content_type == "text/html":  # Slack's sign-in page: the token lacks files:read
                    raise aiohttp.ClientError("Slack answered with a sign-in page; does the app have files:read?")
                return await response.read()


def _describe(persona: Persona, *, active: bool) -> str:
    model = persona.model.name or persona.model.path or "the default model"
    lines = [
        f"**{persona.display_name}** (`{persona.name}`)" + (": active in this channel" if active else ""),
        persona.description,
        f"Model: {model}" + (f", temperature {persona.model.temperature}" if persona.model.temperature is not None else ""),
        f"Knowledge: {', '.join(persona.knowledge)}" if persona.knowledge else "Knowledge: none",
        "System prompt:",
        "```",
        persona.system.strip()[:2500],
        "```",
    ]
    return to_mrkdwn("\n".join(line for line in lines if line))
