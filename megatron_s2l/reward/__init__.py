"""Verified math rewards (math.py) and the process-pool scorer the trainer uses (pool.py)."""

from megatron_s2l.reward.math import ScoreResult, equivalent, extract_answer, gsm8k_gold, score, score_one
from megatron_s2l.reward.pool import MathScorer, build_scorer

__all__ = ["MathScorer", "ScoreResult", "build_scorer", "equivalent", "extract_answer", "gsm8k_gold", "score",
           "score_one"]
