"""Small language models as the reader that re-orders the top documents: the README's "tried as that reader".

A cross-encoder is the lever left for Git's recall@1, and none installs here; the language models that do
(SmolLM2-135M-Instruct, Gemma 3 270M: `personabot models pull`) are measured instead, two ways:

- query likelihood (UPR, Sachan et al. 2022): how likely the model finds the question after a document's
  first passage, after its best passage, or both summed, as the mean log-probability of the question's
  tokens; alone (a = 0) and added to the fused rank, `score - a * ln(rank)`;
- HyDE (Gao et al. 2022): the model answers first, in a sentence or two, and the question plus that answer is
  searched (a model with a chat template only).

Only the default's top TOP documents are re-ordered; the rest keep their order. `bench/retrieval.py
--lm-reader MODEL_DIR` prints these rows beside the others, for the half it runs on.
"""
from __future__ import annotations

import math
from pathlib import Path

TOP = 6
MIXES = (0.0, 0.25, 0.5, 1.0, 2.0)
HYDE_SYSTEM = "Answer in one or two sentences."


class Reader:
    """A causal language model from a folder (`data/models/smollm2`), scoring and answering on the CPU."""

    def __init__(self, folder: str | Path):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.torch = torch
        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def likelihood(self, contexts: list[str], question: str, template: str) -> list[float]:
        """Mean log P(question tokens | template filled with each context), one batch for all contexts."""
        torch = self.torch
        asked = self.tokenizer(" " + question, add_special_tokens=False)["input_ids"]
        pairs = [(self.tokenizer(template.format(c=c), add_special_tokens=False)["input_ids"][-300:], asked)
                 for c in contexts]
        width = max(len(c) + len(q) for c, q in pairs)
        ids = torch.full((len(pairs), width), self.tokenizer.pad_token_id or 0)
        mask = torch.zeros((len(pairs), width), dtype=torch.long)
        for n, (c, q) in enumerate(pairs):
            ids[n, : len(c) + len(q)] = torch.tensor(c + q)
            mask[n, : len(c) + len(q)] = 1
        with torch.no_grad():
            logits = self.model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)
        return [logits[n, torch.arange(len(c) - 1, len(c) + len(q) - 1), torch.tensor(q)].mean().item()
                for n, (c, q) in enumerate(pairs)]

    def answer(self, question: str) -> str:
        messages = [{"role": "system", "content": HYDE_SYSTEM}, {"role": "user", "content": question}]
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        ids = ids if self.torch.is_tensor(ids) else ids["input_ids"]
        with self.torch.no_grad():
            out = self.model.generate(ids, max_new_tokens=48, do_sample=False)
        return self.tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def _title(source: str) -> str:
    return source.rsplit("/", 1)[-1].rsplit(".", 1)[0]


async def rows(retriever, name: str, questions: list[dict], folder: str, score) -> dict[str, dict[str, float]]:
    """Document-level scores (`score(ranked, relevant, ideal)`, bench/retrieval.py's) of every reader and mix
    over `questions`, keyed by row label."""
    reader = Reader(folder)
    ids, _ = retriever.store.leads([name])
    source_of = retriever.store.sources(ids)
    lead = {source_of[i]: row.text for i, row in retriever.store.chunks(ids).items()}
    tag = Path(folder).name
    totals: dict[str, dict[str, float]] = {}

    def add(label: str, ranked: list[str], q: dict) -> None:
        for key, value in score(ranked, set(q["sources"]), len(q["sources"])).items():
            totals.setdefault(label, {}).setdefault(key, 0.0)
            totals[label][key] += value / len(questions)

    for q in questions:
        hits = await retriever.search(q["question"], [name], k=30)
        docs = list(dict.fromkeys(h.source for h in hits))
        head, rest = docs[:TOP], docs[TOP:]
        best: dict[str, str] = {}
        for hit in hits:
            best.setdefault(hit.source, hit.text)
        first = reader.likelihood([f"{_title(d)}\n{lead.get(d, '')[:600]}" for d in head], q["question"],
                                  "Document: {c}\n\nA question this document answers:")
        passage = reader.likelihood([best[d][:1200] for d in head], q["question"],
                                    "Passage: {c}\n\nA question this passage answers:")
        for what, values in (("first passage", first), ("best passage", passage),
                             ("both", [a + b for a, b in zip(first, passage)])):
            for a in MIXES:
                mixed = [v - a * math.log(n + 1) for n, v in enumerate(values)]
                order = [d for _, d in sorted(zip(mixed, head), key=lambda pair: -pair[0])]
                add(f"{tag} QL {what}, a={a:g}", [_plain(d, name) for d in order + rest], q)
        if reader.tokenizer.chat_template:  # a pretrained model (Gemma 3 270M here) has no way to be asked
            searched = await retriever.search(f"{q['question']}\n{reader.answer(q['question'])}", [name], k=10)
            add(f"{tag} HyDE", list(dict.fromkeys(_plain(h.source, name) for h in searched)), q)
    return totals


def _plain(source: str, name: str) -> str:
    return source.removeprefix(f"{name}/")
