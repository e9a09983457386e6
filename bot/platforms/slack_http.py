"""Slack over HTTP: the bolt app, and the aiohttp server in front of it (`POST /slack/events`, health,
metrics, persona avatars), or Socket Mode.

Every request's signature and timestamp are checked over the raw body in the route before bolt parses it (a
forged body must cost a 401, not a parser error), a signed request seen before is refused there
(slack_replay.py), and bolt's own verification checks again. The listeners themselves are in slack_bot.py.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.app.async_app import AsyncApp
from slack_bolt.authorization.async_authorize import AsyncInstallationStoreAuthorize
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from bot import metrics
from bot.config import Settings
from bot.personas import read_avatar
from bot.platforms.slack_bot import SlackBot
from bot.platforms.slack_replay import ReplayGuard

if TYPE_CHECKING:
    from bot.engine import Engine

log = logging.getLogger(__name__)

SLACK_API_URL = "https://slack.com/api/"


class SlackConfigError(ValueError):
    """Slack credentials that cannot start either mode; the message names the missing variable."""


def slack_configured(settings: Settings) -> bool:
    """Whether `personabot run` should start Slack at all."""
    token = settings.slack_bot_token or oauth_configured(settings)
    return bool(token and (settings.slack_app_token or settings.slack_signing_secret))


def oauth_configured(settings: Settings) -> bool:
    """SLACK_CLIENT_ID and SLACK_CLIENT_SECRET: installs through OAuth, a token per workspace, no SLACK_BOT_TOKEN."""
    return bool(settings.slack_client_id and settings.slack_client_secret)


def _web_client(settings: Settings, *, token: str | None) -> AsyncWebClient:
    base_url = settings.slack_api_url or SLACK_API_URL
    return AsyncWebClient(
        token=token,
        base_url=base_url if base_url.endswith("/") else base_url + "/",
        retry_handlers=[AsyncRateLimitErrorRetryHandler(max_retry_count=2)],
    )


class PersonabotApp(AsyncApp):
    """bolt's app, carrying the settings its HTTP route (`create_web_app`) checks requests with before bolt."""

    def __init__(self, settings: Settings, history: Any = None, **kwargs: Any):
        super().__init__(signing_secret=settings.slack_signing_secret or "", **kwargs)
        self.settings = settings
        self.history = history  # the engine's store: on PostgreSQL, replayed requests are recorded through it


def create_slack_app(engine: "Engine", settings: Settings) -> PersonabotApp:
    """The bolt app with every listener registered; serve it with `create_web_app` or Socket Mode.

    With SLACK_CLIENT_ID and SLACK_CLIENT_SECRET, workspaces install the app through bolt's OAuth flow and
    bolt's authorize step gives each request's client that workspace's token (slack_installs.py); otherwise
    every request uses SLACK_BOT_TOKEN."""
    if settings.slack_client_id or settings.slack_client_secret:
        return _create_oauth_app(engine, settings)
    if not settings.slack_bot_token:
        raise SlackConfigError("SLACK_BOT_TOKEN is not set (the bot token, xoxb-…, from the app's OAuth page), "
                               "nor SLACK_CLIENT_ID and SLACK_CLIENT_SECRET (to install in many workspaces).")
    if not (settings.slack_signing_secret or settings.slack_app_token):
        raise SlackConfigError(
            "Set SLACK_SIGNING_SECRET to receive events over HTTP, or SLACK_APP_TOKEN (xapp-…) for Socket Mode."
        )
    app = PersonabotApp(
        settings,
        history=engine.history,
        client=_web_client(settings, token=settings.slack_bot_token),
        process_before_response=False,  # ack goes back at once; the listener keeps running after it
    )
    app.event("tokens_revoked")(_warn_single_token_gone)
    app.event("app_uninstalled")(_warn_single_token_gone)
    SlackBot(engine).register(app)
    return app


async def _warn_single_token_gone(event: dict, body: dict) -> None:
    """With one SLACK_BOT_TOKEN there is nothing to remove, but the operator should hear the token died."""
    log.warning("Slack: %s for team %s; SLACK_BOT_TOKEN no longer works there", event.get("type"),
                body.get("team_id"))


def _create_oauth_app(engine: "Engine", settings: Settings) -> PersonabotApp:
    from bot.platforms.slack_installs import oauth_settings

    for name, value in (("SLACK_CLIENT_ID", settings.slack_client_id),
                        ("SLACK_CLIENT_SECRET", settings.slack_client_secret),
                        ("SLACK_SIGNING_SECRET", settings.slack_signing_secret)):
        if not value:
            raise SlackConfigError(f"{name} is not set: installing in many workspaces needs SLACK_CLIENT_ID, "
                                   "SLACK_CLIENT_SECRET and SLACK_SIGNING_SECRET (the app's Basic Information).")
    if settings.slack_app_token:
        raise SlackConfigError("SLACK_APP_TOKEN (Socket Mode) and SLACK_CLIENT_ID do not go together here: "
                               "installs in many workspaces are served over HTTP; unset SLACK_APP_TOKEN.")
    if settings.slack_bot_token:
        log.info("Slack: SLACK_CLIENT_ID is set, so SLACK_BOT_TOKEN is not used; workspaces install via "
                 "/slack/install")
    client = _web_client(settings, token=None)  # each request's client gets its workspace's token
    oauth = oauth_settings(settings, engine.history, client)
    app = PersonabotApp(
        settings,
        history=engine.history,
        client=client,
        oauth_settings=oauth,
        # bolt's own authorize step, with auth.test's answer kept per token: one auth.test per workspace per
        # process, not one per request. A workspace removed from the store is refused before the cache is read.
        authorize=AsyncInstallationStoreAuthorize(
            logger=log, installation_store=oauth.installation_store, client_id=oauth.client_id,
            client_secret=oauth.client_secret, cache_enabled=True, client=client,
        ),
        process_before_response=False,
    )
    app.enable_token_revocation_listeners()  # tokens_revoked, app_uninstalled: that workspace's rows go
    SlackBot(engine).register(app)
    return app


