"""Retrieval quality and latency.

Quality: recall@5 and nDCG@10 of dense, BM25 and hybrid search on bench/data/questions.jsonl, a labelled set
over real documents found on this machine: the long descriptions (READMEs) of installed packages and the
docstrings of Python's standard library modules. Each question is a human-written one-line summary (a
package's `Summary:`, a module docstring's first line) and its answer is the document it summarises; that
line is cut out of the document so a match has to be earned, not copied. Relevance is per document: the
chunk ranking is collapsed to documents (first appearance) before scoring.

Latency: p50/p99 of one query (encode + FAISS + FTS5 + fusion) at 10k and 100k chunks of synthetic text and
vectors, and FAISS alone, exact against HNSW, which is where vectors.HNSW_THRESHOLD comes from.

    python bench/retrieval.py                    # everything
    python bench/retrieval.py --write-questions  # regenerate bench/data/questions.jsonl from this machine
    python bench/retrieval.py --skip-latency --max-chars 3000

Honest quality (the figures the README reports): `--corpus postgres|git|all` indexes reference manuals nobody
here wrote, installed from Debian (postgresql-doc-15, git-doc), and asks the questions in
bench/data/corpora/<corpus>.json, written as a user would ask them, in their own words. Each set is split
deterministically (by a hash of the question) into a tuning half and a reporting half; figures are printed for
the reporting half, `--tune` prints the tuning half, on which constants may be chosen. Each set's `followups`
(a short question after another, nothing tuned on them) are searched alone and with the turn before, as the
engine searches them. Within one run every mode reuses each question's embedding.

    python bench/retrieval.py --corpus all --skip-latency
    python bench/retrieval.py --corpus postgres --tune --skip-latency
    python bench/retrieval.py --corpus all --skip-latency --rerank PATH   # plus hybrid re-ranked by a CrossEncoder
    python bench/retrieval.py --corpus all --skip-latency --baseline      # plus MiniLM over plain 1000-char pieces
    python bench/retrieval.py --corpus all --skip-latency --tune --lm-reader data/models/smollm2
                                      # plus a small language model re-ordering the top documents (lm_readers.py)
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import shutil
import importlib
import importlib.metadata
import json
import math
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bot.config import Settings  # noqa: E402
from bot.retrieval import Retriever  # noqa: E402
from bot.retrieval import search as ranking  # noqa: E402
from bot.retrieval.chunk import Chunk  # noqa: E402
from bot.retrieval.embed import Embedder  # noqa: E402
from bot.retrieval.store import FileEntry  # noqa: E402
from bot.retrieval.vectors import VectorIndex  # noqa: E402

QUESTIONS = Path(__file__).resolve().parent / "data" / "questions.jsonl"
CORPORA = Path(__file__).resolve().parent / "data" / "corpora"
CACHE = Path(tempfile.gettempdir()) / "personabot-bench"  # indexes kept between runs: only changed chunks re-embed
OFF_TOPIC = [
    "What is the capital of Peru?", "How long should I boil an egg?", "Who won the 1966 football world cup?",
    "What is the best fertiliser for tomatoes?", "How many moons does Jupiter have?",
    "Recommend a good red wine for pasta.", "What is the plot of Hamlet?", "How do I knit a scarf?",
    "When did the Roman empire fall?", "What's the weather like in Lisbon in May?",
    "How tall is Mount Kilimanjaro?", "Which vitamins are in spinach?", "Who painted the Mona Lisa?",
    "How do I change a bicycle tyre?", "What is the recipe for pancakes?", "Why is the sky blue?",
    "How many players are on a rugby team?", "What language is spoken in Brazil?",
    "What is the speed of a cheetah?", "How do tides work?",
]


def documents() -> list[dict]:
    """(file name, summary, body) for every package README and stdlib docstring worth a question."""
    docs = []
    for dist in importlib.metadata.distributions():
        meta = dist.metadata
        body = meta.get_payload() or meta.get("Description") or ""
        summary = (meta.get("Summary") or "").strip()
        if len(body) > 800 and len(summary) > 25 and summary.upper() != "UNKNOWN":
            kind = ".md" if "markdown" in (meta.get("Description-Content-Type") or "") else ".txt"
            name = re.sub(r"[^a-z0-9]+", "-", meta["Name"].lower())
            docs.append({"file": f"pypi-{name}{kind}", "question": summary, "body": body, "origin": f"pypi:{meta['Name']}"})
    warnings.filterwarnings("ignore")
    for module in sorted(sys.stdlib_module_names):
        if module.startswith("_") or module in {"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo"}:
            continue
        try:
            doc = (importlib.import_module(module).__doc__ or "").strip()
        except Exception:  # platform-specific modules
            continue
        first = doc.split("\n")[0].strip()
        rest = doc[len(first):].strip()
        if len(rest) > 400 and len(first) > 20:
            docs.append({"file": f"stdlib-{module}.txt", "question": first, "body": rest, "origin": f"stdlib:{module}"})
    unique = {d["file"]: d for d in docs}
    return sorted(unique.values(), key=lambda d: d["file"])


def write_questions() -> None:
    QUESTIONS.parent.mkdir(parents=True, exist_ok=True)
    with QUESTIONS.open("w") as out:
        for doc in documents():
            out.write(json.dumps({"question": doc["question"], "source": f"docs/{doc['file']}",
                                  "origin": doc["origin"]}) + "\n")
    print(f"wrote {sum(1 for _ in QUESTIONS.open())} questions to {QUESTIONS}")


def ndcg_at_10(rank: int | None) -> float:
    return 1 / math.log2(rank + 1) if rank is not None and rank <= 10 else 0.0


def doc_rank(sources: list[str], target: str) -> int | None:
    ranked = list(dict.fromkeys(sources))
    return ranked.index(target) + 1 if target in ranked else None


async def quality(embedder: Embedder, max_chars: int) -> None:
    questions = [json.loads(line) for line in QUESTIONS.open()]
    by_file = {d["file"]: d for d in documents()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        folder = root / "knowledge" / "docs"
        folder.mkdir(parents=True)
        usable = []
        for q in questions:
            doc = by_file.get(q["source"].removeprefix("docs/"))
            if doc is None:
                continue
            body = re.sub(re.escape(q["question"]), " ", doc["body"], flags=re.IGNORECASE)[:max_chars]
            (folder / doc["file"]).write_text(body)
            usable.append(q)
        settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=root / "data", PERSONABOT_KNOWLEDGE_DIR=root / "knowledge")
        retriever = await Retriever.open(settings, embedder=embedder, progress=True)
        report = await retriever.sync()
        print(f"{len(usable)} of {len(questions)} questions have their document here; "
              f"{len(report.added)} documents, {report.chunks} chunks")
        top1: list[float] = []
        print(f"{'mode':<8} {'recall@5':>9} {'nDCG@10':>8}")
        for mode in ("dense", "lexical", "hybrid"):
            recall = ndcg = 0.0
            for q in usable:
                hits = await retriever.search(q["question"], ["docs"], k=40, mode=mode)
                rank = doc_rank([h.source for h in hits], q["source"])
                recall += rank is not None and rank <= 5
                ndcg += ndcg_at_10(rank)
                if mode == "hybrid" and hits:
                    top1.append(max(h.similarity for h in hits[:5]))
            name = "bm25" if mode == "lexical" else mode
            print(f"{name:<8} {recall / len(usable):>9.3f} {ndcg / len(usable):>8.3f}")
        off = []
        for question in OFF_TOPIC:
            hits = await retriever.search(question, ["docs"], k=5)
            off.append(max((h.similarity for h in hits), default=0.0))
        pct = lambda xs: " ".join(f"p{p}={np.percentile(xs, p):.2f}" for p in (5, 25, 50, 75, 95))  # noqa: E731
        print(f"best cosine in top 5, answerable questions: {pct(top1)}")
        print(f"best cosine in top 5, off-topic questions:  {pct(off)}")
        await retriever.close()


def halves(questions: list[dict]) -> dict[str, list[dict]]:
    """The set in two equal halves, fixed by the questions' text: sorted by hash, alternately tune and report."""
    ordered = sorted(questions, key=lambda q: hashlib.sha256(q["question"].encode()).hexdigest())
    return {"tune": ordered[0::2], "report": ordered[1::2]}


