"""Which of the package's files one training step runs code in, in the order it first enters each.

    python tools/trace_step.py --step 2 -- train --config examples/configs/tiny_cpu.yaml steps=2 ...

Runs `s2l <args>` in this process (one rank) and records, from the start of step N to its end, every Python
function call whose code lives in megatron_s2l/. Prints the files in order of first entry, with how many calls
each got, and (--json) one JSON line. The architecture's aim: a step a newcomer can follow through few files.
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
    if args.json:
        print(json.dumps({"step": args.step, "files": order, "calls": dict(calls)}))
    return code


if __name__ == "__main__":
    sys.exit(main())