def create_web_app(slack_app: PersonabotApp | None, *, metrics_token: str | None = None,
                   personas_dir: Path | None = None) -> web.Application:
    """`GET /healthz` and `GET /metrics` for the host, and `POST /slack/events` (events and slash commands)
    when Slack talks over HTTP. In Socket Mode there is no signing secret, so that route is left out. With a
    `metrics_token`, /metrics answers only `Authorization: Bearer <token>`. `GET /avatars/NAME` serves the
    persona avatar files in `personas_dir` (default: the Slack app's), which Slack and Discord fetch."""
    if personas_dir is None and slack_app is not None:
        personas_dir = slack_app.settings.personas_dir

    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def metrics_text(request: web.Request) -> web.Response:
        if metrics_token and not _bearer_is(request, metrics_token):
            return web.Response(status=401, headers={"WWW-Authenticate": "Bearer"})
        body, content_type = metrics.exposition()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def avatar(request: web.Request) -> web.Response:
        found = read_avatar(personas_dir, request.match_info["file"]) if personas_dir is not None else None
        if found is None:
            return web.Response(status=404)
        data, content_type = found
        return web.Response(body=data, content_type=content_type, headers={"Cache-Control": "max-age=3600"})

    app = web.Application()
    app.add_routes([web.get("/healthz", healthz), web.get("/metrics", metrics_text),
                    web.get("/avatars/{file}", avatar)])
    if slack_app is not None:
        app.add_routes([web.post("/slack/events", _events_route(slack_app, app))])
        if (flow := slack_app.oauth_flow) is not None:
            app.add_routes([web.get(flow.install_path, _oauth_route(flow.handle_installation)),
                            web.get(flow.redirect_uri_path, _oauth_route(flow.handle_callback))])
    return app


def _oauth_route(handle):
    """`GET /slack/install` and `GET /slack/oauth_redirect`: bolt's OAuth flow, as its own aiohttp server runs
    it (the state cookie and the single-use state are checked there)."""

    async def route(request: web.Request) -> web.Response:
        return await to_aiohttp_response(await handle(await to_bolt_request(request)))

    return route


def _events_route(slack_app: PersonabotApp, web_app: web.Application):
    """`POST /slack/events`: signature first, over the raw bytes, then once per request, then bolt."""
    verifier = SignatureVerifier(slack_app.settings.slack_signing_secret or "")
    shared = slack_app.history is not None and slack_app.history.shared
    replays = ReplayGuard(store=slack_app.history) if shared else ReplayGuard(slack_app.settings.db_path)

    async def close_replays(_: web.Application) -> None:
        await replays.close()

    web_app.on_cleanup.append(close_replays)

    async def events(request: web.Request) -> web.Response:
        body = await request.read()
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        try:
            signed = verifier.is_valid(body, timestamp, signature)
        except (ValueError, TypeError):  # a timestamp that is no number, a body or signature that is no text
            signed = False
        if not signed:
            log.info("refused a Slack request with a missing, bad or stale signature")
            return web.Response(status=401)
        if not await replays.first_time(int(timestamp), signature):
            log.info("refused a replayed Slack request (timestamp %s)", timestamp)
            # An event's copy gets the empty 200 an event retry gets; a command or form copy is refused.
            return web.Response(status=200 if request.content_type == "application/json" else 401)
        return await to_aiohttp_response(await slack_app.async_dispatch(await to_bolt_request(request)))

    return events


def _bearer_is(request: web.Request, token: str) -> bool:
    """Constant-time, so the token cannot be guessed a character at a time from response times."""
    given = request.headers.get("Authorization", "").encode(errors="surrogateescape")
    return hmac.compare_digest(given, f"Bearer {token}".encode())


async def run_web(settings: Settings) -> None:
    """`GET /healthz`, `GET /metrics` and `GET /avatars/NAME` on `$PORT` without Slack, until cancelled.

    `personabot run` starts this when PERSONABOT_PUBLIC_URL is set and Slack is not running (Slack's own server
    serves the same routes): a Discord-only bot still needs somewhere Discord can fetch a persona's avatar file
    from, since a webhook's `avatar_url` is fetched by Discord, not uploaded."""
    runner = web.AppRunner(create_web_app(None, metrics_token=settings.metrics_token,
                                          personas_dir=settings.personas_dir), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.bind_address, settings.port).start()
    log.info("listening on %s port %d (GET /healthz, GET /metrics, GET /avatars/…), public address %s",
             settings.bind_address, settings.port, settings.public_url)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


async def run_slack(engine: "Engine", settings: Settings) -> None:
    """Serve Slack until cancelled: Socket Mode when SLACK_APP_TOKEN is set, else events over HTTP. Either
    way `$PORT` answers `/healthz` and `/metrics`, so the Procfile's web process is healthy in both modes."""
    slack_app = create_slack_app(engine, settings)
    socket_mode = bool(settings.slack_app_token)
    web_app = create_web_app(None if socket_mode else slack_app, metrics_token=settings.metrics_token,
                             personas_dir=settings.personas_dir)
    runner = web.AppRunner(web_app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, settings.bind_address, settings.port).start()
    routes = "GET /healthz, GET /metrics" if socket_mode else "POST /slack/events, GET /healthz, GET /metrics"
    if slack_app.oauth_flow is not None:
        routes += ", GET /slack/install, GET /slack/oauth_redirect"
    log.info("Slack: listening on %s port %d (%s)", settings.bind_address, settings.port, routes)
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
