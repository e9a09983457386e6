"""`personabot eval`: each variant answers through the real engine, and the scores move the way their
definitions say on cases built to move them. Replies that must be controlled come from the scriptable
OpenAI-compatible server; the end-to-end CLI run uses a tiny GPT-2 built here, fine-tuned for a few steps."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from openai_server import openai_server  # noqa: F401  (fixture)
from typer.testing import CliRunner

from bot.cli import eval as eval_cli
from bot.config import Settings
from bot.evaluation import EvalConfig, EvalError, evaluate, read_questions
from bot.evaluation.questions import QuestionFileError
from tiny_gpt2 import build_tiny_gpt2

HOLIDAYS = "# Holidays\n\nEvery employee gets 27 days of paid holiday a year.\n"
PARTY = "# Holiday party\n\nThe holiday party is held in December in the office canteen.\n"
CLERK = """\
name: clerk
display_name: Clerk
system: You are a cheerful office clerk who answers in rhymes.
examples:
  - {role: user, content: Where is the stapler?}
  - {role: assistant, content: "On the shelf, by the door, where it always was before!"}
model: {max_tokens: 40}
"""


def write_questions(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def office(tmp_path) -> tuple[Path, Path]:
    """A personas folder with the clerk and a knowledge folder with the `handbook` collection."""
    personas, knowledge = tmp_path / "personas", tmp_path / "knowledge"
    personas.mkdir()
    (personas / "clerk.yaml").write_text(CLERK)
    (knowledge / "handbook").mkdir(parents=True)
    (knowledge / "handbook" / "holidays.md").write_text(HOLIDAYS)
    (knowledge / "handbook" / "party.md").write_text(PARTY)
    return personas, knowledge


@pytest.fixture
def served(tmp_path, office, openai_server) -> Settings:
    personas, knowledge = office
    return Settings(_env_file=None, OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=openai_server.base_url,
                    PERSONABOT_DATA_DIR=tmp_path / "data", PERSONABOT_PERSONAS_DIR=personas,
                    PERSONABOT_KNOWLEDGE_DIR=knowledge)


def grounded(messages: list[dict]) -> bool:
    """Whether the engine gave the model the knowledge base: passages, or the instruction that none match."""
    return "knowledge base" in messages[0]["content"]


def passage_number(messages: list[dict], source: str) -> int:
    """The number the engine gave `source`'s passage in the system message ("[2] handbook/party.md § ...")."""
    return int(re.search(rf"\[(\d+)\] {re.escape(source)}", messages[0]["content"]).group(1))


def config(tmp_path: Path, questions: Path, **kw) -> EvalConfig:
    return EvalConfig(persona="clerk", questions=questions, out=tmp_path / "out", variants=["base", "rag"],
                      collections=["handbook"], progress=False, **kw)


async def test_the_variant_given_the_answer_scores_higher_on_accuracy(tmp_path, served, openai_server):
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question": "How many days of paid holiday do I get?", "answer": "27 days of paid holiday a year."}])
    # Only the grounded variant sees the handbook, so only it can repeat what it says.
    openai_server.reply_with(lambda m: "You get 27 days of paid holiday a year [1]." if grounded(m)
                             else "Ask me about the weather tomorrow, dear colleague.")

    report = await evaluate(config(tmp_path, questions), served, say=lambda _: None)

    base, rag = report["variants"]["base"]["accuracy"], report["variants"]["rag"]["accuracy"]
    assert rag["f1"] > base["f1"] and rag["similarity"] > base["similarity"]
    assert (rag["correct"], base["correct"]) == (1.0, 0.0)


async def test_an_unanswerable_question_answered_counts_as_a_hallucination(tmp_path, served, openai_server):
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question": "What was our churn rate last quarter?", "answerable": False}])
    openai_server.reply_with(lambda m: "Churn was 7.3 percent last quarter, down from nine." if grounded(m)
                             else "I have no source for that, I'm afraid.")

    report = await evaluate(config(tmp_path, questions), served, say=lambda _: None)

    assert report["variants"]["rag"]["hallucination"]["answered_unanswerable"] == 1.0
    assert report["variants"]["base"]["hallucination"]["answered_unanswerable"] == 0.0


async def test_sentences_no_passage_or_reference_supports_count_as_unsupported(tmp_path, served, openai_server):
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question": "How many days of paid holiday do I get?", "answer": "27 days of paid holiday a year."}])
    openai_server.reply_with(lambda m: "Every employee gets 27 days of paid holiday a year." if grounded(m) else
                             "Every employee gets 27 days of paid holiday a year. The CEO also owns three racehorses.")

    report = await evaluate(config(tmp_path, questions), served, say=lambda _: None)

    assert report["variants"]["rag"]["hallucination"]["unsupported_sentences"] == 0.0
    assert report["variants"]["base"]["hallucination"]["unsupported_sentences"] == 0.5


async def test_a_citation_to_a_passage_lacking_the_text_lowers_transparency(tmp_path, served, openai_server):
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question": "How many days of paid holiday do I get each year?", "answer": "27 days a year."},
        {"question": "How many days of paid holiday does an employee get?", "answer": "27 days a year."}])

    def answer(messages: list[dict]) -> str:
        if not grounded(messages):
            return "Every employee gets 27 days of paid holiday a year."
        right = "each year" in messages[-1]["content"]  # the first question cites the right passage
        cited = passage_number(messages, "handbook/holidays.md" if right else "handbook/party.md")
        return f"Every employee gets 27 days of paid holiday a year [{cited}]."

    openai_server.reply_with(answer)

    report = await evaluate(config(tmp_path, questions), served, say=lambda _: None)

    rag = [row for row in report["answers"] if row["variant"] == "rag"]
    assert [row["transparent"] for row in rag] == [True, False]
    assert report["variants"]["rag"]["transparency"]["cited_support"] == 0.5
    assert report["variants"]["base"]["transparency"]["cited_support"] == 0.0  # it cites nothing


