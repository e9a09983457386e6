"""`personabot eval`: RAG against fine-tuning, measured on a persona and a collection of its owner's choosing.

questions: the question file and the drafts `eval make-questions` writes · answering: an engine of its own
that answers each question as `/ask` would, recording passages, words and usage · scores: the definitions, as
small functions · grading: each answer graded, each variant summed up · runner: the whole run · report: the
table, report.json and report.png.
"""
from bot.evaluation.answering import EvalError
from bot.evaluation.questions import QuestionFileError, draft_questions, read_questions
from bot.evaluation.runner import VARIANTS, EvalConfig, evaluate

__all__ = ["VARIANTS", "EvalConfig", "EvalError", "QuestionFileError", "draft_questions", "evaluate", "read_questions"]
