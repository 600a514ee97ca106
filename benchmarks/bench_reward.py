"""Reward scoring throughput on this machine: in-process vs a pool of workers, on real gold answers.

Items come from MATH-500, GSM8K and AIME24: each gold answer as a correct `Answer:` line and as a
perturbed wrong one, so the mix of easy and sympy-heavy comparisons is the real one. Prints one JSON line.

    python benchmarks/bench_reward.py --json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from common import shared_data_dir  # benchmarks/ is the script's directory
from megatron_s2l.config import RewardConfig
from megatron_s2l.data import gsm8k_gold
from megatron_s2l.reward import MathScorer


def items(limit: int) -> tuple[list[str], list[str]]:
    golds, data = [], shared_data_dir()
    for name in ("math500", "aime24", "gsm8k"):
        for line in (data / name / "test.jsonl").read_text().splitlines()[:limit]:
            row = json.loads(line)
            golds.append(gsm8k_gold(row["answer"]) if name == "gsm8k" else str(row["answer"]))
    responses = [f"Let me think.\nAnswer: {g}" for g in golds] + [f"Answer: {g} + 1" for g in golds]
    return responses, golds + golds


def measure(workers: int, responses: list[str], golds: list[str]) -> dict:
    scorer = MathScorer(RewardConfig(num_workers=workers))
    try:
        scorer.score_batch(responses[:4], golds[:4])  # start the pool outside the timing
        start = time.perf_counter()
        results = scorer.score_batch(responses, golds)
        seconds = time.perf_counter() - start
    finally:
        scorer.close()
    return {"workers": workers, "seconds": round(seconds, 3), "scores_per_s": round(len(results) / seconds, 1),
            "accuracy": sum(r.correct for r in results) / len(results), "timeouts": scorer.num_timeouts}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--limit", type=int, default=200, help="rows per dataset")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    args = parser.parse_args()
    responses, golds = items(args.limit)
    in_process, pooled = measure(0, responses, golds), measure(args.workers, responses, golds)
    print(json.dumps({"benchmark": "reward_scoring", "items": len(responses), "cpus": os.cpu_count(),
                      "machine": platform.machine(), "in_process": in_process, "pool": pooled,
                      "speedup_pool_vs_in_process": round(pooled["scores_per_s"] / in_process["scores_per_s"], 2)}))


if __name__ == "__main__":
    main()
