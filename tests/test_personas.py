import base64
import json
import logging
import struct
import time
import zlib
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from bot.character_card import load_card, persona_from_card
from bot.cli.personas import app
from bot.models.base import GenParams
from bot.personas import (
    Persona,
    PersonaError,
    PersonaLibrary,
    UnknownPersona,
    dump_persona,
    parse_persona,
)

SHIPPED = Path(__file__).resolve().parent.parent / "personas"

PIRATE = """\
name: pirate
display_name: Pirate
system: You talk like a pirate.
"""

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Captain Vera",
        "description": "{{char}} is a retired starship captain who mentors {{user}}.",
        "personality": "calm, wry, precise",
        "scenario": "A late shift on the observation deck.",
        "first_mes": "*{{char}} looks up from the star chart.* You're early, {{user}}.",
        "mes_example": (
            "<START>\n{{user}}: How do I plot a jump?\n{{char}}: Carefully.\nThen twice.\n"
            "<START>\n{{char}}: Coffee?\n{{user}}: Please.\n{{char}}: Black, like the void.\n{{user}}: Thanks"
        ),
        "creator_notes": "A mentor for space-opera role play. Works best with long replies.",
        "system_prompt": "",
        "post_history_instructions": "",
        "tags": ["sci-fi"],
        "extensions": {},
    },
}


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def errors_of(text: str, source: str = "personas/comic.yaml") -> list[str]:
    with pytest.raises(PersonaError) as info:
        parse_persona(text, source)
    return info.value.errors


# ---------------------------------------------------------------------------------------------- shipped files


def test_shipped_personas_all_validate():
    library = PersonaLibrary(SHIPPED)
    assert library.errors == {}
    assert {"assistant", "comic", "sre"} <= set(library.names())


def test_shipped_personas_run_on_the_configured_backend():
    assert all(p.model.backend is None and p.knowledge == [] for p in PersonaLibrary(SHIPPED).all())


def test_comic_has_at_least_three_joke_pairs_and_a_playful_temperature():
    comic = PersonaLibrary(SHIPPED).get("comic")
    roles = [turn["role"] for turn in comic.examples]
    assert roles[:6] == ["user", "assistant"] * 3 and comic.model.temperature == pytest.approx(0.9)


def test_default_persona_is_shipped(settings):
    assert PersonaLibrary(SHIPPED).get(settings.default_persona).name == "assistant"


# ---------------------------------------------------------------------------------------------- validation


def test_wrong_role_is_reported_with_file_and_line():
    text = PIRATE.replace("pirate", "comic") + (
        "examples:\n"
        "  - role: user\n"
        "    content: Hi\n"
        "  - role: bot\n"
        "    content: Arr\n"
    )
    assert errors_of(text) == ["personas/comic.yaml:7: examples[1].role: must be user or assistant"]


def test_yaml_syntax_error_reports_its_line():
    text = "name: comic\nsystem: hi\nexamples:\n  - role: user\n   content: [oops\n"
    [error] = errors_of(text)
    assert error.startswith("personas/comic.yaml:5: YAML syntax error")


def test_missing_system_is_an_error():
    assert errors_of("name: comic\ndescription: no prompt\n") == ["personas/comic.yaml:1: system: required"]


def test_blank_system_is_an_error():
    assert errors_of("name: comic\nsystem: '   '\n") == ["personas/comic.yaml:2: system: must not be empty"]


def test_name_must_match_the_file_name():
    assert errors_of(PIRATE) == ["personas/comic.yaml:1: name: 'pirate' must match the file name 'comic'"]


def test_name_need_not_match_a_source_that_is_not_a_file():
    assert parse_persona(PIRATE, "<discord modal>").name == "pirate"


def test_misspelt_key_is_caught_with_a_suggestion():
    text = "name: comic\nsystem: hi\nmodel:\n  temprature: 0.9\n"
    assert errors_of(text) == ["personas/comic.yaml:4: model.temprature: unknown key (did you mean 'temperature'?)"]


def test_every_problem_is_reported_at_once_in_line_order():
    text = "name: comic\nsystem: hi\nmodel:\n  temperature: 3\n  max_tokens: 0\nknowledge: [Team Docs]\n"
    errors = errors_of(text)
    assert [e.split(": ")[0] for e in errors] == [
        "personas/comic.yaml:4", "personas/comic.yaml:5", "personas/comic.yaml:6"
    ]


def test_examples_must_alternate_starting_with_user():
    text = "name: comic\nsystem: hi\nexamples:\n  - {role: user, content: a}\n  - {role: user, content: b}\n"
    [error] = errors_of(text)
    assert error.startswith("personas/comic.yaml:5: examples[1].role: examples alternate")


def test_examples_must_end_with_an_assistant_reply():
    text = ("name: comic\nsystem: hi\nexamples:\n  - {role: user, content: a}\n  - {role: assistant, content: b}\n"
            "  - {role: user, content: c}\n")
    [error] = errors_of(text)
    assert error.startswith("personas/comic.yaml:6: examples[2].role: examples come in user/assistant pairs")


