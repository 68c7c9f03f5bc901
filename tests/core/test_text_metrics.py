"""text_similarity's metrics: numbers worked by hand, then the reference implementations agree."""

from __future__ import annotations

import math

import pytest

from core.rewards.text_metrics import (
    TEXT_METRICS,
    bleu,
    gleu,
    longest_common_subsequence,
    meteor,
    rouge_l,
    rouge_n,
    words,
)

CAT = words("The cat sat on the mat.")
CAT_IS = words("the cat is on the mat")


def test_words_are_lower_cased_unicode_words():
    assert CAT == ["the", "cat", "sat", "on", "the", "mat"]
    assert words("Ünïcode, naïve café!") == ["ünïcode", "naïve", "café"]


def test_rouge_by_hand():
    # 5 of 6 words shared each way; 3 of 5 bigrams (the cat, on the, the mat); LCS the cat on the mat.
    assert rouge_n(CAT, CAT_IS, 1) == pytest.approx(5 / 6)
    assert rouge_n(CAT, CAT_IS, 2) == pytest.approx(0.6)
    assert longest_common_subsequence(CAT, CAT_IS) == 5
    assert rouge_l(CAT, CAT_IS) == pytest.approx(5 / 6)
    # precision 1, recall 1/2: F = 2/3
    assert rouge_n(["hello"], ["hello", "world"], 1) == pytest.approx(2 / 3)
    assert rouge_n(["x"], ["y"], 1) == 0.0 and rouge_l([], ["y"]) == 0.0


def test_gleu_is_the_lesser_of_precision_and_recall_over_1_to_4_grams():
    # matches 5 + 3 + 1 (on the mat) + 0 = 9 of 6 + 5 + 4 + 3 = 18 n-grams on both sides
    assert gleu(CAT, CAT_IS) == pytest.approx(0.5)
    # hello vs hello world: 1 match; 1 candidate n-gram, 3 reference n-grams
    assert gleu(["hello"], ["hello", "world"]) == pytest.approx(1 / 3)


def test_bleu_by_hand():
    assert bleu(CAT, CAT) == pytest.approx(1.0)
    assert bleu(CAT, CAT_IS) == 0.0  # no 4-gram in common
    # one word: unigram precision 1, brevity penalty exp(1 - 2/1)
    assert bleu(["hello"], ["hello", "world"]) == pytest.approx(math.exp(-1))
    # two words, both matched, bigram matched: precisions 1 and 1, candidate 2 of reference 4
    assert bleu(["a", "b"], ["a", "b", "c", "d"]) == pytest.approx(math.exp(1 - 4 / 2))
    assert bleu([], ["a"]) == 0.0


def test_meteor_by_hand():
    # P 1, R 1/2: F = 0.5 / (0.9 + 0.05); one chunk of one match: penalty 0.5 * 1^3
    assert meteor(["hello"], ["hello", "world"]) == pytest.approx(0.5 / 0.95 * 0.5)
    # every word matched in three chunks of one: penalty 0.5 * (3/3)^3 = 0.5
    assert meteor(["one", "two", "three"], ["three", "two", "one"]) == pytest.approx(0.5)
    # identical: one chunk of 6 matches, penalty 0.5 * (1/6)^3
    assert meteor(CAT, CAT) == pytest.approx(1 - 0.5 / 216)
    assert meteor(["x"], ["y"]) == 0.0


PAIRS = [
    ("the cat sat on the mat", "the cat is on the mat"),
    ("on the mat the cat sat", "the cat sat on the mat"),
    ("hello", "hello world"),
    ("the the the", "the cat"),
    ("the quick brown fox jumps", "a quick brown dog jumps over"),
    ("one two three", "three two one"),
    ("a b a b a", "b a b a b a"),
]


@pytest.mark.parametrize(("candidate", "reference"), PAIRS)
def test_the_reference_implementations_agree_on_the_same_words(candidate, reference):
    import warnings

    from nltk.translate.bleu_score import sentence_bleu
    from nltk.translate.gleu_score import sentence_gleu
    from nltk.translate.meteor_score import meteor_score
    from rouge_score import rouge_scorer

    class SameWord:  # METEOR here matches exact words only: no stemmer, no WordNet
        def stem(self, word):
            return word

        def synsets(self, *args, **kwargs):
            return []

    class Words:
        def tokenize(self, text):
            return words(text)

    c, r = words(candidate), words(reference)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rouge3", "rougeL"], tokenizer=Words())
    scores = scorer.score(reference, candidate)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # nltk warns when a BLEU order has no match
        expected_bleu = sentence_bleu([r], c, auto_reweigh=True)
    assert bleu(c, r) == pytest.approx(expected_bleu, abs=1e-12)
    assert gleu(c, r) == pytest.approx(sentence_gleu([r], c))
    assert meteor(c, r) == pytest.approx(meteor_score([r], c, stemmer=SameWord(), wordnet=SameWord()))
    for n in (1, 2, 3):
        assert rouge_n(c, r, n) == pytest.approx(scores[f"rouge{n}"].fmeasure)
    assert rouge_l(c, r) == pytest.approx(scores["rougeL"].fmeasure)


def test_every_metric_scores_texts_in_0_1():
    assert set(TEXT_METRICS) == {
        "fuzzy_match",
        "bleu",
        "gleu",
        "meteor",
        "rouge_1",
        "rouge_2",
        "rouge_3",
        "rouge_4",
        "rouge_5",
        "rouge_l",
    }
    for name, metric in TEXT_METRICS.items():
        assert metric("The answer to it is 42.", "The answer to it is 42.") == pytest.approx(1.0, abs=0.01), (
            name
        )
        assert metric("", "something") == 0.0, name
    assert TEXT_METRICS["fuzzy_match"]("abcd", "abce") == pytest.approx(0.75)
    assert TEXT_METRICS["rouge_5"]("a b c d e", "a b c d e f") == pytest.approx(2 / 3)  # 1 of 1, 1 of 2
