"""The reward plug-in: `build_reward(cfg.reward)` gives a `Reward` that scores responses against gold answers.

kind=math: math-verify equivalence of the final answer (math.py); kind=function: your own Python function
(function.py). Either runs in one process pool with per-item deadlines (scorer.py); the contract is types.py.
"""

from megatron_s2l.reward.function import RewardFunctionError
from megatron_s2l.reward.math import equivalent, extract_answer
from megatron_s2l.reward.scorer import FunctionReward, MathScorer, build_reward
from megatron_s2l.reward.types import Reward, ScoreResult


__all__ = ["FunctionReward", "MathScorer", "Reward", "RewardFunctionError", "ScoreResult", "build_reward",
           "equivalent", "extract_answer"]
