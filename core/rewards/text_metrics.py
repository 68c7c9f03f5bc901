"""Text similarity in [0, 1] between a candidate and a reference: OpenAI's `text_similarity` metrics.

Pure functions over word tokens. Each follows the usual reference implementation, so scores
agree with it on the same tokens (tests/core/test_text_metrics.py checks against nltk and
rouge-score where installed):

- `bleu`: sentence BLEU with up to 4-gram precisions and the brevity penalty (Papineni et al.
  2002, nltk's `sentence_bleu`); a candidate shorter than 4 words uses n-grams up to its length
  (nltk's `auto_reweigh`), so a one-word answer is not 0 by construction.
- `gleu`: Google's sentence GLEU (Wu et al. 2016, nltk's `sentence_gleu`): the minimum of
  precision and recall over all 1- to 4-grams.
- `meteor`: METEOR (Banerjee and Lavie 2005, nltk's `meteor_score` parameters alpha 0.9,
  beta 3, gamma 0.5) on exact word matches; it does not match stems or WordNet synonyms, so a
  reference that differs only by inflection scores lower than with them.
- `rouge_n`, `rouge_l`: ROUGE F-measure of n-gram overlap and of the longest common subsequence
  (Lin 2004, Google's rouge-score).
- `fuzzy_match`: rapidfuzz's normalised Indel similarity of the two strings.

Tokens are the lower-cased Unicode words (`\\w+`) of each text.
"""

from __future__ import annotations

import itertools
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[str], n: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))


def _overlap(candidate: Sequence[str], reference: Sequence[str], n: int) -> tuple[int, int, int]:
    """(matched n-grams, candidate n-grams, reference n-grams), counts clipped to the reference."""
    mine, theirs = ngrams(candidate, n), ngrams(reference, n)
    return sum((mine & theirs).values()), sum(mine.values()), sum(theirs.values())


def bleu(candidate: Sequence[str], reference: Sequence[str], max_n: int = 4) -> float:
    if not candidate or not reference:
        return 0.0
    orders = min(max_n, len(candidate))
    log_precisions = []
    for n in range(1, orders + 1):
        matched, total, _ = _overlap(candidate, reference, n)
        if matched == 0:
            return 0.0
        log_precisions.append(math.log(matched / total))
    c, r = len(candidate), len(reference)
    brevity = 1.0 if c > r else math.exp(1 - r / c)
    return brevity * math.exp(sum(log_precisions) / orders)


def gleu(candidate: Sequence[str], reference: Sequence[str], max_n: int = 4) -> float:
    matched = candidate_total = reference_total = 0
    for n in range(1, max_n + 1):
        m, c, r = _overlap(candidate, reference, n)
        matched, candidate_total, reference_total = matched + m, candidate_total + c, reference_total + r
    if candidate_total == 0 or reference_total == 0:
        return 0.0
    return min(matched / candidate_total, matched / reference_total)


def rouge_n(candidate: Sequence[str], reference: Sequence[str], n: int) -> float:
    matched, candidate_total, reference_total = _overlap(candidate, reference, n)
    return _f_measure(matched, candidate_total, reference_total)


def rouge_l(candidate: Sequence[str], reference: Sequence[str]) -> float:
    return _f_measure(longest_common_subsequence(candidate, reference), len(candidate), len(reference))


def _f_measure(matched: int, candidate_total: int, reference_total: int) -> float:
    if matched == 0:
        return 0.0
    precision, recall = matched / candidate_total, matched / reference_total
    return 2 * precision * recall / (precision + recall)


def longest_common_subsequence(a: Sequence[str], b: Sequence[str]) -> int:
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def meteor(
    candidate: Sequence[str],
    reference: Sequence[str],
    alpha: float = 0.9,
    beta: float = 3.0,
    gamma: float = 0.5,
) -> float:
    pairs = _align_exact(candidate, reference)
    matches = len(pairs)
    if matches == 0:
        return 0.0
    precision, recall = matches / len(candidate), matches / len(reference)
    f_mean = precision * recall / (alpha * precision + (1 - alpha) * recall)
    # A chunk is a run of matches adjacent in both texts; fewer chunks mean better word order.
    chunks = 1 + sum(
        1 for (c0, r0), (c1, r1) in itertools.pairwise(pairs) if not (c1 == c0 + 1 and r1 == r0 + 1)
    )
    penalty = gamma * (chunks / matches) ** beta
    return f_mean * (1 - penalty)


def _align_exact(candidate: Sequence[str], reference: Sequence[str]) -> list[tuple[int, int]]:
    """(candidate position, reference position) of equal words, sorted by candidate position.

    As nltk's exact stage: from the last candidate word back, each takes the last unused equal
    reference word.
    """
    unused = list(range(len(reference)))
    pairs = []
    for i in reversed(range(len(candidate))):
        for k in reversed(range(len(unused))):
            if candidate[i] == reference[unused[k]]:
                pairs.append((i, unused.pop(k)))
                break
    return sorted(pairs)


def fuzzy_match(candidate: str, reference: str) -> float:
    from rapidfuzz import fuzz

    return fuzz.ratio(candidate, reference) / 100.0


def _on_words(metric: Callable[[Sequence[str], Sequence[str]], float]) -> Callable[[str, str], float]:
    return lambda candidate, reference: metric(words(candidate), words(reference))


# evaluation_metric -> score(candidate text, reference text)
TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "fuzzy_match": fuzzy_match,
    "bleu": _on_words(bleu),
    "gleu": _on_words(gleu),
    "meteor": _on_words(meteor),
    **{f"rouge_{n}": _on_words(lambda c, r, n=n: rouge_n(c, r, n)) for n in range(1, 6)},
    "rouge_l": _on_words(rouge_l),
}
