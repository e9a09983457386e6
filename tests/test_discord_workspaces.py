"""One bot, two Discord servers: each guild is a tenant of its own, seen the way its people see it.

Alpha and Beta each have an admin (Manage Server in that guild only) and a member; Ada, Alpha's admin, is also
a plain member of Beta, and Otto, in both, has no role anywhere (he becomes a bot owner where a test says so).
Everything runs as in test_discord.py: dpytest's gateway, the real engine on SQLite, the openai client against
the local model server, slash commands through their registered callbacks and forms through discord.py's own
submit path. Every test here fails if what one guild does leaks into the other.
"""
from __future__ import annotations

import sqlite3

import discord
import discord.ext.test as dpytest
import discord.ext.test.backend as dpy_backend
import pytest
from discord import app_commands

from bot.conversation import Workspace
from bot.platforms.discord_bot import create_bot
from dpytest_harness import configure_dpytest
from openai_server import openai_server  # noqa: F401  (fixture)
from test_discord import WITH_KNOWLEDGE, FakeInteraction, bot_messages, engine, make_admin, submit  # noqa: F401

PEOPLE = {"Alpha": ["ada", "amy", "otto"], "Beta": ["bea", "ben", "ada", "otto"]}
ADMINS = {"Alpha": "ada", "Beta": "bea"}
PIRATE = "You are a pirate. Arr."


# -- two guilds ----------------------------------------------------------------------------------------


@pytest.fixture
async def bot(engine):
    bot = create_bot(engine, engine.settings, edit_interval=0.01)
    await configure_dpytest(bot, guilds=list(PEOPLE), text_channels=["general", "random"], voice_channels=0, members=0)
    users: dict[str, discord.User] = {}
    for name, people in PEOPLE.items():
        for person in people:  # the same user (one id) in every guild that lists them
            users.setdefault(person, dpy_backend.make_user(person, f"{len(users) + 1:04}"))
            dpy_backend.make_member(users[person], guild(name))
    for name, admin in ADMINS.items():
        await make_admin(member(name, admin))
    assert member("Alpha", "ada").guild_permissions.manage_guild
    assert not member("Beta", "ada").guild_permissions.manage_guild  # Manage Server in Alpha only
    yield bot
    await dpytest.empty_queue()


def guild(name: str) -> discord.Guild:
    return next(g for g in dpytest.get_config().guilds if g.name == name)


def channel(where: str, name: str = "general") -> discord.TextChannel:
    return next(c for c in guild(where).text_channels if c.name == name)


def member(where: str, name: str) -> discord.Member:
    return next(m for m in guild(where).members if m.name == name)


def workspace(where: str) -> Workspace:
    return Workspace("discord", str(guild(where).id))


def make_owner(engine, where: str, name: str) -> None:
    engine.settings = engine.settings.model_copy(update={"admins": frozenset({f"discord:{member(where, name).id}"})})


def command(bot, path: str) -> app_commands.Command:
    found = bot.tree.get_command(path.split()[0])
    for name in path.split()[1:]:
        found = found.get_command(name)
    assert isinstance(found, app_commands.Command), path
    return found


async def run_in(bot, interaction: FakeInteraction, path: str, **options) -> FakeInteraction:
    """Runs `/path` through the registered command's own callback, as the command tree would."""
    found = command(bot, path)
    if found.binding is not None:
        await found.callback(found.binding, interaction, **options)
    else:
        await found.callback(interaction, **options)
    return interaction


async def slash(bot, path: str, who: str, where: str, channel_name: str = "general", **options) -> FakeInteraction:
    """`/path` as `who` runs it in guild `where`: Discord hands over that guild's Member, with its permissions."""
    return await run_in(bot, FakeInteraction(bot, member(where, who), channel(where, channel_name)), path, **options)


async def slash_in_dm(bot, path: str, who: str, dm: discord.DMChannel, **options) -> FakeInteraction:
    """In a DM Discord hands over a User, not a Member: no guild, no guild permissions."""
    return await run_in(bot, FakeInteraction(bot, member("Alpha", who)._user, dm), path, **options)