async def test_replies_in_the_personas_voice_score_higher_on_style_than_plain_ones(tmp_path, served, openai_server):
    questions = write_questions(tmp_path / "q.jsonl", [{"question": "Where is the printer?"},
                                                       {"question": "Where are the pens?"}])
    rhyme = "On the shelf, by the door, where it always was before!"

    def answer(messages: list[dict]) -> str:
        if "rhymes" not in messages[0]["content"]:  # the neutral persona's plain answer
            return "The item is in the storage room on the second floor."
        return rhyme if grounded(messages) else "It is in the storage room on the second floor."

    openai_server.reply_with(answer)

    report = await evaluate(config(tmp_path, questions), served, say=lambda _: None)

    rag, base = report["variants"]["rag"]["style"], report["variants"]["base"]["style"]
    assert rag["margin"] > 0.3 and rag["wins"] == 1.0
    assert abs(base["margin"]) < rag["margin"]


async def test_dynamism_counts_the_seconds_until_a_synced_document_is_cited(tmp_path, served, openai_server):
    new = tmp_path / "parking.md"
    new.write_text("# Parking\n\nStaff park on level minus two of the garage, bays 40 to 80.\n")
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question": "How many days of paid holiday do I get?", "answer": "27 days of paid holiday a year."},
        {"question": "Where do staff park?", "answer": "Level minus two of the garage, bays 40 to 80.",
         "sources": ["parking.md"]}])
    openai_server.reply_with(lambda m: "Level minus two of the garage, bays 40 to 80 [1]."
                             if "bays 40 to 80" in m[0]["content"] else "I have no source for that.")

    report = await evaluate(config(tmp_path, questions, dynamism=new), served, say=lambda _: None)

    rag, base = report["variants"]["rag"]["dynamism"], report["variants"]["base"]["dynamism"]
    assert rag["update"] == "sync" and rag["correct"] == 1.0 and rag["seconds"] >= rag["update_seconds"] > 0
    assert base["update"] == "none" and base["correct"] == 0.0 and base["seconds"] is None
    assert report["questions"] == 1  # the document's question is held out of the main run
    assert not (served.knowledge_dir / "handbook" / "parking.md").exists()  # only the private copy changed


async def test_eval_refuses_a_drafted_question_file_until_a_person_edits_it(tmp_path, served):
    runner = CliRunner()
    drafted = runner.invoke(eval_cli.app, ["make-questions", "--collection", "handbook"],
                            env={"PERSONABOT_KNOWLEDGE_DIR": str(served.knowledge_dir)})
    assert drafted.exit_code == 0, drafted.output
    path = tmp_path / "drafts.jsonl"
    path.write_text(drafted.stdout)
    rows = read_questions(path).questions
    assert rows and all(q.draft for q in rows)
    assert any("27 days of paid holiday" in (q.answer or "") for q in rows)
    assert any(not q.answerable for q in rows)  # a placeholder for a question the documents do not answer

    with pytest.raises(EvalError, match="drafts from `eval make-questions`"):
        await evaluate(config(tmp_path, path), served, say=lambda _: None)


def test_a_bad_question_file_is_reported_with_its_lines(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text('{"question": "ok?"}\n{"question": ""}\nnot json\n{"question": "x", "answerable": "no"}\n')

    with pytest.raises(QuestionFileError) as caught:
        read_questions(path)

    assert [e.split(": ")[0] for e in caught.value.errors] == [f"{path}:2", f"{path}:3", f"{path}:4"]


def test_eval_cli_runs_all_four_variants_on_a_tiny_gpt2_and_writes_the_report(tmp_path, office, monkeypatch):
    personas, knowledge = office
    base = build_tiny_gpt2(tmp_path / "tiny", n_positions=1024)
    new = tmp_path / "parking.md"
    new.write_text("Staff park on level minus two of the garage.\n")
    questions = write_questions(tmp_path / "q.jsonl", [
        {"question": "How many days of paid holiday do I get?", "answer": "27 days of paid holiday a year."},
        {"question": "What was our churn rate last quarter?", "answerable": False},
        {"question": "Where do staff park?", "answer": "Level minus two of the garage.", "sources": ["parking.md"]}])
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "PERSONABOT_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    env = {"PERSONABOT_DATA_DIR": str(tmp_path / "data"), "PERSONABOT_PERSONAS_DIR": str(personas),
           "PERSONABOT_KNOWLEDGE_DIR": str(knowledge), "PERSONABOT_BACKEND": "local"}
    out = tmp_path / "report"

    result = CliRunner().invoke(eval_cli.app, [
        "--persona", "clerk", "--questions", str(questions), "--collection", "handbook", "--base", str(base),
        "--train-steps", "2", "--max-tokens", "8", "--dynamism", str(new), "--out", str(out), "--no-progress"],
        env=env)

    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert list(report["variants"]) == ["base", "rag", "finetuned", "finetuned+rag"]
    tuned = report["variants"]["finetuned"]
    assert tuned["cost"]["training_seconds"] > 0 and tuned["dynamism"]["update"] == "retrain"
    assert report["variants"]["finetuned+rag"]["dynamism"]["update"] == "sync"
    assert report["variants"]["rag"]["cost"]["index_seconds"] > 0
    assert all(v["cost"]["completion_tokens"] > 0 for v in report["variants"].values())
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = result.stdout.splitlines()
    assert table[0].split()[:4] == ["variant", "F1", "sim", "correct"]
    assert [line.split()[0] for line in table[2:6]] == ["base", "rag", "finetuned", "finetuned+rag"]
