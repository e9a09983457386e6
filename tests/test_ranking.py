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