async def complete(bot, path: str, who: str, where: str, current: str) -> list[str]:
    found = command(bot, path)
    choices = await found._params["name"].autocomplete(FakeInteraction(bot, member(where, who), channel(where)),
                                                       current)
    return [choice.value for choice in choices]


async def mention(bot, text: str, who: str, where: str) -> None:
    await dpytest.message(f"<@{bot.user.id}> {text}", channel=channel(where), member=member(where, who))


async def create_persona(bot, who: str, where: str, name: str, **values: str) -> FakeInteraction:
    """Opens `/persona create NAME` and submits the form; returns the submission's answer."""
    started = await slash(bot, "persona create", who=who, where=where, name=name)
    assert started.modal is not None, started.text
    submitted = FakeInteraction(bot, member(where, who), channel(where))
    await submit(started.modal, submitted, **values)
    return submitted


def system_prompt(openai_server) -> str:
    return openai_server.last["messages"][0]["content"]


def audit_rows(engine) -> list[tuple]:
    with sqlite3.connect(engine.settings.db_path) as db:
        return db.execute("SELECT workspace, channel, user_id, action, detail FROM audit ORDER BY id").fetchall()


def shipped(engine, name: str) -> str:
    return engine.personas.library.get(name).system


# -- personas made in one guild ------------------------------------------------------------------------


async def test_persona_made_in_alpha_is_invisible_in_beta(bot, engine):
    saved = await create_persona(bot, "ada", "Alpha", "pirate", display_name="Captain", system=PIRATE)
    assert "Saved **Captain**" in saved.text

    listed = await slash(bot, "persona list", who="ben", where="Beta")
    shown = await slash(bot, "persona show", who="ben", where="Beta", name="pirate")
    offered = await complete(bot, "persona set", who="bea", where="Beta", current="")
    offered_pi = await complete(bot, "persona set", who="bea", where="Beta", current="pi")

    assert "pirate" not in listed.text and "Captain" not in listed.text
    assert "no persona named 'pirate'" in shown.text and "Arr" not in shown.text and "Captain" not in shown.text
    assert "pirate" not in offered and offered_pi == []


async def test_beta_admin_cannot_switch_to_alphas_persona(bot, engine, openai_server):
    await create_persona(bot, "ada", "Alpha", "pirate", display_name="Captain", system=PIRATE)

    answer = await slash(bot, "persona set", who="bea", where="Beta", name="pirate")
    await mention(bot, "ahoy?", who="ben", where="Beta")

    assert answer.answers[0].ephemeral and "no persona named 'pirate'" in answer.text
    assert system_prompt(openai_server) == shipped(engine, "assistant")
    assert [row[3] for row in audit_rows(engine)] == ["create_persona"]  # Ada's, in Alpha; nothing for Beta


async def test_persona_made_in_alpha_serves_alpha(bot, engine, openai_server):
    await create_persona(bot, "ada", "Alpha", "pirate", display_name="Captain", system=PIRATE)

    listed = await slash(bot, "persona list", who="amy", where="Alpha")
    shown = await slash(bot, "persona show", who="amy", where="Alpha", name="pirate")
    offered = await complete(bot, "persona set", who="ada", where="Alpha", current="pi")
    switched = await slash(bot, "persona set", who="ada", where="Alpha", name="pirate")
    await mention(bot, "ahoy", who="amy", where="Alpha")

    assert "**Captain** (`pirate`) _(own)_" in listed.text
    assert PIRATE in shown.text
    assert offered == ["pirate"]
    assert not switched.answers[0].ephemeral and "Captain" in switched.text
    assert system_prompt(openai_server) == PIRATE
    assert await bot_messages(channel("Alpha"), bot) == ["echo: ahoy"]


async def test_same_name_persona_in_beta_is_betas_own(bot, engine, openai_server):
    await create_persona(bot, "ada", "Alpha", "pirate", display_name="Captain", system=PIRATE)

    saved = await create_persona(bot, "bea", "Beta", "pirate", display_name="Corsair", system="You are a corsair.")
    await slash(bot, "persona set", who="ada", where="Alpha", name="pirate")
    await mention(bot, "ahoy", who="amy", where="Alpha")
    alpha_prompt = system_prompt(openai_server)
    await slash(bot, "persona set", who="bea", where="Beta", name="pirate")
    await mention(bot, "ahoy", who="ben", where="Beta")

    assert "Saved **Corsair**" in saved.text
    assert alpha_prompt == PIRATE
    assert system_prompt(openai_server) == "You are a corsair."


