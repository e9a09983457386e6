"""The scores `personabot eval` reports, as small functions a reader can check against the README's definitions.

Text is compared two ways. *Words*: content words (lower-cased letters and digits, a short stop-word list
removed, a plural `s` dropped), so "Outliers pull the mean" and "the mean is pulled by an outlier" share
`outlier` and `mean`. *Meaning*: cosine similarity of all-MiniLM-L6-v2 embeddings (the model knowledge
search uses), through an `embed` function that returns unit vectors, one row per text.

"Supports" is one rule used by both hallucination and transparency: evidence supports a claim when at least
`SUPPORT_OVERLAP` of the claim's content words occur in the evidence, or when the claim's embedding is within
`SUPPORT_SIMILARITY` cosine of one of the evidence's sentences.
"""
from __future__ import annotations

import re
from collections import Counter
from collections.abc import Callable, Sequence

import numpy as np

Embed = Callable[[list[str]], np.ndarray]

SUPPORT_OVERLAP = 0.6  # share of a claim's content words found in the evidence
SUPPORT_SIMILARITY = 0.6  # MiniLM cosine between a claim and one evidence sentence
CORRECT_RECALL = 0.5  # an answer is correct when it holds at least half the reference's content words
MIN_CLAIM_WORDS = 3  # "Ha!" or "Folks." claim nothing

STOPWORDS = frozenset("""
a an the and or but if then so of to in on at by for with from as is are was were be been being am it its
this that these those there here i you he she we they me him her us them my your our their his what which
who whom when where why how do does did doing have has had having not no nor can could will would shall
should may might must just than too very also about into over under again out up down off only own same
such some any each few more most other all both s t don ll re ve d m o y let lets get got
""".split())

_WORD = re.compile(r"[a-z0-9]+")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")
_CITATION = re.compile(r"\[(\d+(?:\s*,\s*\d+)*)\]")
_DECLINE = re.compile("|".join([
    r"\bno sources?\b",
    r"\b(?:do not|don't|dont|cannot|can't|cant|couldn't|could not) (?:know|say|tell|answer|find|be sure)\b",
    r"\bnot sure\b",
    r"\bno (?:information|idea|data|record|way of knowing|way to know)\b",
    r"\bnot (?:in|covered by) (?:the|my|our) (?:knowledge|documents|sources|notes)\b",
    r"\bunable to (?:answer|find|say|tell)\b",
    r"\bi have nothing\b",
]), re.IGNORECASE)


# ---------------------------------------------------------------------------------------------------- words


def content_words(text: str) -> list[str]:
    words = []
    for word in _WORD.findall(text.lower()):
        if word in STOPWORDS:
            continue
        if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
            word = word[:-1]
        words.append(word)
    return words


def token_f1(answer: str, reference: str) -> float:
    """SQuAD-style F1 over content words (counted with repeats): 1.0 = the same words, 0.0 = none shared."""
    got, want = Counter(content_words(answer)), Counter(content_words(reference))
    common = sum((got & want).values())
    if not common:
        return 0.0
    precision, recall = common / sum(got.values()), common / sum(want.values())
    return 2 * precision * recall / (precision + recall)


def reference_recall(answer: str, reference: str) -> float:
    """Share of the reference's distinct content words that the answer contains."""
    want = set(content_words(reference))
    return len(want & set(content_words(answer))) / len(want) if want else 0.0


def correct(answer: str, reference: str) -> bool:
    """The yes/no verdict dynamism waits for: the answer holds at least half of the reference's content words."""
    return reference_recall(answer, reference) >= CORRECT_RECALL


def word_overlap(claim: str, evidence: str) -> float:
    """Share of the claim's distinct content words found in the evidence."""
    words = set(content_words(claim))
    return len(words & set(content_words(evidence))) / len(words) if words else 0.0


# ---------------------------------------------------------------------------------------------------- sentences


def sentences(text: str) -> list[str]:
    """Sentences and lines, citation markers removed."""
    plain = _CITATION.sub("", text)
    return [s.strip() for s in _SENTENCE_END.split(plain) if s.strip()]


def declines(text: str) -> bool:
    """Whether a reply says it cannot answer ("I have no source for that", "I don't know", "not sure")."""
    return bool(_DECLINE.search(text))


def claims(text: str) -> list[str]:
    """The sentences that assert something: at least MIN_CLAIM_WORDS content words, and not a refusal."""
    return [s for s in sentences(text) if len(content_words(s)) >= MIN_CLAIM_WORDS and not declines(s)]


def cited_numbers(text: str) -> list[int]:
    """The passage numbers a reply cites in its own words: `[2]`, `[1, 3]`."""
    found: list[int] = []
    for group in _CITATION.findall(text):
        found += [int(n) for n in group.split(",") if int(n) not in found]
    return found


# ---------------------------------------------------------------------------------------------------- meaning


def similarity(a: str, b: str, embed: Embed) -> float:
    vectors = embed([a, b])
    return float(vectors[0] @ vectors[1])


def supported(claims_: Sequence[str], evidence: Sequence[str], embed: Embed) -> list[bool]:
    """For each claim, whether some evidence text supports it (the module docstring's rule)."""
    if not claims_:
        return []
    if not evidence:
        return [False] * len(claims_)
    by_words = [any(word_overlap(c, e) >= SUPPORT_OVERLAP for e in evidence) for c in claims_]
    pieces = [s for e in evidence for s in sentences(e)] or list(evidence)
    vectors = embed(list(claims_) + pieces)
    best = (vectors[: len(claims_)] @ vectors[len(claims_):].T).max(axis=1)
    return [w or float(b) >= SUPPORT_SIMILARITY for w, b in zip(by_words, best)]


def voice_similarity(replies: Sequence[str], examples: Sequence[str], embed: Embed) -> list[float]:
    """Each reply's mean cosine to the persona's example replies: how much it sounds like them."""
    if not replies or not examples:
        return []
    vectors = embed(list(replies) + list(examples))
    return [float(v) for v in (vectors[: len(replies)] @ vectors[len(replies):].T).mean(axis=1)]


# ---------------------------------------------------------------------------------------------------- shares


def mean(values: Sequence[float | bool]) -> float | None:
    return float(np.mean([float(v) for v in values])) if values else None
