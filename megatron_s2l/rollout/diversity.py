"""Diversity of a group of responses (the paper's Table 3): unique-answer ratio, self-BLEU and
normalised edit diversity. Responses are compared as whitespace-token sequences.

unique_answer_ratio  distinct extracted final answers / responses (no answer counts as one value)
self_bleu            mean BLEU-4 of each response against all the others (higher: more alike)
edit_diversity       mean pairwise token edit distance / longer length (higher: more different)
"""

from __future__ import annotations

import math
from collections import Counter
from itertools import combinations
from typing import Optional


def unique_answer_ratio(answers: list[Optional[str]]) -> float:
    return len(set(answers)) / len(answers) if answers else 0.0


def _ngrams(tokens: list[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def bleu(hypothesis: list[str], references: list[list[str]], max_n: int = 4) -> float:
    """Sentence BLEU with clipped counts against several references, +1 smoothing for n > 1."""
    if not hypothesis or not references:
        return 0.0
    log_precision = 0.0
    for n in range(1, max_n + 1):
        counts = _ngrams(hypothesis, n)
        best = Counter()
        for reference in references:
            best |= _ngrams(reference, n)
        matched = sum(min(count, best[gram]) for gram, count in counts.items())
        total = max(len(hypothesis) - n + 1, 0)
        smooth = 0 if n == 1 else 1
        if matched + smooth == 0 or total + smooth == 0:
            return 0.0
        log_precision += math.log((matched + smooth) / (total + smooth)) / max_n
    closest = min((len(r) for r in references), key=lambda length: (abs(length - len(hypothesis)), length))
    brevity = 1.0 if len(hypothesis) > closest else math.exp(1 - closest / len(hypothesis))
    return brevity * math.exp(log_precision)


def self_bleu(responses: list[str]) -> float:
    tokens = [r.split() for r in responses]
    if len(tokens) < 2:
        return 0.0
    return sum(bleu(t, tokens[:i] + tokens[i + 1:]) for i, t in enumerate(tokens)) / len(tokens)


def edit_distance(a: list[str], b: list[str]) -> int:
    previous = list(range(len(b) + 1))
    for i, x in enumerate(a, start=1):
        current = [i]
        for j, y in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (x != y)))
        previous = current
    return previous[-1]


def edit_diversity(responses: list[str]) -> float:
    tokens = [r.split() for r in responses]
    pairs = list(combinations(tokens, 2))
    if not pairs:
        return 0.0
    return sum(edit_distance(a, b) / max(len(a), len(b), 1) for a, b in pairs) / len(pairs)


def group_diversity(responses: list[str], answers: list[Optional[str]]) -> dict[str, float]:
    return {"unique_answer_ratio": unique_answer_ratio(answers), "self_bleu": self_bleu(responses),
            "edit_diversity": edit_diversity(responses)}