async def test_beta_admin_cannot_delete_or_edit_alphas_persona(bot, engine):
    await create_persona(bot, "ada", "Alpha", "pirate", display_name="Captain", system=PIRATE)

    deleted = await slash(bot, "persona delete", who="bea", where="Beta", name="pirate")
    edited = await slash(bot, "persona edit", who="bea", where="Beta", name="pirate")

    assert deleted.answers[0].ephemeral and "no persona named 'pirate'" in deleted.text
    assert edited.modal is None and "no persona named 'pirate'" in edited.text
    assert (await engine.personas.get(workspace("Alpha"), "pirate")).system == PIRATE


async def test_editing_shipped_persona_in_alpha_changes_alpha_only(bot, engine, openai_server):
    on_disk = (engine.settings.personas_dir / "assistant.yaml").read_bytes()
    started = await slash(bot, "persona edit", who="ada", where="Alpha", name="assistant")
    assert started.modal.inputs["system"].default == shipped(engine, "assistant")

    submitted = FakeInteraction(bot, member("Alpha", "ada"), channel("Alpha"))
    await submit(started.modal, submitted, display_name="Assistant", system="You are Alpha's terse assistant.")
    await mention(bot, "status?", who="amy", where="Alpha")
    alpha_prompt = system_prompt(openai_server)
    await mention(bot, "status?", who="ben", where="Beta")
    beta_prompt = system_prompt(openai_server)
    beta_show = await slash(bot, "persona show", who="ben", where="Beta", name="assistant")
    alpha_show = await slash(bot, "persona show", who="amy", where="Alpha", name="assistant")

    assert "own copy" in submitted.text
    assert alpha_prompt == "You are Alpha's terse assistant."
    assert beta_prompt == shipped(engine, "assistant")
    assert (engine.settings.personas_dir / "assistant.yaml").read_bytes() == on_disk
    assert "(`assistant`, shipped)" in beta_show.text
    assert shipped(engine, "assistant").splitlines()[0] in beta_show.text and "terse" not in beta_show.text
    assert "(`assistant`, own copy)" in alpha_show.text and "terse" in alpha_show.text


async def test_deleting_alphas_copy_brings_back_the_shipped_persona_there(bot, engine, openai_server):
    started = await slash(bot, "persona edit", who="ada", where="Alpha", name="assistant")
    await submit(started.modal, FakeInteraction(bot, member("Alpha", "ada"), channel("Alpha")),
                 system="You are Alpha's terse assistant.")

    refused = await slash(bot, "persona delete", who="bea", where="Beta", name="assistant")
    deleted = await slash(bot, "persona delete", who="ada", where="Alpha", name="assistant")
    await mention(bot, "status?", who="amy", where="Alpha")

    assert "ships with the bot" in refused.text and "Nothing was changed" in refused.text
    assert "shipped version serves here again" in deleted.text
    assert system_prompt(openai_server) == shipped(engine, "assistant")


# -- an admin of one guild in another -------------------------------------------------------------------

REFUSED_IN_BETA = {
    "persona set": {"name": "comic"},
    "channel enable": {},
    "persona create": {"name": "pirate"},
    "knowledge add": {"collection": "handbook"},
}


@WITH_KNOWLEDGE
@pytest.mark.parametrize("path", list(REFUSED_IN_BETA))
async def test_alpha_admin_has_no_powers_in_beta(bot, engine, openai_server, tmp_path, path):
    options = dict(REFUSED_IN_BETA[path])
    if path == "knowledge add":
        document = tmp_path / "handbook.md"
        document.write_text("# Handbook\n\nThe pager rotation hands over every Tuesday.\n")
        options["file"] = dpy_backend.make_attachment(document)

    answer = await slash(bot, path, who="ada", where="Beta", **options)
    await dpytest.message("anyone there?", channel=channel("Beta"), member=member("Beta", "ben"))
    await mention(bot, "hello", who="ben", where="Beta")

    assert answer.modal is None and len(answer.answers) == 1 and answer.answers[0].ephemeral
    assert "Only this workspace's admins" in answer.text and "Nothing was changed" in answer.text
    assert audit_rows(engine) == []
    assert len(openai_server.requests) == 1  # the mention only: the channel was not enabled
    assert system_prompt(openai_server) == shipped(engine, "assistant")
    assert "pirate" not in await engine.personas.entries(workspace("Beta"))
    assert engine.retriever.collections(workspace("Beta")) == []


