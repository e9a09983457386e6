"""One deployment, many Slack workspaces: bolt's OAuth install flow with SLACK_CLIENT_ID / SLACK_CLIENT_SECRET.

The real bolt app over HTTP on 127.0.0.1; the installer's browser is an aiohttp client that follows the
redirects by hand (carrying the state cookie as a browser would over https); Slack's authorize page, its
oauth.v2.access and every Web API call are the fake in tests/slack_api.py, which hands each workspace its own
token and records which token each call used. Installations live in the bot's SQLite file.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from dataclasses import dataclass
from urllib.parse import parse_qs, urlparse

import aiohttp
import pytest

from bot import logs
from bot.config import Settings
from bot.engine import Engine
from bot.platforms.slack_http import create_slack_app
from bot.platforms.slack_installs import SlackInstallations, SlackOAuthStates, manifest_scopes
from openai_server import OpenAIServer, openai_server  # noqa: F401  (fixture)
from slack_api import BOT_USER, CLIENT_ID, CLIENT_SECRET, FakeSlackApi, SlackApp, served, slack_settings

T1, T2 = "T1", "T2"
ADMIN1, ADMIN2 = "UADMIN1", "UADMIN2"
COOKIE = "slack-app-oauth-state"  # bolt's state cookie
PERSONAS = {"assistant": "name: assistant\nsystem: You are a helpful assistant.\n"}
OAUTH_ONLY = ("oauth/authorize", "oauth.v2.access")  # calls that speak for no workspace yet


@dataclass
class Rig:
    slack: SlackApp
    api: FakeSlackApi
    model: OpenAIServer
    engine: Engine
    url: str
    browser: aiohttp.ClientSession


@pytest.fixture
async def api():
    async with FakeSlackApi(admins={ADMIN1, ADMIN2}) as api:
        yield api


@pytest.fixture
def config(tmp_path, settings, openai_server, api, store_url) -> Settings:  # `settings` clears the host's env
    # No SLACK_BOT_TOKEN: every token comes from an install. Installs live in SQLite, then in PostgreSQL.
    database = {"DATABASE_URL": store_url} if store_url else {}
    return slack_settings(tmp_path, PERSONAS, openai_server.base_url, api, SLACK_BOT_TOKEN=None,
                          SLACK_CLIENT_ID=CLIENT_ID, SLACK_CLIENT_SECRET=CLIENT_SECRET, **database)


async def serve(config: Settings, api: FakeSlackApi, model: OpenAIServer):
    engine = await Engine.create(config, knowledge=False)
    try:
        async with served(engine, config) as url, aiohttp.ClientSession() as session:
            api.redirect_url = f"{url}/slack/oauth_redirect"  # the Redirect URL the app's settings would list
            yield Rig(SlackApp(f"{url}/slack/events", session), api, model, engine, url, session)
    finally:
        await engine.close()


@pytest.fixture
async def rig(config, api, openai_server):
    async for rig in serve(config, api, openai_server):
        yield rig


# -- the installer's browser ----------------------------------------------------------------------------------

async def start_install(rig: Rig, team: str) -> tuple[str, str]:
    """GET /slack/install: Slack's authorize URL it redirects to, and the state cookie it set."""
    async with rig.browser.get(f"{rig.url}/slack/install", params={"team": team}, allow_redirects=False) as r:
        assert r.status == 302
        return r.headers["Location"], r.cookies[COOKIE].value


async def approve(rig: Rig, authorize_url: str) -> str:
    """The admin presses Allow on Slack's page: the redirect back to the app, with a code and the state."""
    async with rig.browser.get(authorize_url, allow_redirects=False) as r:
        assert r.status == 302
        return r.headers["Location"]


async def come_back(rig: Rig, redirect: str, cookie: str | None) -> int:
    """GET /slack/oauth_redirect?code=…&state=… from the browser that started the install."""
    headers = {"Cookie": f"{COOKIE}={cookie}"} if cookie else {}
    async with rig.browser.get(redirect, headers=headers, allow_redirects=False) as r:
        await r.read()
        return r.status


async def install(rig: Rig, team: str) -> str:
    """The whole install of the app in `team`; the bot token Slack gave that workspace."""
    authorize_url, cookie = await start_install(rig, team)
    assert await come_back(rig, await approve(rig, authorize_url), cookie) == 200
    bot = await SlackInstallations(rig.engine.history).async_find_bot(enterprise_id=None, team_id=team)
    assert bot is not None and rig.api.tokens[bot.bot_token] == team
    return bot.bot_token