def scores(ranked: list[str], relevant: set[str], ideal: int) -> dict[str, float]:
    """recall@1/@5 (a labelled source in the top k: a question's sources each answer it), MRR and binary
    nDCG@10 of one ranking; `ideal` is how many relevant items a perfect top 10 could hold."""
    ranks = [n for n, item in enumerate(ranked, 1) if item in relevant]
    first = ranks[0] if ranks else None
    dcg = sum(1 / math.log2(r + 1) for r in ranks if r <= 10)
    best = sum(1 / math.log2(r + 1) for r in range(1, min(ideal, 10) + 1))
    return {"r@1": float(first == 1), "r@5": float(first is not None and first <= 5),
            "mrr": 1 / first if first else 0.0, "ndcg@10": dcg / best if best else 0.0}


class QueryCache:
    """The embedder, remembering single-text encodes: every mode of one run asks the same questions, and the
    query vector is the same whichever ranking uses it."""

    def __init__(self, embedder: Embedder):
        self.embedder = embedder
        self.seen: dict[str, np.ndarray] = {}

    def encode(self, texts: list[str], progress=None) -> np.ndarray:
        if len(texts) != 1:
            return self.embedder.encode(texts, progress=progress)
        if texts[0] not in self.seen:
            self.seen[texts[0]] = self.embedder.encode(texts)
        return self.seen[texts[0]]

    def __getattr__(self, name):
        return getattr(self.embedder, name)


