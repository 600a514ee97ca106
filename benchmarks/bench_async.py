"""Asynchronous rollouts against a real SGLang server: the same run synchronously (rollout.max_staleness=0) and
with max_staleness=1, one after the other in one invocation. Prints one JSON line.

The run: plain GRPO on the toy world (tools/make_toy_models.py), explorer off, so every step's samples come from
the learner replica, an SGLang server that gets the new weights after each step (distributed sync, gloo). Step 1
is left out of the means (nothing is ahead of it, and it warms up). Reported, per variant and side by side:
  step_s            mean wall time of steps 2..N
  rollout_wait_s    mean time the trainer waited for a step's rollouts (timing/rollout_s)
  collect_s         mean time a step's collection took on its own (timing/collect_s)
  hidden_fraction   1 - rollout_wait_s / collect_s: the share of rollout time hidden behind the update
  tokens_per_s      response tokens trained on per second of wall time
  stale_dropped     learner samples dropped as older than max_staleness
and step_time_ratio = async step_s / sync step_s. Needs the SGLang venv (tools/sglang_cpu/setup_venv.sh, or a GPU
install of sglang).

    python benchmarks/bench_async.py --json [--steps 6 --prompts 8 --group-size 8 --max-new-tokens 32]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
from pathlib import Path

from common import sglang_report  # benchmarks/ is the script's directory; common puts the repo on sys.path


def run_variant(world: dict, url: str, args, staleness: int, run_dir: Path) -> dict:
    from tests.utils import TINY_CONFIG, read_rows, run_s2l, toy_overrides

    overrides = toy_overrides(world, **{
        "steps": args.steps, "explorer.mode": "off", "rollout.engine": "sglang", "rollout.learner_url": url,
        "rollout.weight_sync": "distributed", "rollout.max_staleness": staleness,
        "rollout.group_size": args.group_size,
        "rollout.prompts_per_step": args.prompts, "rollout.max_response_length": args.max_new_tokens,
        "parallel.micro_batch_size": args.group_size, "optimizer.mini_batches_per_step": args.mini_batches,
        "eval.every_steps": 0})
    run_s2l(["train", "--config", str(TINY_CONFIG), *overrides, f"logging.run_dir={run_dir}"], timeout=3600)
    rows = read_rows(run_dir)[1:]

    def mean(key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    step_s, wait_s, collect_s = mean("timing/step_s"), mean("timing/rollout_s"), mean("timing/collect_s")
    return {"step_s": round(step_s, 3), "rollout_wait_s": round(wait_s, 3), "collect_s": round(collect_s, 3),
            "train_s": round(mean("timing/logprob_s") + mean("timing/train_s"), 3),
            "sync_s": round(mean("timing/sync_s"), 3),
            "hidden_fraction": round(max(0.0, 1 - wait_s / collect_s), 3),
            "tokens_per_s": round(sum(r["rollout/learner_tokens"] for r in rows) / (step_s * len(rows)), 1),
            "stale_dropped": sum(r.get("rollout/stale_dropped", 0.0) for r in rows)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--prompts", type=int, default=8, help="prompts per step")
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32, help="the toy model holds 64 positions")
    parser.add_argument("--mini-batches", type=int, default=2, help="optimizer updates per step")
    parser.add_argument("--json", action="store_true", help="(the output is always one JSON line)")
    args = parser.parse_args()

    from megatron_s2l.rollout.sglang_launch import launch_server
    from tests.utils import make_toy_world_in_one_thread

    report = sglang_report("async_rollouts", steps=args.steps, prompts_per_step=args.prompts,
                           group_size=args.group_size, max_new_tokens=args.max_new_tokens)
    if report is None:
        return
    # one core for the server's rollouts, one for the learner (run_s2l gives the trainer one thread): on CPU, the
    # analogue of rollout GPUs beside the learner's; a server on every core would slow the update it overlaps
    os.environ["OMP_NUM_THREADS"] = "1"
    work = Path(tempfile.mkdtemp(prefix="bench_async_"))
    # untrained toy models (a few steps): their responses run long-tailed up to the cap, which is what timing needs
    world = make_toy_world_in_one_thread(work / "world", pool=False, learner_steps=2, explorer_steps=1)
    with launch_server(world["learner"], dtype="float32", log_dir=work) as server:
        for staleness, name in ((0, "sync"), (1, "async")):
            report[name] = run_variant(world, server.url, args, staleness, work / name)
    report["step_time_ratio"] = round(report["async"]["step_s"] / report["sync"]["step_s"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
