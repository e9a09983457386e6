"""A local stand-in for Slack's side of the wire, served over real HTTP on 127.0.0.1.

It answers the Web API methods the bot calls (the bot reaches it through SLACK_API_URL), serves shared files
to bearer-token downloads, receives `response_url` posts, and records everything in arrival order so tests
can read back what a Slack user would have seen. `SlackApp` signs and sends the requests Slack would send.
"""
from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import itertools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable
from urllib.parse import urlencode

import aiohttp
from aiohttp import web

BOT_TOKEN = "xoxb-test-token"
APP_TOKEN = "xapp-test-token"
SIGNING_SECRET = "test-signing-secret"
TEAM = "T0TEST"
BOT_USER = "UBOT"
CLIENT_ID = "1111.2222"  # the app's OAuth credentials (SLACK_CLIENT_ID, SLACK_CLIENT_SECRET)
CLIENT_SECRET = "test-client-secret"


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)
    token: str = ""  # the bearer token the call was made with


class FakeSlackApi:
    def __init__(self, *, admins: set[str] = frozenset(), streaming: bool = True):
        self.admins = set(admins)
        self.streaming = streaming
        self.calls: list[Call] = []
        self.files: dict[str, tuple[str, bytes]] = {}
        self.file_types: dict[str, str] = {}  # mimetype Slack reports, by file id (`share`)
        self.file_teams: dict[str, str] = {}  # the workspace a shared file belongs to: only its token fetches it
        self.downloads: list[str] = []
        self.endless: set[str] = set()  # files whose body never ends (`share(..., endless=True)`)
        self.bytes_sent: dict[str, int] = {}  # of each endless body, before the bot hung up
        self.download_tokens: list[str] = []  # the bearer token of every file download attempt, in order
        self._ts = itertools.count(1)
        self._runner: web.AppRunner | None = None
        self.url = ""
        self.socket: web.WebSocketResponse | None = None
        self.socket_connected = asyncio.Event()
        self.socket_acks: list[dict] = []
        # Valid bot tokens and the workspace each speaks for; OAuth installs add one per workspace.
        self.tokens: dict[str, str] = {BOT_TOKEN: TEAM}
        self._codes: dict[str, dict[str, str]] = {}  # OAuth codes not yet exchanged
        # Token rotation (the app setting): installs get a refresh token and a token that expires in an hour,
        # inside bolt's two-hour margin, so the next request must exchange it. Refresh tokens are single-use.
        self.rotation = False
        self.refresh_tokens: dict[str, str] = {}  # refresh token → its workspace, until used
        self.exchanges: list[str] = []  # the workspace of every refresh-token exchange that succeeded
        self.redirect_url = ""  # where Slack's authorize page sends the installer when no redirect_uri is given

    async def start(self) -> "FakeSlackApi":
        app = web.Application()
        app.router.add_route("*", "/api/{method}", self._api)
        app.router.add_post("/respond/{name}", self._respond)
        app.router.add_get("/files/{file_id}", self._file)
        app.router.add_get("/socket", self._socket)
        app.router.add_get("/oauth/v2/authorize", self._authorize)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        return self

    async def close(self) -> None:
        if self.socket is not None:
            await self.socket.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def __aenter__(self) -> "FakeSlackApi":
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def api_url(self) -> str:
        return self.url + "api/"

    def response_url(self, name: str) -> str:
        return f"{self.url}respond/{name}"

    # -- what the bot did ---------------------------------------------------------------------------

    def calls_to(self, *methods: str) -> list[Call]:
        return [c for c in self.calls if c.method in methods]

    def opened_views(self) -> list[dict]:
        """The modals the bot opened (views.open), in order, as the dicts Slack would show."""
        return [c.params["view"] if isinstance(c.params["view"], dict) else json.loads(c.params["view"])
                for c in self.calls_to("views.open")]

    def responses(self, name: str) -> list[dict]:
        return [c.params for c in self.calls if c.method == f"respond/{name}"]

    def thread_text(self, channel: str, thread_ts: str) -> str:
        """What a user sees in the thread: streamed and posted messages, after every edit, in order."""
        messages: dict[str, str] = {}
        for call in self.calls:
            p = call.params
            if call.method in ("chat.postMessage", "chat.startStream") and "_ts" in p and p.get("channel") == channel \
                    and p.get("thread_ts") == thread_ts:
                messages[p["_ts"]] = p.get("text", "") + _markdown(p)
            elif call.method in ("chat.appendStream", "chat.stopStream") and p.get("ts") in messages:
                messages[p["ts"]] += _markdown(p)
            elif call.method == "chat.update" and p.get("ts") in messages:
                messages[p["ts"]] = p["text"]
        return "\n".join(messages[ts] for ts in sorted(messages, key=float))

    async def wait_for(self, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
        """Wait until `predicate()` is truthy; the timeout only keeps a broken test from hanging."""
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            if time.monotonic() > deadline:
                raise AssertionError(f"gave up waiting; calls so far: {[c.method for c in self.calls]}")
            await asyncio.sleep(0.02)
        return result

    # -- handlers -----------------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.Response:
        method = request.match_info["method"]
        params: dict[str, Any] = dict(request.query)
        if request.can_read_body:
            if request.content_type == "application/json":
                params.update(await request.json())
            else:
                params.update(await request.post())
        bearer = request.headers.get("Authorization", "")
        token = (bearer.removeprefix("Bearer ") if bearer.startswith("Bearer ") else "") or params.get("token")
        self.calls.append(Call(method, params, token=token or ""))
        if method == "oauth.v2.access":
            return web.json_response(self._exchange(request, params))
        if method == "apps.connections.open":
            if token != APP_TOKEN:  # Socket Mode connections need the app-level token, not the bot token
                return web.json_response({"ok": False, "error": "not_allowed_token_type"})
            return web.json_response({"ok": True, "url": f"ws{self.url.removeprefix('http')}socket"})
        if token not in self.tokens:
            return web.json_response({"ok": False, "error": "invalid_auth"})
        return web.json_response(self._answer(method, params, team=self.tokens[token]))

    def _answer(self, method: str, p: dict[str, Any], *, team: str = TEAM) -> dict[str, Any]:
        if method == "auth.test":
            return {"ok": True, "url": self.url, "team": "Test", "user": "personabot", "team_id": team,
                    "user_id": BOT_USER, "bot_id": "BBOT"}
        if method in ("chat.postMessage", "chat.startStream"):
            if method == "chat.startStream" and not self.streaming:
                return {"ok": False, "error": "unknown_method"}
            p["_ts"] = f"{1700000000 + next(self._ts)}.000100"
            return {"ok": True, "channel": p["channel"], "ts": p["_ts"], "message": {"text": p.get("text", "")}}
        if method in ("chat.update", "chat.appendStream", "chat.stopStream"):
            return {"ok": True, "channel": p["channel"], "ts": p["ts"]}
        if method in ("assistant.threads.setStatus", "assistant.threads.setTitle",
                      "assistant.threads.setSuggestedPrompts"):
            return {"ok": True}
        if method == "views.open":  # slack_sdk sends the view as a JSON object; other clients as a string
            view = p["view"] if isinstance(p["view"], dict) else json.loads(p["view"])
            return {"ok": True, "view": {"id": f"V{next(self._ts)}", **view}}
        if method == "chat.postEphemeral":
            return {"ok": True, "message_ts": f"{1700000000 + next(self._ts)}.000200"}
        if method == "users.info":
            user = p["user"]
            return {"ok": True, "user": {"id": user, "name": user.lower(), "is_admin": user in self.admins,
                                         "is_owner": False, "is_primary_owner": False}}
        if method == "files.info":
            if p["file"] not in self.files:
                return {"ok": False, "error": "file_not_found"}
            return {"ok": True, "file": self.file_object(p["file"])}
        return {"ok": False, "error": "unknown_method"}

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        """Slack's Socket Mode end: says hello, then relays envelopes pushed by the test and collects acks."""
        socket = web.WebSocketResponse(autoping=True)
        await socket.prepare(request)
        self.socket = socket
        await socket.send_json({"type": "hello", "num_connections": 1, "debug_info": {"host": "test"}})
        self.socket_connected.set()
        async for message in socket:
            if message.type == aiohttp.WSMsgType.TEXT:
                self.socket_acks.append(json.loads(message.data))
        return socket

    async def push(self, kind: str, payload: dict[str, Any]) -> str:
        """Deliver an envelope over Socket Mode, as Slack does; returns its envelope id."""
        assert self.socket is not None, "no Socket Mode connection"
        envelope_id = f"env-{next(self._ts)}"
        await self.socket.send_json({"envelope_id": envelope_id, "type": kind, "payload": payload,
                                     "accepts_response_payload": kind != "events_api", "retry_attempt": 0})
        return envelope_id

    async def _respond(self, request: web.Request) -> web.Response:
        self.calls.append(Call(f"respond/{request.match_info['name']}", await request.json()))
        return web.Response(text="ok")

    # -- OAuth: Slack's authorize page and the code exchange ------------------------------------------

    def uninstall(self, team: str) -> None:
        """The workspace removed the app: Slack revokes its tokens (and then sends app_uninstalled)."""
        self.tokens = {token: owner for token, owner in self.tokens.items() if owner != team}

    async def _authorize(self, request: web.Request) -> web.Response:
        """An admin of `team` (default TEAM) approves the install: back to the app's redirect URL with a code."""
        query = request.query
        self.calls.append(Call("oauth/authorize", dict(query)))
        if query.get("client_id") != CLIENT_ID:
            return web.Response(status=400, text="invalid_client_id")
        code = f"code-{next(self._ts)}"
        self._codes[code] = {"team": query.get("team") or TEAM, "scope": query.get("scope", ""),
                             "redirect_uri": query.get("redirect_uri", "")}
        back = query.get("redirect_uri") or self.redirect_url
        raise web.HTTPFound(f"{back}?{urlencode({'code': code, 'state': query.get('state', '')})}")

    def _exchange(self, request: web.Request, params: dict[str, Any]) -> dict[str, Any]:
        """oauth.v2.access: the app's credentials (HTTP Basic, as slack_sdk sends them, or form fields) and a
        code used at most once give the workspace's new bot token."""
        credentials = (params.get("client_id"), params.get("client_secret"))
        if (basic := request.headers.get("Authorization", "")).startswith("Basic "):
            credentials = tuple(base64.b64decode(basic.removeprefix("Basic ")).decode().split(":", 1))
        if credentials != (CLIENT_ID, CLIENT_SECRET):
            return {"ok": False, "error": "invalid_client_id"}
        if params.get("grant_type") == "refresh_token":
            return self._refresh(params.get("refresh_token", ""))
        grant = self._codes.pop(params.get("code", ""), None)
        if grant is None:
            return {"ok": False, "error": "invalid_code"}
        if grant["redirect_uri"] and params.get("redirect_uri") != grant["redirect_uri"]:
            return {"ok": False, "error": "bad_redirect_uri"}
        token = f"xoxb-{grant['team']}-{next(self._ts)}"
        self.tokens[token] = grant["team"]
        expiring = self._expiring(grant["team"], 3600) if self.rotation else {}
        return {"ok": True, "app_id": "A1", "authed_user": {"id": "UINSTALLER"}, "scope": grant["scope"],
                "token_type": "bot", "access_token": token, "bot_user_id": BOT_USER,
                "team": {"id": grant["team"], "name": f"Team {grant['team']}"}, "enterprise": None,
                "is_enterprise_install": False, **expiring}

    def _expiring(self, team: str, seconds: int) -> dict[str, Any]:
        refresh = f"xoxe-1-{team}-{next(self._ts)}"
        self.refresh_tokens[refresh] = team
        return {"refresh_token": refresh, "expires_in": seconds}

    def _refresh(self, refresh_token: str) -> dict[str, Any]:
        """oauth.v2.access with grant_type=refresh_token: a new token good for 12 hours and a new refresh token;
        the used refresh token is spent, and (stricter than Slack, which lets it run out) the old token dies."""
        team = self.refresh_tokens.pop(refresh_token, None)
        if team is None:
            return {"ok": False, "error": "invalid_refresh_token"}
        self.exchanges.append(team)
        self.tokens = {token: owner for token, owner in self.tokens.items() if owner != team}
        token = f"xoxe.xoxb-{team}-{next(self._ts)}"
        self.tokens[token] = team
        return {"ok": True, "app_id": "A1", "token_type": "bot", "access_token": token, "scope": "chat:write",
                "bot_user_id": BOT_USER, "team": {"id": team, "name": f"Team {team}"}, "enterprise": None,
                "is_enterprise_install": False, **self._expiring(team, 43200)}

    def share(self, file_id: str, name: str, data: bytes, *, mimetype: str = "", team: str = TEAM,
              endless: bool = False) -> dict[str, Any]:
        """A file someone shared in `team`: what Slack puts in the message event's `files`. An `endless` one
        declares no size and its download repeats `data` for as long as the client keeps reading."""
        self.files[file_id] = (name, data)
        self.file_types[file_id] = mimetype
        self.file_teams[file_id] = team
        if endless:
            self.endless.add(file_id)
        return self.file_object(file_id)

    def file_object(self, file_id: str) -> dict[str, Any]:
        name, data = self.files[file_id]
        url = f"{self.url}files/{file_id}"
        return {"id": file_id, "name": name, "title": name, "mimetype": self.file_types.get(file_id, ""),
                "size": 0 if file_id in self.endless else len(data), "url_private": url, "url_private_download": f"{url}?download=1"}

    async def _file(self, request: web.Request) -> web.Response:
        """A file's bytes, to its workspace's bot token only; anything else gets Slack's sign-in page."""
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        file_id = request.match_info["file_id"]
        self.download_tokens.append(token)
        owner = self.file_teams.get(file_id)
        if token not in self.tokens or (owner is not None and self.tokens[token] != owner):
            return web.Response(text="<html>sign in</html>", content_type="text/html")
        self.downloads.append(file_id)
        if file_id in self.endless:
            return await self._endless(request, file_id)
        return web.Response(body=self.files[file_id][1], content_type="application/octet-stream")

    async def _endless(self, request: web.Request, file_id: str) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        await response.prepare(request)
        self.bytes_sent[file_id] = 0
        try:
            while True:
                await response.write(self.files[file_id][1])
                self.bytes_sent[file_id] += len(self.files[file_id][1])
        except (ConnectionResetError, asyncio.CancelledError):  # the bot hung up
            pass
        return response


def _markdown(params: dict[str, Any]) -> str:
    text = params.get("markdown_text", "")
    chunks = params.get("chunks") or []
    if isinstance(chunks, str):
        chunks = json.loads(chunks)
    return text + "".join(c.get("text", "") for c in chunks if c.get("type") == "markdown_text")


def sign(body: str, timestamp: int, secret: str = SIGNING_SECRET) -> str:
    base = f"v0:{timestamp}:{body}".encode()
    return "v0=" + hmac.new(secret.encode(), base, hashlib.sha256).hexdigest()


class SlackApp:
    """Sends what Slack sends to the bot's request URL: signed slash commands and Events API callbacks."""

    def __init__(self, url: str, session: aiohttp.ClientSession, secret: str = SIGNING_SECRET):
        self.url = url
        self.session = session
        self.secret = secret
        self._ids = itertools.count(1)

    async def post(self, body: str, content_type: str, *, timestamp: int | None = None,
                   signature: str | None = None, headers: dict[str, str] | None = None) -> aiohttp.ClientResponse:
        timestamp = int(time.time()) if timestamp is None else timestamp
        sent = {
            "Content-Type": content_type,
            "X-Slack-Request-Timestamp": str(timestamp),
            "X-Slack-Signature": signature or sign(body, timestamp, self.secret),
            **(headers or {}),
        }
        async with self.session.post(self.url, data=body.encode(), headers=sent) as response:
            # What the bot acked with, kept for after the connection is released: empty, a text or JSON such as
            # a form's `{"response_action": "errors", ...}`.
            raw = await response.read()
            response.acked = json.loads(raw) if response.content_type == "application/json" and raw else raw.decode()
            return response

    def command_body(self, command: str, text: str, *, user: str = "U1", channel: str = "C1",
                     response_url: str = "", team: str = TEAM) -> str:
        return urlencode({
            "token": "verification-token-unused", "team_id": team, "team_domain": "test",
            "channel_id": channel, "channel_name": "general", "user_id": user, "user_name": user.lower(),
            "command": command, "text": text, "api_app_id": "A1", "response_url": response_url,
            "trigger_id": f"trigger-{next(self._ids)}",
        })

    async def command(self, command: str, text: str, **kwargs) -> aiohttp.ClientResponse:
        return await self.post(self.command_body(command, text, **kwargs), "application/x-www-form-urlencoded")

    def event_body(self, event: dict[str, Any], *, event_id: str | None = None, team: str = TEAM) -> str:
        return json.dumps({
            "token": "verification-token-unused", "team_id": team, "api_app_id": "A1", "type": "event_callback",
            "event": event, "event_id": event_id or f"Ev{next(self._ids):08d}", "event_time": int(time.time()),
            "authorizations": [{"team_id": team, "user_id": BOT_USER, "is_bot": True}],
        })

    async def event(self, event: dict[str, Any], *, event_id: str | None = None,
                    headers: dict[str, str] | None = None, team: str = TEAM) -> aiohttp.ClientResponse:
        return await self.post(self.event_body(event, event_id=event_id, team=team), "application/json",
                               headers=headers)

    def view_submission_body(self, view: dict[str, Any], values: dict[str, str], *, user: str = "U1",
                             team: str = TEAM) -> str:
        """What Slack posts when someone presses Save on a modal the app opened: `values` by block id, the
        rest of the fields as the modal showed them."""
        state = {"values": {block["block_id"]: {"value": {"type": "plain_text_input", "value": values.get(
            block["block_id"], block["element"].get("initial_value"))}} for block in view["blocks"]}}
        payload = {"type": "view_submission", "team": {"id": team, "domain": "test"},
                   "user": {"id": user, "team_id": team}, "api_app_id": "A1", "trigger_id": "trigger-view",
                   "view": {**view, "id": "V1", "team_id": team, "state": state}}
        return urlencode({"payload": json.dumps(payload)})

    async def submit_view(self, view: dict[str, Any], values: dict[str, str], *, user: str = "U1",
                          team: str = TEAM, timestamp: int | None = None,
                          signature: str | None = None) -> aiohttp.ClientResponse:
        """The signed `view_submission`; `timestamp` and `signature` forge or replay it."""
        return await self.post(self.view_submission_body(view, values, user=user, team=team),
                               "application/x-www-form-urlencoded", timestamp=timestamp, signature=signature)


def slack_settings(tmp_path: Path, personas: dict[str, str], model_url: str, api: FakeSlackApi, **extra: Any):
    """Settings for a bot that talks to this fake Slack and the local model server, with `personas` (name →
    YAML) written to its own folder."""
    from bot.config import Settings

    folder = tmp_path / "personas"
    folder.mkdir(exist_ok=True)
    for name, text in personas.items():
        (folder / f"{name}.yaml").write_text(text)
    return Settings(
        _env_file=None, PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=folder,
        PERSONABOT_BACKEND="openai", OPENAI_BASE_URL=model_url, OPENAI_API_KEY="sk-test",
        **{"SLACK_BOT_TOKEN": BOT_TOKEN, "SLACK_SIGNING_SECRET": SIGNING_SECRET, "SLACK_API_URL": api.api_url,
           **extra},  # `extra` may override these (SLACK_BOT_TOKEN=None: tokens only from OAuth installs)
    )


@contextlib.asynccontextmanager
async def served(engine: Any, settings: Any) -> AsyncIterator[str]:
    """The bot's Slack web app (create_web_app over create_slack_app) on a free port of 127.0.0.1, as Slack
    and an installer's browser would reach it: its base URL, e.g. f"{url}/slack/events"."""
    from bot.platforms.slack_http import create_slack_app, create_web_app

    runner = web.AppRunner(create_web_app(create_slack_app(engine, settings)))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()