def naive_baseline(embedder: Embedder, name: str, paths: list[Path], questions: list[dict]) -> dict[str, float]:
    """The issue's naive baseline: MiniLM over plain 1000-character pieces of each document's text (no headings,
    no overlap), exact cosine, documents by first appearance in the top 10 pieces. Vectors are cached."""
    from bot.retrieval.parse import parse

    pieces: list[tuple[str, str]] = []
    for path in paths:
        text = "\n\n".join(block.text for block in parse(path.name, path.read_bytes()).blocks)
        pieces += [(path.name, text[i : i + 1000]) for i in range(0, len(text), 1000)]
    digest = hashlib.sha256("\0".join(t for _, t in pieces).encode()).hexdigest()[:16]
    cached = CACHE / name / f"naive-{digest}.npy"
    if cached.exists():
        vectors = np.load(cached)
    else:
        vectors = embedder.encode([t for _, t in pieces])
        np.save(cached, vectors)
    total: dict[str, float] = {}
    for q in questions:
        order = np.argsort(-(vectors @ embedder.encode([q["question"]])[0]))[:10]
        ranked = list(dict.fromkeys(pieces[i][0] for i in order))
        for key, value in scores(ranked, set(q["sources"]), len(q["sources"])).items():
            total[key] = total.get(key, 0.0) + value
    return {k: v / len(questions) for k, v in total.items()} | {f"p.{k}": float("nan") for k in total}