_stamps = itertools.count(1)


async def mention(rig: Rig, team: str, channel: str, text: str = "hello") -> str:
    ts = f"1700000{next(_stamps):03d}.000100"
    await rig.slack.event({"type": "app_mention", "user": "U1", "text": f"<@{BOT_USER}> {text}", "ts": ts,
                           "channel": channel, "event_ts": ts}, team=team)
    return ts


async def answered(rig: Rig, channel: str, ts: str, text: str = "hello") -> bool:
    """Whether the thread got the model's whole answer (it echoes the question)."""
    return bool(await rig.api.wait_for(lambda: f"echo: {text}" in rig.api.thread_text(channel, ts)))


def workspace_calls(rig: Rig, since: int = 0) -> list:
    return [c for c in rig.api.calls[since:] if c.method not in OAUTH_ONLY]


def channel_of(call) -> str | None:
    """The channel a Web API call acts in: its `channel`, or for a modal the channel it was opened from."""
    if "view" in call.params:
        view = call.params["view"] if isinstance(call.params["view"], dict) else json.loads(call.params["view"])
        return json.loads(view["private_metadata"])["channel"]
    return call.params.get("channel")


async def eventually(check, timeout: float = 10.0) -> None:
    """Wait for an async condition: the revocation listeners run after the event is acked."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "gave up waiting"
        await asyncio.sleep(0.02)


# -- the install flow -----------------------------------------------------------------------------------------

async def test_install_redirects_to_slacks_authorize_page_with_the_manifests_scopes(rig):
    authorize_url, cookie = await start_install(rig, T1)

    url = urlparse(authorize_url)
    query = {name: values[0] for name, values in parse_qs(url.query).items()}
    assert f"{url.scheme}://{url.netloc}{url.path}" == f"{rig.api.url}oauth/v2/authorize"
    assert query["client_id"] == CLIENT_ID and query["team"] == T1
    assert query["scope"].split(",") == manifest_scopes()
    assert query["state"] == cookie and len(cookie) >= 32


async def test_install_stores_the_workspace_and_its_own_token(rig):
    token = await install(rig, T1)

    exchanges = rig.api.calls_to("oauth.v2.access")
    assert len(exchanges) == 1 and exchanges[0].params["code"].startswith("code-")
    # bolt checks the new token once (auth.test) to learn its bot id; no other call is made yet.
    assert [(c.method, c.token) for c in workspace_calls(rig)] == [("auth.test", token)]
    found = await SlackInstallations(rig.engine.history).async_find_installation(enterprise_id=None, team_id=T1)
    assert found.team_id == T1 and found.bot_token == token and found.bot_user_id == BOT_USER


async def test_redirect_url_is_under_the_public_url(config, api, openai_server):
    config = config.model_copy(update={"public_url": "https://bot.example.com/"})
    async for rig in serve(config, api, openai_server):
        authorize_url, _ = await start_install(rig, T1)
        redirect_uri = parse_qs(urlparse(authorize_url).query)["redirect_uri"]
        assert redirect_uri == ["https://bot.example.com/slack/oauth_redirect"]


async def test_forged_state_is_refused_and_stores_nothing(rig):
    authorize_url, _ = await start_install(rig, T1)
    redirect = await approve(rig, authorize_url.replace("state=", "state=forged"))
    forged = parse_qs(urlparse(redirect).query)["state"][0]

    assert await come_back(rig, redirect, forged) == 401  # cookie and query agree, but the bot never issued it
    assert rig.api.calls_to("oauth.v2.access") == []
    assert await rig.engine.history.fetch("SELECT count(*) FROM slack_bots") == [(0,)]


async def test_state_from_another_browser_is_refused(rig):
    authorize_url, _ = await start_install(rig, T1)

    assert await come_back(rig, await approve(rig, authorize_url), cookie=None) == 400
    assert rig.api.calls_to("oauth.v2.access") == []


async def test_replayed_state_is_refused(rig):
    authorize_url, cookie = await start_install(rig, T1)
    assert await come_back(rig, await approve(rig, authorize_url), cookie) == 200

    # The same state once more (a captured redirect, or a second code obtained with it): used up.
    assert await come_back(rig, await approve(rig, authorize_url.replace(f"team={T1}", f"team={T2}")), cookie) == 401
    assert len(rig.api.calls_to("oauth.v2.access")) == 1
    assert await SlackInstallations(rig.engine.history).async_find_bot(enterprise_id=None, team_id=T2) is None


async def test_state_expires(rig):
    now = [1_000_000.0]
    states = SlackOAuthStates(rig.engine.history, expiration_seconds=600, clock=lambda: now[0])
    kept, late = await states.async_issue(), await states.async_issue()

    assert await states.async_consume(kept)
    now[0] += 601
    assert not await states.async_consume(late)
    assert not await states.async_consume(kept)


# -- per-workspace tokens ---------------------------------------------------------------------------------------

async def test_each_workspace_is_answered_with_its_own_token(rig):
    tokens = {T1: await install(rig, T1), T2: await install(rig, T2)}
    since = len(rig.api.calls)

    one, two = await mention(rig, T1, "C1"), await mention(rig, T2, "C2")
    assert await answered(rig, "C1", one)
    assert await answered(rig, "C2", two)
    # Slash commands too: users.info for the admin check, views.open for the persona form.
    for team, admin, channel in ((T1, ADMIN1, "C1"), (T2, ADMIN2, "C2")):
        await rig.slack.command("/persona", "create pirate", team=team, user=admin, channel=channel,
                                response_url=rig.api.response_url(team))
    await rig.api.wait_for(lambda: len(rig.api.calls_to("views.open")) == 2)

    calls = workspace_calls(rig, since)
    assert {c.method for c in calls} >= {"auth.test", "chat.startStream", "chat.appendStream", "chat.stopStream",
                                         "users.info", "views.open"}
    owner = {"C1": T1, "C2": T2, ADMIN1: T1, ADMIN2: T2}
    for call in calls:
        if call.method != "auth.test":  # bolt's authorize step checks the token it found; no channel involved
            assert call.token == tokens[owner[channel_of(call) or call.params["user"]]], call.method
    # bolt's authorize step asks auth.test once per workspace and keeps the answer for that token.
    assert sorted(c.token for c in calls if c.method == "auth.test") == sorted(tokens.values())


@pytest.mark.parametrize("event", [
    {"type": "app_uninstalled"},
    {"type": "tokens_revoked", "tokens": {"bot": [BOT_USER]}},
])
async def test_removed_workspace_is_no_longer_answered(rig, event):
    await install(rig, T1)
    removed_token = await install(rig, T2)
    assert await answered(rig, "C2", await mention(rig, T2, "C2"))

    rig.api.uninstall(T2)
    response = await rig.slack.event(event, team=T2)
    assert response.status == 200

    async def removed() -> bool:  # uninstalled: all of T2 goes; revoked: its bot (the installer's record stays)
        bots = await rig.engine.history.fetch("SELECT team_id FROM slack_bots")
        installs = await rig.engine.history.fetch("SELECT 1 FROM slack_installations WHERE team_id = ?", (T2,))
        return bots == [(T1,)] and (event["type"] == "tokens_revoked" or installs == [])

    await eventually(removed)
    left = await SlackInstallations(rig.engine.history).async_find_installation(enterprise_id=None, team_id=T2)
    assert left is None or left.bot_token is None
    since = len(rig.api.calls)

    gone = await mention(rig, T2, "C2", "anyone there?")
    assert await answered(rig, "C1", await mention(rig, T1, "C1"))  # T1 still is
    assert rig.api.thread_text("C2", gone) == ""
    assert [c.method for c in workspace_calls(rig, since) if c.token == removed_token or channel_of(c) == "C2"] == []


async def test_installations_survive_a_restart(config, api, openai_server):
    async for rig in serve(config, api, openai_server):
        token = await install(rig, T1)
    api.calls.clear()

    async for rig in serve(config, api, openai_server):  # a new process on the same database
        assert await answered(rig, "C1", await mention(rig, T1, "C1"))
        assert {c.token for c in workspace_calls(rig)} == {token}


async def test_one_bot_token_has_no_install_page_and_survives_an_uninstall(tmp_path, settings, openai_server, api,
                                                                            caplog):
    config = slack_settings(tmp_path, PERSONAS, openai_server.base_url, api)  # SLACK_BOT_TOKEN, as before
    async for rig in serve(config, api, openai_server):
        async with rig.browser.get(f"{rig.url}/slack/install", allow_redirects=False) as r:
            assert r.status == 404
        response = await rig.slack.event({"type": "app_uninstalled"})
        assert response.status == 200  # acked, so Slack does not retry it
        assert await rig.api.wait_for(lambda: "SLACK_BOT_TOKEN no longer works" in caplog.text)


async def test_tokens_stay_out_of_the_logs_even_at_debug(rig):
    root, saved = logging.getLogger(), logging.getLogger().handlers[:]
    levels = {name: logging.getLogger(name).level for name in ("", "slack_sdk", "slack_bolt", "bot")}
    lines: list[str] = []
    capture = logging.Handler()
    capture.emit = lambda record: lines.append(record.getMessage())
    logs.configure("DEBUG")  # what PERSONABOT_LOG_LEVEL=DEBUG does
    root.addHandler(capture)
    try:
        token = await install(rig, T1)
        assert await answered(rig, "C1", await mention(rig, T1, "C1"))
    finally:
        root.handlers[:] = saved
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
    assert any("installed in team T1" in line for line in lines)  # the logging did run
    assert not [line for line in lines if token in line or CLIENT_SECRET in line]


async def test_install_started_on_one_process_completes_on_another_once(config, api, openai_server):
    """Behind a load balancer the install page and the redirect may reach different processes; a state
    sent back to both at once is used once."""
    first, second = serve(config, api, openai_server), serve(config, api, openai_server)
    one, two = await anext(first), await anext(second)
    try:
        authorize_url, cookie = await start_install(one, T1)
        redirect = await approve(one, authorize_url)
        query = redirect.split("?", 1)[1]
        statuses = await asyncio.gather(come_back(one, f"{one.url}/slack/oauth_redirect?{query}", cookie),
                                        come_back(two, f"{two.url}/slack/oauth_redirect?{query}", cookie))
        assert sorted(statuses) == [200, 401]
        assert await SlackInstallations(two.engine.history).async_find_bot(enterprise_id=None, team_id=T1)
    finally:
        for rig in (first, second):
            await rig.aclose()


# -- token rotation: an expiring token is exchanged once, whoever asks -----------------------------------------


async def test_with_token_rotation_an_expiring_token_is_exchanged_once_for_messages_arriving_together(rig):
    rig.api.rotation = True
    first = await install(rig, T1)
    since = len(rig.api.calls)

    asked = await asyncio.gather(*(mention(rig, T1, "C1", f"question {n}") for n in range(4)))

    for n, ts in enumerate(asked):
        assert await answered(rig, "C1", ts, f"question {n}")
    assert rig.api.exchanges == [T1]  # one refresh token spent; a second exchange would have lost its message
    bot = await SlackInstallations(rig.engine.history).async_find_bot(enterprise_id=None, team_id=T1)
    assert bot.bot_token != first and rig.api.tokens[bot.bot_token] == T1
    assert bot.bot_token_expires_at > time.time() + 11 * 3600
    assert {c.token for c in workspace_calls(rig, since)} == {bot.bot_token}


async def test_with_token_rotation_two_processes_exchange_an_expiring_token_once(config, api, openai_server):
    api.rotation = True
    first, second = serve(config, api, openai_server), serve(config, api, openai_server)
    one, two = await anext(first), await anext(second)
    try:
        await install(one, T1)
        asked = await asyncio.gather(mention(one, T1, "C1", "from one"), mention(two, T1, "C2", "from two"))

        assert await answered(one, "C1", asked[0], "from one") and await answered(two, "C2", asked[1], "from two")
        assert api.exchanges == [T1]
    finally:
        for rig in (first, second):
            await rig.aclose()


async def test_a_refused_token_exchange_says_to_reinstall_and_leaves_other_workspaces_answered(rig, caplog):
    rig.api.rotation = True
    await install(rig, T1)
    await install(rig, T2)
    rig.api.refresh_tokens = {r: team for r, team in rig.api.refresh_tokens.items() if team != T2}  # revoked

    lost = await mention(rig, T2, "C2", "anyone there?")
    assert await answered(rig, "C1", await mention(rig, T1, "C1"))

    async def told_to_reinstall() -> bool:
        return "could not be exchanged (invalid_refresh_token); reinstall the app in team T2" in caplog.text

    await eventually(told_to_reinstall)

    assert rig.api.thread_text("C2", lost) == ""
    assert rig.api.exchanges == [T1]


def test_half_the_client_credentials_or_socket_mode_is_a_clear_error(config):
    from bot.platforms.slack_http import SlackConfigError, slack_configured

    assert slack_configured(config)  # client id and secret with a signing secret are enough to start Slack
    with pytest.raises(SlackConfigError, match="SLACK_CLIENT_SECRET"):
        create_slack_app(None, config.model_copy(update={"slack_client_secret": None}))
    with pytest.raises(SlackConfigError, match="SLACK_APP_TOKEN"):
        create_slack_app(None, config.model_copy(update={"slack_app_token": "xapp-1"}))
