"""Which of the package's files one training step runs code in, in the order it first enters each.

    python tools/trace_step.py --step 2 -- train --config examples/configs/tiny_cpu.yaml steps=2 ...

Runs `s2l <args>` in this process (one rank) and records, from the start of step N to its end, every Python
function call whose code lives in megatron_s2l/. Prints the files in order of first entry, with how many calls
each got, and (--json) one JSON line.

It then sorts them as a reader would (the scale of DESIGN.md's "trainer -> collector -> reward -> advantages ->
learner -> loss -> weight_sync"): the *reading path*, the files that hold a stage of Algorithm 1 or hand its data
to the next stage, in the order the step enters them; and the *helpers* the path calls by name (records, seeds,
transport, metrics, numerics), each with its role. A file in neither list is printed as unclassified: a new file
on the step's way has to be placed in one of them (tests/ check that none is left over and that the path stays
at 12 files or fewer).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


# the reading path: one file per stage (the engines are alternatives: pool, in-process or SGLang)
READING_PATH = (
    "train/trainer.py",        # Algorithm 1, one call per line
    "rollout/collector.py",    # one step's groups: prompts, G_w/G_s, both sources, trimming, metrics
    "rollout/schedule.py",     # alpha_i and G_w = ceil(alpha_i * G)
    "rollout/sampling.py",     # generate -> decode -> score, for either source
    "rollout/pool.py",         # explorer samples drawn from the offline pool
    "rollout/local.py",        # an in-process engine (explorer or learner replica)
    "rollout/sglang.py",       # an SGLang engine (learner replica or online explorer)
    "reward/scorer.py",        # the Reward the step calls: the verifier in a process pool with timeouts
    "reward/function.py",      # ... or the user's reward.function
    "algo/advantages.py",      # group-relative advantages over the mixed group
    "train/batch.py",          # the token batch every rank trains on
    "train/learner.py",        # old/ref log-probs, the update through megatron-core
    "algo/loss.py",            # the GRPO surrogate, KL, reductions
    "train/weight_sync.py",    # learner weights -> the replica, versioned
)
HELPERS = {
    "train/stopping.py": "run control: phases, the stop agreed across ranks",
    "metrics/profiler.py": "phase timers (the trace starts inside one)",
    "metrics/perf.py": "throughput, FLOPs and memory metrics",
    "platform.py": "process-group helpers; on CPU, the torch-function adapter that sees every torch call",
    "rollout/runtime.py": "the event loop the collector's coroutines run on",
    "rollout/types.py": "records: Sample, Generation, weight-version age",
    "rollout/ledger.py": "rollout-compute ledger (tokens per source)",
    "rollout/diversity.py": "diversity metrics of the groups",
    "rollout/sglang_client.py": "HTTP to SGLang: request bodies, responses, retries",
    "rollout/weight_broadcast.py": "the NCCL/gloo group that carries weights to SGLang",
    "seeding.py": "per-request seeds",
    "data/dataset.py": "the prompt cursor",
    "reward/math.py": "the math verifier the scorer runs",
    "algo/logprobs.py": "fused vocab-parallel log-probs (the loss's numerics)",
    "model/attention.py": "core attention on CPU (Transformer Engine's on GPU)",
    "model/convert.py": "Megatron <-> HF names, module unwrapping",
    "model/specs.py": "parameter counts",
    "config.py": "config properties",
    "eval/runner.py": "the held-out evaluation, when this step is due for one",
    "eval/passk.py": "pass@k of that evaluation",
}


def classify(files: list[str]) -> dict[str, list[str]]:
    """The traced files (in order of first entry) as reading path, helpers and unclassified."""
    return {"reading_path": [f for f in files if f in READING_PATH],
            "helpers": [f for f in files if f in HELPERS],
            "unclassified": [f for f in files if f not in READING_PATH and f not in HELPERS]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", type=int, default=2, help="the step to trace (default 2: after any warm-up)")
    parser.add_argument("--json", action="store_true", help="also print one JSON line")
    parser.add_argument("s2l_args", nargs=argparse.REMAINDER, help="after --: the `s2l` command line")
    args = parser.parse_args()
    s2l_args = args.s2l_args[1:] if args.s2l_args[:1] == ["--"] else args.s2l_args

    from megatron_s2l import cli
    from megatron_s2l.metrics.profiler import StepProfiler

    package = str(REPO / "megatron_s2l") + "/"
    calls: dict[str, int] = collections.Counter()
    order: list[str] = []

    def record(frame, event, arg):
        if event == "call" and frame.f_code.co_filename.startswith(package):
            name = frame.f_code.co_filename[len(package):]
            if name not in calls:
                order.append(name)
            calls[name] += 1

    traced_step = StepProfiler.step

    @contextlib.contextmanager
    def step(self, number):
        with traced_step(self, number) as timer:
            if number != args.step:
                yield timer
                return
            sys.setprofile(record)
            threading.setprofile(record)
            try:
                yield timer
            finally:
                sys.setprofile(None)
                threading.setprofile(None)

    StepProfiler.step = step
    code = cli.main(s2l_args)
    print(f"step {args.step} ran code in {len(order)} of the package's files:")
    for index, name in enumerate(order, start=1):
        print(f"{index:3d}. {name} ({calls[name]} calls)")
    sorted_files = classify(order)
    path = sorted_files["reading_path"]
    print(f"reading path, {len(path)} files: " + " -> ".join(path))
    print(f"helpers it calls by name, {len(sorted_files['helpers'])} files:")
    for name in sorted_files["helpers"]:
        print(f"     {name}: {HELPERS[name]}")
    if sorted_files["unclassified"]:
        print("unclassified (place each in READING_PATH or HELPERS in tools/trace_step.py): "
              + ", ".join(sorted_files["unclassified"]))
    if args.json:
        print(json.dumps({"step": args.step, "files": order, "calls": dict(calls), **sorted_files}))
    return code


if __name__ == "__main__":
    sys.exit(main())