async def corpus_quality(embedder: Embedder, name: str, part: str, rerank: str | None = None,
                         baseline: bool = False, lm_readers: list[str] = ()) -> dict:
    started = time.perf_counter()
    spec = json.loads((CORPORA / f"{name}.json").read_text())
    root = Path(spec["root"])
    if not root.is_dir():
        sys.exit(f"{name}: {root} is missing; install it with: sudo apt-get install -y {spec['package']}")
    base = CACHE / name
    folder = base / "knowledge" / name
    folder.mkdir(parents=True, exist_ok=True)
    for doc in spec["documents"]:
        target = folder / doc
        if not target.exists() or target.stat().st_size != (root / doc).stat().st_size:
            shutil.copyfile(root / doc, target)
    settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=base / "data", PERSONABOT_KNOWLEDGE_DIR=base / "knowledge")
    retriever = await Retriever.open(settings, embedder=embedder, progress=True)
    await retriever.sync()
    indexed = time.perf_counter()
    retriever.embedder = QueryCache(embedder)
    chunks = {f.source.removeprefix(f"{name}/"): f.chunks for f in retriever.files(name)}
    questions = halves(spec["questions"])[part]
    table: dict[str, dict[str, float]] = {}
    default = retriever.fusion
    variants = [("dense", default, None), ("lexical", default, None), ("hybrid", "passages", None),
                ("hybrid", default, None)]
    if rerank:
        variants.append(("hybrid", default, ranking.Reranker(rerank)))
    for mode, fusion, reranker in variants:
        retriever.fusion, retriever.reranker = fusion, reranker
        total: dict[str, float] = {}
        for q in questions:
            hits = await retriever.search(q["question"], [name], k=10, mode=mode)  # as many as a reader is shown
            sources = [h.source.removeprefix(f"{name}/") for h in hits]
            relevant = set(q["sources"])
            doc = scores(list(dict.fromkeys(sources)), relevant, len(relevant))
            passages = scores([f"{s}#{n}" for n, s in enumerate(sources)],
                              {f"{s}#{n}" for n, s in enumerate(sources) if s in relevant},
                              sum(chunks.get(s, 0) for s in relevant))
            for key, value in [*doc.items(), *((f"p.{k}", v) for k, v in passages.items())]:
                total[key] = total.get(key, 0.0) + value
        label = {"lexical": "bm25"}.get(mode, mode) + ("-rrf" if mode == "hybrid" and fusion != default else "")
        table[label + ("+rerank" if reranker else "")] = {k: v / len(questions) for k, v in total.items()}
    retriever.fusion, retriever.reranker = default, None
    for folder in lm_readers:  # document level only: they re-order documents, not passages
        from lm_readers import rows  # beside this file; loads transformers only when asked

        for label, row in (await rows(retriever, name, questions, folder, scores)).items():
            table[label] = row | {f"p.{k}": float("nan") for k in row}
    followups = await followup_quality(retriever, name, spec.get("followups", []))
    await retriever.close()
    ranked = time.perf_counter()
    if baseline:
        table["naive"] = naive_baseline(embedder, name, [folder / doc for doc in spec["documents"]], questions)
    print(f"\n{name}: {len(spec['documents'])} documents, {sum(chunks.values())} chunks; {part} half, "
          f"{len(questions)} of {len(spec['questions'])} questions; index ready in {indexed - started:.1f} s, "
          f"{len(variants)} modes in {ranked - indexed:.1f} s"
          + (f", naive baseline in {time.perf_counter() - ranked:.1f} s" if baseline else ""))
    keys = list(next(iter(table.values())))
    width = max(10, *map(len, table))
    print(f"{'mode':<{width}} " + " ".join(f"{k:>9}" for k in keys) + "   (p.: passage level)")
    for mode, row in table.items():
        print(f"{mode:<{width}} " + " ".join(f"{row[k]:>9.3f}" for k in keys))
    if followups:
        print(f"follow-ups ({len(spec['followups'])}, all: nothing is tuned on them), hybrid, document level:")
        for label, row in followups.items():
            print(f"  {label:<26} " + " ".join(f"{k} {v:.3f}" for k, v in row.items()))
    return table


async def followup_quality(retriever: Retriever, name: str, followups: list[dict]) -> dict[str, dict[str, float]]:
    """Short follow-ups ("and restore it?") searched alone and as the engine searches them, with the
    previous user turn (engine._retrieval_query)."""
    from bot.engine import _retrieval_query

    out: dict[str, dict[str, float]] = {}
    for label, query in (("alone", lambda f: f["question"]),
                         ("with the previous turn", lambda f: _retrieval_query(
                             f["question"], [{"role": "user", "content": f["previous"]}]))):
        total: dict[str, float] = {}
        for f in followups:
            hits = await retriever.search(query(f), [name], k=10)
            ranked = list(dict.fromkeys(h.source.removeprefix(f"{name}/") for h in hits))
            for key, value in scores(ranked, set(f["sources"]), len(f["sources"])).items():
                total[key] = total.get(key, 0.0) + value
        out[label] = {k: v / len(followups) for k, v in total.items()}
    return out


def percentiles(samples: list[float]) -> str:
    return f"p50 {np.percentile(samples, 50) * 1e3:7.2f} ms  p99 {np.percentile(samples, 99) * 1e3:7.2f} ms"


