"""Every command of the one table, run on the terminal, Discord and Slack, must answer the same.

One engine serves all three: the terminal chat in-process (its person is an owner), the Discord bot through
dpytest, the Slack app over signed HTTP with the fake Web API. Each platform sits in a workspace of its own, so
each starts from the same fresh state; the answers are compared as each platform shows them (Slack's as mrkdwn).
"""
from __future__ import annotations

import io

import aiohttp
import pytest

from bot import commands
from bot.engine import Engine
from bot.platforms.slack_format import to_mrkdwn
from bot.platforms.terminal import chat
from openai_server import openai_server  # noqa: F401  (fixture)
from slack_api import BOT_TOKEN, SIGNING_SECRET, FakeSlackApi, SlackApp, served
from test_discord import FakeInteraction, bot, channel, engine, make_admin, member  # noqa: F401  (fixtures)

SLACK_ADMIN = "UADMIN"

# (typed line, who runs it): run in this order, each platform in its own fresh workspace.
AS_ADMIN = [
    "/persona list",
    "/persona show comic",
    "/persona show nobody",
    "/persona set comic",
    "/persona show",
    "/persona set nobody",
    "/persona delete comic",
    "/reset",
    "/ask tell me a joke",
    "/channel enable",
    "/channel disable",
    "/knowledge search refunds",
    "/knowledge list",
    "/usage",
    "/persona create Not-A-Name",
    "/persona create comic",
]
AS_MEMBER = ["/persona set sre", "/reset", "/channel enable", "/usage", "/persona create pirate",
             "/persona edit comic", "/persona delete comic", "/persona list", "/ask hello"]


@pytest.fixture
async def slack(engine):
    async with FakeSlackApi(admins={SLACK_ADMIN}) as api:
        engine.settings = engine.settings.model_copy(update={
            "slack_api_url": api.api_url, "slack_bot_token": BOT_TOKEN, "slack_signing_secret": SIGNING_SECRET})
        async with served(engine, engine.settings) as url, aiohttp.ClientSession() as session:
            yield SlackApp(f"{url}/slack/events", session), api


async def on_terminal(engine: Engine, line: str) -> str:
    out = io.StringIO()
    await chat(engine, workspace="everywhere", stdin=io.StringIO(line + "\n"), stdout=out)
    return out.getvalue().removesuffix("\n")


async def on_discord(bot, line: str, who: str) -> str:
    cmd, args = commands.parse(line)
    names = cmd.path.split()
    command = bot.tree.get_command(names[0])
    for name in names[1:]:
        command = command.get_command(name)
    interaction = FakeInteraction(bot, member(who), channel("general"))
    await command.callback(interaction, **args)
    return interaction.text


async def on_slack(slack, line: str, user: str) -> str:
    app, api = slack
    name, _, text = line.removeprefix("/").partition(" ")
    url_name = f"r{len(api.calls)}"
    await app.command(f"/{name}", text, user=user, response_url=api.response_url(url_name))
    return "\n".join(r["text"] for r in await api.wait_for(lambda: api.responses(url_name)))


async def test_every_command_answers_an_admin_alike_on_all_three_platforms(engine, bot, slack):
    await make_admin(member("alice"))
    for line in AS_ADMIN:
        terminal = await on_terminal(engine, line)
        on_discord_ = await on_discord(bot, line, "alice")
        on_slack_ = await on_slack(slack, line, SLACK_ADMIN)

        assert on_discord_ == terminal, line
        assert on_slack_ == to_mrkdwn(terminal), line


async def test_every_command_refuses_a_member_alike_on_discord_and_slack(engine, bot, slack):
    for line in AS_MEMBER:
        on_discord_ = await on_discord(bot, line, "bob")
        on_slack_ = await on_slack(slack, line, "U1")

        assert on_slack_ == to_mrkdwn(on_discord_), line