async def test_alpha_admin_keeps_powers_in_alpha(bot, engine, openai_server):
    await slash(bot, "persona set", who="ada", where="Beta", name="comic")

    answer = await slash(bot, "persona set", who="ada", where="Alpha", name="comic")
    await mention(bot, "a joke", who="amy", where="Alpha")

    assert not answer.answers[0].ephemeral and "Stand-up Comic" in answer.text
    assert system_prompt(openai_server) == shipped(engine, "comic")


async def test_owner_switches_personas_in_both_guilds_without_manage_server(bot, engine, openai_server):
    make_owner(engine, "Alpha", "otto")
    assert not any(member(g, "otto").guild_permissions.manage_guild for g in PEOPLE)

    await slash(bot, "persona set", who="otto", where="Alpha", name="sre")
    await slash(bot, "persona set", who="otto", where="Beta", name="comic")
    await mention(bot, "disk is full", who="amy", where="Alpha")
    alpha_prompt = system_prompt(openai_server)
    await mention(bot, "a joke", who="ben", where="Beta")

    assert alpha_prompt == shipped(engine, "sre")
    assert system_prompt(openai_server) == shipped(engine, "comic")


# -- the operator's bounds on a persona form ------------------------------------------------------------


async def test_form_asking_more_than_the_reply_cap_is_refused_and_saves_nothing(bot, engine):
    answer = await create_persona(bot, "ada", "Alpha", "pirate", system=PIRATE, extra="model: {max_tokens: 1000000}\n")

    assert answer.answers[0].ephemeral and "Not saved" in answer.text
    assert "1000000 is above this bot's cap of 1024" in answer.text
    assert "pirate" not in await engine.personas.entries(workspace("Alpha")) and audit_rows(engine) == []


async def test_form_naming_a_model_outside_the_allow_list_is_refused_and_saves_nothing(bot, engine):
    answer = await create_persona(bot, "ada", "Alpha", "pirate", system=PIRATE, extra="model: {name: gpt-9-ultra}\n")

    assert answer.answers[0].ephemeral and "Not saved" in answer.text
    assert "'gpt-9-ultra' is not a model this bot allows" in answer.text and "gpt-4o-mini" in answer.text
    assert "pirate" not in await engine.personas.entries(workspace("Alpha")) and audit_rows(engine) == []


async def test_owner_may_give_a_persona_an_unlisted_model(bot, engine, openai_server):
    make_owner(engine, "Alpha", "otto")

    saved = await create_persona(bot, "otto", "Alpha", "pirate", system=PIRATE, extra="model: {name: gpt-9-ultra}\n")
    await slash(bot, "persona set", who="otto", where="Alpha", name="pirate")
    await mention(bot, "ahoy", who="amy", where="Alpha")

    assert "Saved" in saved.text
    assert openai_server.last["model"] == "gpt-9-ultra" and system_prompt(openai_server) == PIRATE


# -- direct messages ------------------------------------------------------------------------------------


async def test_member_switches_persona_in_own_dm_only(bot, engine, openai_server):
    dm = await member("Alpha", "amy").create_dm()
    other_dm = await member("Alpha", "ada").create_dm()

    answer = await slash_in_dm(bot, "persona set", who="amy", dm=dm, name="comic")
    await dpytest.message("a joke please", channel=dm, member=member("Alpha", "amy"))
    in_dm = system_prompt(openai_server)
    await mention(bot, "hello", who="amy", where="Alpha")
    in_guild = system_prompt(openai_server)
    await dpytest.message("hello", channel=other_dm, member=member("Alpha", "ada"))

    assert "Stand-up Comic" in answer.text and "Only" not in answer.text
    assert in_dm == shipped(engine, "comic")
    assert in_guild == shipped(engine, "assistant")  # her guild channel is not hers to change
    assert system_prompt(openai_server) == shipped(engine, "assistant")  # nor anyone else's DM


