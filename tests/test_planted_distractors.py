"""The hard variant of ``benchmarks/lm_planted_facts.py`` (``--distractors``): what its distractors contain.

Checked against the facts' own strings, not the templates: the ground truth of a fact is exactly its 3
statements; subject distractors name the subject and not the answer, answer distractors the reverse; the
swapped distractors are a statement with the two names exchanged (found by string substitution) and never a
statement of any fact; the control facts contribute distractors only; and TF-IDF / BM25 cannot tell a swapped
distractor from the statement it was made from (the lexical confound the variant is for).
"""

import importlib.util
import re
import sys
from pathlib import Path

import numpy as np
import pytest

from influent.retrieval import CandidateFilter


@pytest.fixture(scope="module")
def bench():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "lm_planted_facts.py"
    spec = importlib.util.spec_from_file_location("lm_planted_facts_under_test", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look the module up while the class is built
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def exchanged(text: str, a: str, b: str) -> str:
    return text.replace(a, "\0").replace(b, a).replace("\0", b)


def test_distractors_name_one_side_or_swap_roles(bench):
    facts = bench.invented_facts(30, seed=0)
    facts, controls = facts[:25], facts[25:]
    planted, negatives, control_texts = bench.fact_texts(facts, controls, distractors=True)
    every_statement = {t for f in facts + controls for t in f.statements()}
    assert {len(g) for g in planted} == {3}
    for i, f in enumerate(facts):
        assert planted[i] == f.statements()
        subject, answer = words(f.subject), words(f.answer)
        for text in negatives["entity"][i]:
            assert subject <= words(text) and not answer & words(text), text
        for text in negatives["answer"][i]:
            assert answer <= words(text) and not subject & words(text), text
        assert len(negatives["swapped"][i]) == 3
        for text in negatives["swapped"][i]:
            assert exchanged(text, f.subject, f.answer) in planted[i]
            assert text not in every_statement
        shared = [len(words(t) & words(f.prompt() + " " + f.answer)) for t in negatives["entity"][i]
                  + negatives["answer"][i]]
        assert np.mean(shared) >= np.mean([len(words(t) & words(f.prompt() + " " + f.answer))
                                           for t in planted[i]])
    assert sum(len(g[i]) for g in negatives.values() for i in range(25)) == 25 * bench.N_DISTRACTORS
    # the control facts: their distractors are in the corpus, their statements never
    assert len(control_texts) == 5 * bench.N_DISTRACTORS
    assert not set(control_texts) & every_statement
    everything = [t for g in planted for t in g] + [t for k in negatives.values() for g in k for t in g]
    everything += control_texts
    assert len(set(everything)) == len(everything)


def test_without_distractors_the_corpus_is_the_original(bench):
    facts = bench.invented_facts(25, seed=0)
    assert bench.invented_facts(30, seed=0)[:25] == facts  # the controls do not change the facts
    planted, negatives, control_texts = bench.fact_texts(facts, [], distractors=False)
    assert planted == [f.statements() for f in facts] and negatives == {} and control_texts == []


def test_lexical_scores_cannot_separate_swapped_from_planted(bench):
    facts = bench.invented_facts(5, seed=0)
    planted, negatives, _ = bench.fact_texts(facts, [], distractors=True)
    texts = [t for g in planted for t in g] + [t for g in negatives["swapped"] for t in g]
    ranker = CandidateFilter(texts)
    for i, f in enumerate(facts):
        for method in ("tfidf", "bm25"):
            scores = ranker.relevance(f.prompt() + " " + f.answer, method)
            np.testing.assert_allclose(np.sort(scores[3 * i: 3 * i + 3]),
                                       np.sort(scores[15 + 3 * i: 15 + 3 * i + 3]), rtol=1e-9)


def test_rank_metrics_counts_planted_and_distractors(bench):
    # 8 sequences; scores put position 5 first, then 2, 7, 0, ...; ties broken by position
    values = np.array([5.0, 1.0, 7.0, 0.0, 1.0, 9.0, -1.0, 6.0])
    m = bench.rank_metrics(values, [2, 6, 1], {"swapped": [5, 3], "entity": [7]})
    # ranks: 5->1, 2->2, 7->3, 0->4, 1->5, 4->6, 3->7, 6->8
    assert m["mrr"] == 0.5 and m["last_rank"] == 8.0
    assert m["recall@3"] == pytest.approx(1 / 3) and m["recall@10"] == 1.0
    assert m["swapped@10"] == 1.0 and m["entity@10"] == 1.0


def test_association_ranking_is_the_fact_score_minus_its_contrasts(bench):
    # 2 facts, 3 training sequences; rows 0-1 the fact queries, rows 2-4 contrast queries (owners 0, 0, 1)
    scores = np.array([[4.0, 1.0, 0.0], [2.0, 2.0, 2.0], [3.0, 1.0, -2.0], [1.0, 1.0, 0.0], [0.0, 5.0, 1.0]])
    out = bench.association_rankings({"ekfac": scores, "ekfac_cosine": scores}, 2, np.array([2, 3, 4]),
                                     np.array([0, 0, 1]))
    assert set(out) == {"ekfac_association"}  # no contrast of the cosine (its query norm means nothing here)
    np.testing.assert_allclose(out["ekfac_association"], [[2.0, 0.0, 1.0], [2.0, -3.0, 1.0]])


def test_contrast_queries_put_each_answer_under_the_other_questions(bench):
    class Words:  # a whitespace tokenizer: enough for pair_ids / pair_sequence
        def __init__(self):
            self.vocab = []

        def __call__(self, text, add_special_tokens=True):
            ids = []
            for w in text.split():
                if w not in self.vocab:
                    self.vocab.append(w)
                ids.append(self.vocab.index(w))
            return {"input_ids": ids}

        def decode(self, ids, skip_special_tokens=True):
            return " ".join(self.vocab[i] for i in ids)

    facts = bench.invented_facts(10, seed=0)  # 2 per relation
    pairs = bench.contrast_queries(Words(), facts, facts)
    assert [i for _, i in pairs] == list(range(10))
    for query, i in pairs:
        other = facts[(i + 5) % 10]
        assert other.relation == facts[i].relation
        assert query.text.startswith(other.prompt()) and query.text.endswith(facts[i].answer)