def test_duplicate_keys_are_reported():
    assert errors_of("name: comic\nsystem: a\nsystem: b\n") == [
        "personas/comic.yaml:3: system: duplicate key (only the last one would count)"
    ]


def test_a_list_is_not_a_persona():
    [error] = errors_of("- name: comic\n")
    assert error.startswith("personas/comic.yaml:1: a persona file is a mapping")


def test_prefix_is_the_system_prompt_then_the_examples():
    persona = Persona(name="p", system="Be brief.", examples=[{"role": "user", "content": "Hi"},
                                                              {"role": "assistant", "content": "Hello."}])
    assert persona.prefix() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
    ]


def test_gen_params_overrides_only_what_the_persona_sets():
    persona = Persona(name="p", system="s", model={"temperature": 0.9})
    default = GenParams(temperature=0.2, max_tokens=123, top_p=0.5, stop=("\n",))
    assert persona.gen_params(default) == GenParams(temperature=0.9, max_tokens=123, top_p=0.5, stop=("\n",))


def test_display_name_defaults_from_the_name():
    assert Persona(name="senior-sre", system="s").display_name == "Senior Sre"


# ---------------------------------------------------------------------------------------------- library


def test_library_sees_an_edit_without_restart(tmp_path):
    path = write(tmp_path, "pirate.yaml", PIRATE)
    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    assert library.get("pirate").system == "You talk like a pirate."
    path.write_text(PIRATE.replace("like a pirate", "like a very old pirate"), encoding="utf-8")
    assert library.get("pirate").system == "You talk like a very old pirate."


def test_library_stats_the_folder_at_most_once_per_recheck_interval(tmp_path):
    path = write(tmp_path, "pirate.yaml", PIRATE)
    library = PersonaLibrary(tmp_path, recheck_seconds=0.2)
    assert library.get("pirate").system == "You talk like a pirate."
    path.write_text(PIRATE.replace("like a pirate", "like a very old pirate"), encoding="utf-8")
    assert library.get("pirate").system == "You talk like a pirate."
    time.sleep(0.25)
    assert library.get("pirate").system == "You talk like a very old pirate."


def test_library_sees_new_and_deleted_files(tmp_path):
    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    assert library.names() == []
    path = write(tmp_path, "pirate.yaml", PIRATE)
    assert library.names() == ["pirate"]
    path.unlink()
    with pytest.raises(UnknownPersona):
        library.get("pirate")


def test_broken_edit_keeps_serving_the_last_good_persona(tmp_path, caplog):
    path = write(tmp_path, "pirate.yaml", PIRATE)
    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    library.get("pirate")
    path.write_text(PIRATE + "examples:\n  - role: bot\n    content: x\n", encoding="utf-8")
    with caplog.at_level(logging.ERROR, logger="bot.personas"):
        assert library.get("pirate").system == "You talk like a pirate."
    assert f"{path}:5: examples[0].role: must be user or assistant" in caplog.text
    assert library.errors == {path: [f"{path}:5: examples[0].role: must be user or assistant"]}


def test_fixing_a_broken_file_clears_its_error(tmp_path):
    path = write(tmp_path, "pirate.yaml", "name: pirate\n")
    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    assert library.names() == [] and path in library.errors
    path.write_text(PIRATE.replace("a pirate", "a fixed pirate"), encoding="utf-8")
    assert library.get("pirate").system == "You talk like a fixed pirate." and library.errors == {}


def test_two_files_claiming_one_name_are_reported(tmp_path):
    write(tmp_path, "pirate.yaml", PIRATE)
    write(tmp_path, "pirate.yml", PIRATE)
    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    assert library.names() == ["pirate"]
    assert "already defined" in library.errors[tmp_path / "pirate.yml"][0]


def test_unknown_persona_names_the_available_ones(tmp_path):
    write(tmp_path, "pirate.yaml", PIRATE)
    with pytest.raises(UnknownPersona) as info:
        PersonaLibrary(tmp_path, recheck_seconds=0).get("ninja")
    assert str(info.value) == "no persona named 'ninja' (available: pirate)"


def test_save_round_trips_through_the_file(tmp_path):
    library = PersonaLibrary(tmp_path / "personas")
    persona = Persona(
        name="poet", display_name="Poet", description="Speaks in verse.",
        system="You answer in rhyming couplets.\nKeep it short.",
        examples=[{"role": "user", "content": "Weather?"}, {"role": "assistant", "content": "Grey skies today,\nso"
                                                                                           " come what may."}],
        model={"temperature": 1.1, "max_tokens": 200}, knowledge=["poems"],
    )
    path = library.save(persona)
    assert path == tmp_path / "personas" / "poet.yaml"
    assert library.get("poet") == persona and parse_persona(path.read_text(), str(path)) == persona


def test_save_leaves_no_temporary_files(tmp_path):
    library = PersonaLibrary(tmp_path, recheck_seconds=0)
    library.save(Persona(name="poet", system="Rhyme."))
    library.save(Persona(name="poet", system="Rhyme twice."))
    assert [p.name for p in tmp_path.iterdir()] == ["poet.yaml"] and library.get("poet").system == "Rhyme twice."