async def test_member_resets_own_dm(bot, openai_server):
    dm = await member("Alpha", "amy").create_dm()
    await dpytest.message("remember the codeword swordfish", channel=dm, member=member("Alpha", "amy"))

    answer = await slash_in_dm(bot, "reset", who="amy", dm=dm)
    await dpytest.message("what was the codeword?", channel=dm, member=member("Alpha", "amy"))

    assert "Context cleared" in answer.text
    assert "swordfish" not in str(openai_server.last["messages"])


async def test_member_cannot_reset_a_guild_channel(bot, openai_server):
    await mention(bot, "remember the codeword swordfish", who="amy", where="Alpha")

    answer = await slash(bot, "reset", who="amy", where="Alpha")
    await mention(bot, "what was the codeword?", who="amy", where="Alpha")

    assert answer.answers[0].ephemeral and "Nothing was changed" in answer.text
    assert "swordfish" in str(openai_server.last["messages"])


# -- /ask ------------------------------------------------------------------------------------------------


async def test_ask_exchange_never_joins_the_channel_conversation(bot, openai_server):
    asked = await slash(bot, "ask", who="amy", where="Alpha", question="the secret word is marmalade")

    await mention(bot, "what was the secret word?", who="amy", where="Alpha")

    assert asked.text == "echo: the secret word is marmalade"
    assert "marmalade" not in str(openai_server.last["messages"])


async def test_ask_speaks_as_the_channels_persona(bot, engine, openai_server):
    await slash(bot, "persona set", who="bea", where="Beta", name="comic")

    await slash(bot, "ask", who="ben", where="Beta", question="a joke?")
    beta_prompt = system_prompt(openai_server)
    await slash(bot, "ask", who="amy", where="Alpha", question="a joke?")

    assert beta_prompt == shipped(engine, "comic")
    assert system_prompt(openai_server) == shipped(engine, "assistant")


# -- audit -----------------------------------------------------------------------------------------------


async def test_audit_rows_carry_the_guild_of_the_action(bot, engine):
    await slash(bot, "persona set", who="ada", where="Alpha", name="comic")
    await slash(bot, "channel enable", who="bea", where="Beta", channel_name="random")
    await create_persona(bot, "bea", "Beta", "pirate", system=PIRATE)

    alpha, beta = str(guild("Alpha").id), str(guild("Beta").id)
    ada, bea = str(member("Alpha", "ada").id), str(member("Beta", "bea").id)
    assert audit_rows(engine) == [
        (alpha, str(channel("Alpha").id), ada, "set_persona", "comic"),
        (beta, str(channel("Beta", "random").id), bea, "enable_channel", ""),
        (beta, str(channel("Beta").id), bea, "create_persona", "pirate"),
    ]


async def test_usage_shows_only_this_guilds_tokens(bot):
    await slash(bot, "persona set", who="bea", where="Beta", name="comic")
    await mention(bot, "a joke", who="ben", where="Beta")
    await mention(bot, "hello", who="amy", where="Alpha")

    alpha = await slash(bot, "usage", who="ada", where="Alpha")
    beta = await slash(bot, "usage", who="bea", where="Beta")
    refused = await slash(bot, "usage", who="ada", where="Beta")

    assert "assistant" in alpha.text and "comic" not in alpha.text
    assert "comic" in beta.text and "assistant" not in beta.text
    assert refused.answers[0].ephemeral and "Nothing was changed" in refused.text and "comic" not in refused.text


# -- knowledge --------------------------------------------------------------------------------------------

ALPHA_HANDBOOK = "# On-call\n\nThe pager rotation hands over every Tuesday at 10:00 UTC.\n"
BETA_HANDBOOK = "# On-call\n\nThe pager rotation hands over every Friday at 16:00 UTC.\n"
QUESTION = "when does the pager rotation hand over?"


