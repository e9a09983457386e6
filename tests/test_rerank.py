"""The cross-encoder path (PERSONABOT_RERANK_MODEL). No cross-encoder ships in a package and tests never reach
a hub, so this one is built here: a one-layer BERT with MiniLM's tokenizer and random weights, saved and
loaded through sentence-transformers' `CrossEncoder` like any installed model. Its scores mean nothing;
what is checked is that search order follows them."""
from __future__ import annotations

import csv
import heapq
import json
import shelve

import pytest

from bot.config import Settings
from bot.retrieval import Retriever
from bot.retrieval.search import Reranker

MODULES = {"heapq": heapq, "json": json, "csv": csv, "shelve": shelve}
QUESTION = "How do I read rows from a file?"


@pytest.fixture(scope="module")
def cross_encoder(tmp_path_factory):
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    from bot.retrieval.embed import default_model

    path = tmp_path_factory.mktemp("tiny-cross-encoder")
    tokenizer = AutoTokenizer.from_pretrained(default_model())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=512, num_labels=1)
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


async def test_search_ranks_documents_by_the_cross_encoders_best_passage(tmp_path, embedder, cross_encoder):
    folder = tmp_path / "knowledge" / "stdlib"
    folder.mkdir(parents=True)
    for name, module in MODULES.items():
        (folder / f"{name}.txt").write_text(module.__doc__)
    settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=tmp_path / "data",
                        PERSONABOT_KNOWLEDGE_DIR=tmp_path / "knowledge", PERSONABOT_RERANK_MODEL=cross_encoder)
    retriever = await Retriever.open(settings, embedder=embedder)
    try:
        await retriever.sync()
        assert retriever.reranker is not None and retriever.reranker.source == cross_encoder
        reranker, retriever.reranker = retriever.reranker, None
        fused = await retriever.search(QUESTION, ["stdlib"], k=reranker.candidates)
        retriever.reranker = reranker
        reranked = await retriever.search(QUESTION, ["stdlib"], k=len(fused))
    finally:
        await retriever.close()

    judged = Reranker(cross_encoder).scores(QUESTION, [hit.text for hit in fused])
    best: dict[str, float] = {}
    for hit, score in zip(fused, judged):
        best[hit.source] = max(score, best.get(hit.source, float("-inf")))
    by_cross_encoder = sorted(best, key=lambda s: -best[s])
    assert list(dict.fromkeys(hit.source for hit in fused)) != by_cross_encoder  # it has something to change
    assert list(dict.fromkeys(hit.source for hit in reranked)) == by_cross_encoder
    assert {(h.source, h.text) for h in reranked} == {(h.source, h.text) for h in fused}  # re-ordered, not changed
