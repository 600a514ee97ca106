"""Verified math rewards: extract the final answer, decide equivalence with math-verify (sympy).

Where we depart from the paper's released scorer: it took the last "Answer:" in the last 300 characters,
normalised strings and accepted "gold is a substring of the prediction" (so "12" passed for gold "2"),
and scored explorer and learner samples on different scales. Here an answer must be *equivalent*
(fractions vs decimals, radicals, intervals, sets, polynomials, units, thousands separators...), and the
same scorer and scale serve both sources.

Final-answer markers, the one that appears last in the response wins:
  `Answer: X` on its own line (DAPO format), `\\boxed{X}` (nested braces), `#### X` (GSM8K).
No marker means no answer (reward 0), even if the right number appears in the text.
"""

from __future__ import annotations

import functools
import re
import threading
import time
from typing import Optional

_ANSWER_LINE = re.compile(r"Answer\s*:[ \t]*([^\n]*)", re.IGNORECASE)
_GSM8K = re.compile(r"####[ \t]*([^\n]*)")
_BOXED = re.compile(r"\\(?:boxed|fbox)\s*\{")


def _last_boxed(text: str) -> Optional[tuple[int, str]]:
    """(position, content) of the last \\boxed{...}, matching nested braces."""
    matches = list(_BOXED.finditer(text))
    for match in reversed(matches):
        depth, start = 1, match.end()
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return match.start(), text[start:i]
    return None


def extract_answer(response: str) -> Optional[str]:
    """The response's final answer, or None when it has no final-answer marker."""
    candidates = []
    if (line := list(_ANSWER_LINE.finditer(response))):
        candidates.append((line[-1].start(), line[-1].group(1)))
    if (gsm := list(_GSM8K.finditer(response))):
        candidates.append((gsm[-1].start(), gsm[-1].group(1)))
    if (boxed := _last_boxed(response)) is not None:
        candidates.append(boxed)
    if not candidates:
        return None
    _, answer = max(candidates)
    inner = _last_boxed(answer)  # "Answer: $\boxed{5}$"
    answer = inner[1] if inner is not None else answer
    previous = None
    while previous != answer:  # "$12$.", " 12. " -> "12"
        previous, answer = answer, answer.strip().strip("$").rstrip(".")
    return answer or None


def _as_latex(answer: str) -> str:
    return answer if answer.startswith("$") else f"${answer}$"


@functools.cache
def _math_verify():
    """math_verify and its extraction settings, imported on the first comparison: it loads sympy (over a
    second), which every `s2l` command would otherwise pay at start, even one that fails on a typo."""
    import math_verify

    return math_verify, [math_verify.LatexExtractionConfig(), math_verify.ExprExtractionConfig()]


def equivalent(prediction: str, gold: str, timeout_s: int = 5) -> bool:
    """math-verify equivalence of two final answers. Its timeouts are signal alarms, which work only in a main
    thread; elsewhere (in-process scoring, reward.num_workers=0, during asynchronous rollouts) there is none."""
    if threading.current_thread() is not threading.main_thread():
        timeout_s = None
    math_verify, extraction = _math_verify()
    gold_parsed = math_verify.parse(_as_latex(gold), extraction_config=extraction, parsing_timeout=timeout_s)
    pred_parsed = math_verify.parse(_as_latex(prediction), extraction_config=extraction,
                                    parsing_timeout=timeout_s)
    if not gold_parsed or not pred_parsed:  # unparseable: fall back to exact text
        return _normalise(prediction) == _normalise(gold)
    return bool(math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout_s))


def _normalise(text: str) -> str:
    return re.sub(r"\s+", "", text).lower()


def verify_answer(answer: str, gold: str, timeout_s: int) -> tuple[bool, bool]:
    """(correct, timed_out) of an extracted answer against the gold; MathScorer runs it in a worker's main
    thread, where math-verify's alarms work."""
    _math_verify()  # a worker's first call imports it: not part of the time this answer took
    start = time.monotonic()
    correct = equivalent(answer, gold, timeout_s)
    return correct, (not correct and time.monotonic() - start >= timeout_s)


def reward_value(correct: bool, scale: str) -> float:
    """The reward of a verdict on reward.scale."""
    if scale == "binary":
        return 1.0 if correct else 0.0
    if scale == "signed":
        return 1.0 if correct else -1.0
    raise ValueError(f"reward.scale={scale!r}: use binary ({{0, 1}}) or signed ({{-1, 1}})")