async def upload(bot, tmp_path, who: str, where: str, text: str) -> FakeInteraction:
    document = tmp_path / where / "handbook.md"
    document.parent.mkdir(exist_ok=True)
    document.write_text(text)
    return await slash(bot, "knowledge add", who=who, where=where, file=dpy_backend.make_attachment(document),
                       collection="handbook")


@WITH_KNOWLEDGE
async def test_alpha_upload_is_found_in_alpha_only(bot, tmp_path):
    added = await upload(bot, tmp_path, "ada", "Alpha", ALPHA_HANDBOOK)

    alpha_found = await slash(bot, "knowledge search", who="amy", where="Alpha", query=QUESTION)
    beta_found = await slash(bot, "knowledge search", who="ben", where="Beta", query=QUESTION)
    beta_listed = await slash(bot, "knowledge list", who="ben", where="Beta")
    beta_offered = await command(bot, "knowledge add")._params["collection"].autocomplete(
        FakeInteraction(bot, member("Beta", "bea"), channel("Beta")), "")

    assert "handbook.md" in added.text and added.answers[-1].ephemeral
    assert "handbook/handbook.md" in alpha_found.text and "Tuesday" in alpha_found.text
    assert "Tuesday" not in beta_found.text and "Nothing in the knowledge base" in beta_found.text
    assert "handbook" not in beta_listed.text and "none yet" in beta_listed.text
    assert beta_offered == []


@WITH_KNOWLEDGE
async def test_same_name_upload_in_beta_leaves_alphas_copy(bot, tmp_path):
    await upload(bot, tmp_path, "ada", "Alpha", ALPHA_HANDBOOK)

    added = await upload(bot, tmp_path, "bea", "Beta", BETA_HANDBOOK)
    alpha_found = await slash(bot, "knowledge search", who="amy", where="Alpha", query=QUESTION)
    beta_found = await slash(bot, "knowledge search", who="ben", where="Beta", query=QUESTION)

    assert "handbook.md" in added.text and "Not done" not in added.text
    assert "Tuesday" in alpha_found.text and "Friday" not in alpha_found.text
    assert "Friday" in beta_found.text and "Tuesday" not in beta_found.text


@WITH_KNOWLEDGE
async def test_beta_admin_can_neither_see_nor_remove_alphas_document(bot, tmp_path):
    await upload(bot, tmp_path, "ada", "Alpha", ALPHA_HANDBOOK)
    sources = command(bot, "knowledge remove")._params["source"].autocomplete

    offered_in_beta = await sources(FakeInteraction(bot, member("Beta", "bea"), channel("Beta")), "")
    removed = await slash(bot, "knowledge remove", who="bea", where="Beta", source="handbook/handbook.md")
    offered_in_alpha = await sources(FakeInteraction(bot, member("Alpha", "ada"), channel("Alpha")), "")
    alpha_found = await slash(bot, "knowledge search", who="amy", where="Alpha", query=QUESTION)

    assert offered_in_beta == []
    assert removed.answers[0].ephemeral and "There is no document `handbook/handbook.md` here" in removed.text
    assert [choice.value for choice in offered_in_alpha] == ["handbook/handbook.md"]
    assert "Tuesday" in alpha_found.text


@WITH_KNOWLEDGE
async def test_persona_citing_a_collection_is_grounded_in_its_own_guilds_upload(bot, tmp_path, openai_server):
    await upload(bot, tmp_path, "ada", "Alpha", ALPHA_HANDBOOK)
    for admin, where in (("ada", "Alpha"), ("bea", "Beta")):
        await create_persona(bot, admin, where, "oncall", system="You answer on-call questions.",
                             extra="knowledge: [handbook]\n")
        await slash(bot, "persona set", who=admin, where=where, name="oncall")

    await mention(bot, QUESTION, who="amy", where="Alpha")
    alpha_prompt = system_prompt(openai_server)
    await mention(bot, QUESTION, who="ben", where="Beta")

    assert "Tuesday" in alpha_prompt
    assert system_prompt(openai_server).startswith("You answer on-call questions.")
    assert "Tuesday" not in system_prompt(openai_server)