def test_dump_leaves_out_defaults():
    assert yaml.safe_load(dump_persona(Persona(name="p", system="s"))) == {
        "name": "p", "display_name": "P", "system": "s\n"
    }


# ---------------------------------------------------------------------------------------------- cards


def test_card_import_maps_prose_to_system_and_dialogue_to_examples():
    persona = persona_from_card(CARD, None)
    assert persona.name == "captain-vera" and persona.display_name == "Captain Vera"
    assert "Captain Vera is a retired starship captain who mentors the user." in persona.system
    assert "calm, wry, precise" in persona.system and "observation deck" in persona.system
    assert persona.examples == [
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "*Captain Vera looks up from the star chart.* You're early, User."},
        {"role": "user", "content": "How do I plot a jump?"},
        {"role": "assistant", "content": "Carefully.\nThen twice."},
        {"role": "user", "content": "Hello."},
        {"role": "assistant", "content": "Coffee?"},
        {"role": "user", "content": "Please."},
        {"role": "assistant", "content": "Black, like the void."},
    ]
    assert persona.description == "A mentor for space-opera role play."


def test_card_import_uses_the_given_name():
    assert persona_from_card(CARD, "vera").name == "vera"


def test_card_without_a_name_asks_for_one():
    with pytest.raises(PersonaError, match="--name"):
        persona_from_card({"spec": "chara_card_v2", "data": {"description": "nameless"}}, None)


def test_card_is_read_from_a_character_png(tmp_path):
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)
    text = b"chara\0" + base64.b64encode(json.dumps(CARD).encode())
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"tEXt", text)
           + chunk(b"IDAT", zlib.compress(b"\0\0")) + chunk(b"IEND", b""))
    (tmp_path / "vera.png").write_bytes(png)
    assert load_card(tmp_path / "vera.png") == CARD


# ---------------------------------------------------------------------------------------------- CLI


def test_check_passes_on_the_shipped_personas():
    result = CliRunner().invoke(app, ["check"], env={"PERSONABOT_PERSONAS_DIR": str(SHIPPED)})
    assert result.exit_code == 0 and result.output.strip() == f"ok: {len(PersonaLibrary(SHIPPED).names())} personas"


def test_check_fails_with_every_error_and_its_line(tmp_path):
    write(tmp_path, "pirate.yaml", PIRATE)
    write(tmp_path, "comic.yaml", "name: comic\nsystem: hi\nexamples:\n  - {role: robot, content: beep}\n")
    write(tmp_path, "sre.yaml", "name: sre\nsytem: terse\n")
    result = CliRunner().invoke(app, ["check", str(tmp_path)])
    assert result.exit_code == 1
    assert result.output.splitlines() == [
        f"{tmp_path}/comic.yaml:4: examples[0].role: must be user or assistant",
        f"{tmp_path}/sre.yaml:1: system: required",
        f"{tmp_path}/sre.yaml:2: sytem: unknown key (did you mean 'system'?)",
    ]


def test_check_reports_a_missing_default_persona(tmp_path):
    write(tmp_path, "pirate.yaml", PIRATE)
    result = CliRunner().invoke(app, ["check"], env={"PERSONABOT_PERSONAS_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "default persona 'assistant'" in result.output


def test_list_marks_the_default_persona():
    result = CliRunner().invoke(app, ["list"], env={"PERSONABOT_PERSONAS_DIR": str(SHIPPED)})
    assert result.exit_code == 0
    assert "* assistant" in result.output and "Stand-up Comic" in result.output


def test_show_prints_yaml_that_loads_back():
    result = CliRunner().invoke(app, ["show", "comic"], env={"PERSONABOT_PERSONAS_DIR": str(SHIPPED)})
    assert parse_persona(result.output, "comic.yaml") == PersonaLibrary(SHIPPED).get("comic")


def test_import_writes_a_persona_file_the_library_loads(tmp_path):
    card = tmp_path / "vera.json"
    card.write_text(json.dumps(CARD))
    env = {"PERSONABOT_PERSONAS_DIR": str(tmp_path / "personas")}
    result = CliRunner().invoke(app, ["import", str(card), "--name", "vera"], env=env)
    assert result.exit_code == 0, result.output
    assert PersonaLibrary(tmp_path / "personas").get("vera").display_name == "Captain Vera"


def test_import_does_not_overwrite_without_force(tmp_path):
    card = tmp_path / "vera.json"
    card.write_text(json.dumps(CARD))
    write(tmp_path, "vera.yaml", PIRATE.replace("pirate", "vera"))
    result = CliRunner().invoke(app, ["import", str(card), "--name", "vera"],
                                env={"PERSONABOT_PERSONAS_DIR": str(tmp_path)})
    assert result.exit_code == 1 and "--force" in result.output
    assert "talk like a vera" in (tmp_path / "vera.yaml").read_text()
