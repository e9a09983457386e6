"""Slack installs in any number of workspaces: bolt's OAuth flow with its stores in the bot's own database.

With SLACK_CLIENT_ID and SLACK_CLIENT_SECRET set, `GET /slack/install` hands out a single-use `state` and sends
the installer to Slack's authorize page; Slack sends them back to `GET /slack/oauth_redirect` with a code,
which bolt exchanges (oauth.v2.access) for that workspace's bot token and saves here. bolt's authorize step
then finds each request's token by its team, so every listener's client speaks for the workspace the request
came from. The stores are plain rows reached through the history store's `execute` / `fetch` (portable SQL,
tables from migration m005), so every process serving the app shares them and a restart keeps them.

With token rotation turned on in the app's settings, a bot token expires after 12 hours and is exchanged for a
new one with a single-use refresh token. bolt would exchange it inside each request's authorize step, so two
requests or processes at once would spend the same refresh token and one of them would lose its event. Here
the store hands out only tokens that are good for a while: an expiring one is exchanged by whichever caller
claims the workspace's row in `slack_rotations`, and everyone else waits for the saved result (`_fresh`).

Tokens are secrets: nothing here logs a row, an installation or a bot.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urljoin

import yaml
from slack_bolt.oauth.async_oauth_settings import AsyncOAuthSettings
from slack_sdk.errors import SlackTokenRotationError
from slack_sdk.oauth.installation_store import Bot, Installation
from slack_sdk.oauth.installation_store.async_installation_store import AsyncInstallationStore
from slack_sdk.oauth.state_store.async_state_store import AsyncOAuthStateStore
from slack_sdk.oauth.token_rotation.async_rotator import AsyncTokenRotator
from slack_sdk.web.async_client import AsyncWebClient

from bot.config import Settings

log = logging.getLogger(__name__)

MANIFEST = Path(__file__).resolve().parents[2] / "slack-manifest.yml"
INSTALL_PATH = "/slack/install"
REDIRECT_PATH = "/slack/oauth_redirect"
STATE_SECONDS = 600  # an installer has ten minutes between /slack/install and approving on Slack
# The bot fields of an installation: kept only in slack_bots, so deleting the bot leaves no token behind.
_BOT_FIELDS = ("bot_token", "bot_id", "bot_user_id", "bot_scopes", "bot_refresh_token", "bot_token_expires_at")
# A token this close to expiring is exchanged before it is handed out: bolt's own margin, so that bolt, which
# checks again after the store, always finds it fresh and never spends the refresh token a second time.
ROTATE_MINUTES = 120
CLAIM_SECONDS = 30  # how long one caller may take to exchange a token before another may try


class Database(Protocol):
    """The two calls of the history store (SQLite or PostgreSQL) these stores need."""

    async def execute(self, sql: str, params: tuple = ()) -> int: ...

    async def fetch(self, sql: str, params: tuple = ()) -> list[tuple]: ...


def manifest_scopes(path: Path = MANIFEST) -> list[str]:
    """The bot scopes slack-manifest.yml declares: the one list the app is created with and installs ask for."""
    return list(yaml.safe_load(path.read_text())["oauth_config"]["scopes"]["bot"])


def oauth_settings(settings: Settings, db: Database, client: AsyncWebClient) -> AsyncOAuthSettings:
    """bolt's OAuth settings for this deployment: stores in `db`, scopes from the manifest, and the redirect URL
    under PERSONABOT_PUBLIC_URL when set (else Slack uses the one the app's settings list). `client` (no token)
    exchanges expiring tokens."""
    public = settings.public_url.rstrip("/") if settings.public_url else None
    api = settings.slack_api_url
    return AsyncOAuthSettings(
        client_id=settings.slack_client_id,
        client_secret=settings.slack_client_secret,
        scopes=manifest_scopes(),
        user_scopes=[],  # a bot-only install; bolt would otherwise read SLACK_USER_SCOPES
        redirect_uri=f"{public}{REDIRECT_PATH}" if public else None,
        install_path=INSTALL_PATH,
        redirect_uri_path=REDIRECT_PATH,
        install_page_rendering_enabled=False,  # /slack/install redirects straight to Slack
        # Slack's authorize page sits beside its Web API (https://slack.com/api/ → https://slack.com/oauth/…).
        authorization_url=urljoin(api if api.endswith("/") else api + "/", "../oauth/v2/authorize") if api else None,
        installation_store=SlackInstallations(db, AsyncTokenRotator(
            client_id=settings.slack_client_id, client_secret=settings.slack_client_secret, client=client)),
        installation_store_bot_only=False,
        state_store=SlackOAuthStates(db),
        state_expiration_seconds=STATE_SECONDS,
        logger=logging.getLogger("bot.platforms.slack_oauth"),
    )


def _key(enterprise_id: str | None, team_id: str | None, is_enterprise_install: bool | None = False) -> tuple:
    """A workspace's key columns: '' for an absent id; an org-wide install is keyed by its enterprise alone."""
    return enterprise_id or "", "" if is_enterprise_install else team_id or ""


def _millis(seconds: float) -> int:
    return int(seconds * 1000)


class SlackInstallations(AsyncInstallationStore):
    """slack_sdk's installation store on the bot's database: one bot per workspace, one installation per
    installer (the newest wins). What bolt's authorize step and its tokens_revoked / app_uninstalled listeners
    call is all here."""

    def __init__(self, db: Database, rotator: AsyncTokenRotator | None = None):
        self._db = db
        self._rotator = rotator

    @property
    def logger(self) -> logging.Logger:
        return log

    async def async_save(self, installation: Installation) -> None:
        if installation.bot_token is not None:
            await self.async_save_bot(installation.to_bot())
        row = dict(vars(installation), **{field: None for field in _BOT_FIELDS})
        await self._db.execute(
            "INSERT INTO slack_installations (enterprise_id, team_id, user_id, installed_at, installation)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (enterprise_id, team_id, user_id)"
            " DO UPDATE SET installed_at = excluded.installed_at, installation = excluded.installation",
            (*_key(installation.enterprise_id, installation.team_id, installation.is_enterprise_install),
             installation.user_id or "", _millis(installation.installed_at), json.dumps(row)),
        )
        log.info("Slack: installed in team %s (enterprise %s)", installation.team_id, installation.enterprise_id)

    async def async_save_bot(self, bot: Bot) -> None:
        await self._db.execute(
            "INSERT INTO slack_bots (enterprise_id, team_id, installed_at, bot) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (enterprise_id, team_id)"
            " DO UPDATE SET installed_at = excluded.installed_at, bot = excluded.bot",
            (*_key(bot.enterprise_id, bot.team_id, bot.is_enterprise_install), _millis(bot.installed_at),
             json.dumps(vars(bot))),
        )

    async def async_find_bot(self, *, enterprise_id: str | None, team_id: str | None,
                             is_enterprise_install: bool | None = False) -> Bot | None:
        key = _key(enterprise_id, team_id, is_enterprise_install)
        bot = await self._bot(key)
        return await self._fresh(key, bot) if bot is not None and self._expiring(bot) else bot

    async def _bot(self, key: tuple) -> Bot | None:
        rows = await self._db.fetch("SELECT bot FROM slack_bots WHERE enterprise_id = ? AND team_id = ?", key)
        return Bot(**json.loads(rows[0][0])) if rows else None

    def _expiring(self, bot: Bot) -> bool:
        return (self._rotator is not None and bot.bot_refresh_token is not None
                and bot.bot_token_expires_at is not None
                and bot.bot_token_expires_at <= time.time() + ROTATE_MINUTES * 60)

    async def _fresh(self, key: tuple, bot: Bot) -> Bot | None:
        """The workspace's bot with a token good for ROTATE_MINUTES more, exchanged once however many requests
        and processes ask at the same moment: the one that claims the workspace's `slack_rotations` row
        exchanges and saves it, the others re-read the saved bot until it is fresh. A claim lapses after
        CLAIM_SECONDS, so a process killed mid-exchange holds up nobody for longer; a refused exchange (a
        revoked refresh token) raises SlackTokenRotationError, and bolt then drops that request with a log line."""
        assert self._rotator is not None
        give_up = time.time() + CLAIM_SECONDS + 5
        while True:
            now = time.time()
            claimed = await self._db.execute(
                "INSERT INTO slack_rotations (enterprise_id, team_id, claimed_until) VALUES (?, ?, ?)"
                " ON CONFLICT (enterprise_id, team_id) DO UPDATE SET claimed_until = excluded.claimed_until"
                " WHERE slack_rotations.claimed_until <= ?", (*key, _millis(now + CLAIM_SECONDS), _millis(now)))
            if claimed:
                try:
                    latest = await self._bot(key)  # exchanged by another caller just before this claim?
                    if latest is None or not self._expiring(latest):
                        return latest
                    try:
                        refreshed = await self._rotator.perform_bot_token_rotation(
                            bot=latest, minutes_before_expiration=ROTATE_MINUTES)
                    except SlackTokenRotationError as exc:
                        log.error("Slack: the bot token of team %s could not be exchanged (%s); reinstall the app"
                                  " in team %s from /slack/install", latest.team_id,
                                  exc.api_error.response.get("error"), latest.team_id)
                        raise
                    if refreshed is None:
                        return latest
                    await self.async_save_bot(refreshed)
                    log.info("Slack: exchanged the expiring bot token of team %s", latest.team_id)
                    return refreshed
                finally:
                    await self._db.execute("DELETE FROM slack_rotations WHERE enterprise_id = ? AND team_id = ?",
                                           key)
            await asyncio.sleep(0.05)
            latest = await self._bot(key)
            if latest is None or not self._expiring(latest) or time.time() > give_up:
                return latest

    async def async_find_installation(self, *, enterprise_id: str | None, team_id: str | None,
                                      user_id: str | None = None,
                                      is_enterprise_install: bool | None = False) -> Installation | None:
        """The installer's installation, or with no `user_id` the workspace's newest; its bot fields are the
        workspace's current bot (none once tokens_revoked or app_uninstalled removed it)."""
        key = _key(enterprise_id, team_id, is_enterprise_install)
        if user_id is None:
            rows = await self._db.fetch(
                "SELECT installation FROM slack_installations WHERE enterprise_id = ? AND team_id = ?"
                " ORDER BY installed_at DESC LIMIT 1", key)
        else:
            rows = await self._db.fetch(
                "SELECT installation FROM slack_installations WHERE enterprise_id = ? AND team_id = ? AND user_id = ?",
                (*key, user_id))
        if not rows:
            return None
        fields: dict[str, Any] = json.loads(rows[0][0])
        bot = await self.async_find_bot(enterprise_id=enterprise_id, team_id=team_id,
                                        is_enterprise_install=is_enterprise_install)
        for field in _BOT_FIELDS:
            fields[field] = getattr(bot, field) if bot is not None else None
        fields["bot_scopes"] = fields["bot_scopes"] or []
        return Installation(**fields)

    async def async_delete_bot(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        await self._db.execute("DELETE FROM slack_bots WHERE enterprise_id = ? AND team_id = ?",
                               _key(enterprise_id, team_id))
        log.info("Slack: removed the bot token of team %s (enterprise %s)", team_id, enterprise_id)

    async def async_delete_installation(self, *, enterprise_id: str | None, team_id: str | None,
                                        user_id: str | None = None) -> None:
        if user_id is None:
            await self._db.execute("DELETE FROM slack_installations WHERE enterprise_id = ? AND team_id = ?",
                                   _key(enterprise_id, team_id))
        else:
            await self._db.execute(
                "DELETE FROM slack_installations WHERE enterprise_id = ? AND team_id = ? AND user_id = ?",
                (*_key(enterprise_id, team_id), user_id))

    async def async_delete_all(self, *, enterprise_id: str | None, team_id: str | None) -> None:
        """app_uninstalled: the workspace's bot and every installation in it."""
        await self.async_delete_bot(enterprise_id=enterprise_id, team_id=team_id)
        await self.async_delete_installation(enterprise_id=enterprise_id, team_id=team_id)


class SlackOAuthStates(AsyncOAuthStateStore):
    """OAuth `state` values: random, single-use and expiring. Consuming is one DELETE, so when two processes
    race on one state exactly one of them sees the row go."""

    def __init__(self, db: Database, *, expiration_seconds: int = STATE_SECONDS, clock=time.time):
        self._db = db
        self._expiration = expiration_seconds
        self._clock = clock

    @property
    def logger(self) -> logging.Logger:
        return log

    async def async_issue(self, *args: Any, **kwargs: Any) -> str:
        now = _millis(self._clock())
        await self._db.execute("DELETE FROM slack_oauth_states WHERE expires_at <= ?", (now,))
        state = secrets.token_urlsafe(32)
        await self._db.execute("INSERT INTO slack_oauth_states (state, expires_at) VALUES (?, ?)",
                               (state, now + self._expiration * 1000))
        return state

    async def async_consume(self, state: str) -> bool:
        if not state:
            return False
        deleted = await self._db.execute("DELETE FROM slack_oauth_states WHERE state = ? AND expires_at > ?",
                                         (state, _millis(self._clock())))
        return deleted == 1