async def latency(embedder: Embedder, sizes: list[int], queries: int) -> None:
    rng = np.random.default_rng(0)
    words = re.findall(r"[a-z]{4,}", " ".join(d["body"].lower() for d in documents()[:40]))
    vocab = sorted(set(words))
    dim = embedder.dim
    probe = rng.standard_normal((queries, dim)).astype(np.float32)
    probe /= np.linalg.norm(probe, axis=1, keepdims=True)
    for size in sizes:
        vectors = rng.standard_normal((size, dim)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        ids = np.arange(size, dtype=np.int64)
        for hnsw in (False, True):
            index = VectorIndex(dim, hnsw)
            started = time.perf_counter()
            index.add(ids, vectors)
            built = time.perf_counter() - started
            times = []
            for q in probe:
                started = time.perf_counter()
                index.search(q, 40)
                times.append(time.perf_counter() - started)
            print(f"faiss {'hnsw' if hnsw else 'flat'} {size:>7} vectors: {percentiles(times)}  (build {built:.1f} s)")
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            settings = Settings(_env_file=None, PERSONABOT_DATA_DIR=root / "data", PERSONABOT_KNOWLEDGE_DIR=root / "knowledge")
            retriever = await Retriever.open(settings, embedder=embedder)
            per_file = 500
            for first in range(0, size, per_file):
                count = min(per_file, size - first)
                chunks = [Chunk(" ".join(rng.choice(vocab, 120)), "synthetic", f"part {n}", 150) for n in range(count)]
                entry = FileEntry(f"synthetic/f{first}.txt", "synthetic", str(first), 0, 0, count)
                retriever.store.replace(entry, chunks, vectors[first : first + count])
            retriever.store.set_meta("dim", str(dim))
            retriever.indexes.reconcile("synthetic")
            texts = [" ".join(rng.choice(vocab, 8)) for _ in range(queries)]
            times = []
            for text in texts:
                started = time.perf_counter()
                await retriever.search(text, ["synthetic"], k=8)
                times.append(time.perf_counter() - started)
            kind = "hnsw" if retriever.indexes.by_collection["synthetic"].hnsw else "flat"
            print(f"hybrid query ({kind}) {size:>7} chunks: {percentiles(times)}  (encode + FAISS + BM25 + fusion)")
            await retriever.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--write-questions", action="store_true")
    parser.add_argument("--max-chars", type=int, default=4000, help="characters of each document to index")
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--skip-latency", action="store_true")
    parser.add_argument("--corpus", choices=["postgres", "git", "all", "legacy"], default="all",
                        help="reference manuals from Debian (the reported figures), or the old set beside the code")
    parser.add_argument("--tune", action="store_true", help="the tuning half instead of the reporting half")
    parser.add_argument("--baseline", action="store_true", help="also the naive baseline: MiniLM over plain "
                        "1000-character pieces, exact cosine (embeds each corpus once more, then cached)")
    parser.add_argument("--rerank", metavar="MODEL", help="also hybrid re-ranked by this sentence-transformers "
                        "CrossEncoder (a model dir or hub id), as PERSONABOT_RERANK_MODEL does")
    parser.add_argument("--lm-reader", metavar="MODEL_DIR", action="append", default=[],
                        help="also this causal language model re-ordering the top documents by query likelihood, "
                        "and HyDE with its answers (bench/lm_readers.py; 2-6 s of CPU a question); repeatable")
    args = parser.parse_args()
    if args.write_questions:
        write_questions()
        return
    embedder = Embedder.shared()
    embedder.encode(["warm up"])
    if not args.skip_quality and args.corpus == "legacy":
        asyncio.run(quality(embedder, args.max_chars))
    elif not args.skip_quality:
        for name in ("postgres", "git") if args.corpus == "all" else (args.corpus,):
            asyncio.run(corpus_quality(embedder, name, "tune" if args.tune else "report", args.rerank, args.baseline,
                                       args.lm_reader))
    if not args.skip_latency:
        asyncio.run(latency(embedder, [int(s) for s in args.sizes.split(",")], args.queries))


if __name__ == "__main__":
    main()
