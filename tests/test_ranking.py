"""The hybrid ranking on its own: documents first, so one long document cannot fill the top of the list."""
from bot.retrieval.search import fuse_by_document


def test_one_long_document_cannot_fill_the_top_five():
    # Dense and BM25 both rank eight passages of one long manual above the one passage of a short page.
    long_doc = list(range(1, 9))
    ranking = [*long_doc, 100]
    source_of = {**{i: "manual.html" for i in long_doc}, 100: "faq.html"}

    top = fuse_by_document([ranking, ranking], source_of)[:5]

    assert {source_of[i] for i, _ in top} == {"manual.html", "faq.html"}
    assert top[0][0] == 1 and top[1][0] == 100  # each document's best passage, best document first


def test_a_document_strong_on_both_sides_outranks_one_strong_on_one():
    dense, lexical = [1, 2, 3], [3, 4, 1]
    source_of = {1: "a", 2: "b", 3: "c", 4: "d"}

    order = [source_of[i] for i, _ in fuse_by_document([dense, lexical], source_of, [1.0, 1.0])]

    assert order[:2] == ["a", "c"] and set(order) == {"a", "b", "c", "d"}


def test_a_summary_line_lifts_its_document_but_not_above_its_own_best_passage():
    # Both sides put git-worktree's passages above git-stash's, but git-stash's first passage (its NAME line,
    # passage 12) is the summary most like the question.
    dense = lexical = [1, 2, 10, 11]
    source_of = {1: "git-worktree.html", 2: "git-worktree.html", 10: "git-stash.html", 11: "git-stash.html",
                 12: "git-stash.html"}
    assert source_of[fuse_by_document([dense, lexical], source_of, [1.0, 0.3])[0][0]] == "git-worktree.html"

    top = fuse_by_document([dense, lexical], source_of, [1.0, 0.3], leads=[12], lead_weight=2.0)

    assert [i for i, _ in top] == [10, 1, 11, 2, 12]  # git-stash first; its NAME line after its own passages


LOCKERS = "# Lockers\n\nLockers open with the four-digit code printed on the back of your badge.\n"
LOCKERS_NOW = "# Lockers\n\nLockers now open from the facilities app; badge codes no longer work.\n"


async def test_a_replaced_document_votes_with_its_new_first_passage(retriever):
    # The store keeps documents' first passages between searches (Store.leads): a replaced document must not
    # go on voting with the passage it no longer has.
    await retriever.add_upload("lockers.md", LOCKERS.encode(), "facilities")
    assert [h.source for h in await retriever.search("How do I open my locker?", ["facilities"])] == \
        ["facilities/lockers.md"]
    await retriever.add_upload("lockers.md", LOCKERS_NOW.encode(), "facilities")

    ids, vectors = retriever.store.leads(["facilities"])

    first = retriever.store.reader.execute("SELECT id, text FROM chunks WHERE ord = 0").fetchall()
    assert ids == [first[0][0]] and "facilities app" in first[0][1] and vectors.shape == (1, retriever.embedder.dim)
