#!/usr/bin/env python
"""Make the CPU toy world: a character tokenizer, a small explorer and an 8x larger learner (Qwen3
architecture, taught 1-3 digit addition differently, a few minutes on 2 cores), and disjoint train/test
prompt files. See megatron_s2l/toy.py for how the world is built and why.

    python tools/make_toy_models.py --out runs/demo/models
    python tools/make_toy_models.py --out runs/ceiling --ceiling 4000   # both sizes fully trained, clean data
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import subprocess
import sys
import time
from pathlib import Path

from megatron_s2l.toy import EXPLORER_RECIPE, LEARNER_RECIPE, build_tokenizer, make_toy_world, split_problems, \
    train_toy_model, write_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/models", help="output directory")
    parser.add_argument("--explorer-steps", type=int, default=EXPLORER_RECIPE.steps,
                        help="supervised steps for the explorer")
    parser.add_argument("--learner-steps", type=int, default=LEARNER_RECIPE.steps,
                        help="supervised steps for the learner")
    parser.add_argument("--num-train", type=int, default=1024, help="training prompts")
    parser.add_argument("--num-test", type=int, default=200, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ceiling", type=int, default=0, metavar="STEPS",
                        help="instead: train both sizes for STEPS steps on clean data and report held-out pass@k")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if args.ceiling:
        return measure_ceiling(Path(args.out), args.ceiling, args.seed, args.num_test)
    start = time.perf_counter()
    paths = make_toy_world(args.out, args.explorer_steps, args.learner_steps, args.seed, args.num_train,
                           args.num_test)
    for name, path in paths.items():
        print(f"{name:9s} {path}")
    print(f"toy world ready in {time.perf_counter() - start:.0f}s")


def measure_ceiling(out: Path, steps: int, seed: int, num_test: int) -> None:
    """The learner's size must have the higher ceiling: both sizes taught the explorer's (clean) way for as long,
    then scored on the same held-out set as the toy world's (`s2l eval`, 16 samples at T=1)."""
    tokenizer = build_tokenizer(out / "tokenizer")
    test = split_problems(0, num_test, seed + 2)[1]
    data = write_dataset(out / "data" / "test.jsonl", test)
    held_out = frozenset(p["question"] for p in test)
    for taught in (EXPLORER_RECIPE, LEARNER_RECIPE):  # each size at its own learning rate
        recipe = dataclasses.replace(EXPLORER_RECIPE, size=taught.size, steps=steps, lr=taught.lr)
        model = train_toy_model(out / taught.size, tokenizer, recipe, seed, held_out=held_out)
        sampling = ["--temperature", "1.0", "--top-p", "1.0", "--top-k", "-1", "--presence-penalty", "0"]
        subprocess.run([sys.executable, "-m", "megatron_s2l.cli", "eval", "--model", str(model), "--data", str(data),
                        "--k", "16", "--template", "plain", "--max-new-tokens", "24", *sampling,
                        "--out", str(out / f"eval_{taught.size}")], check=True)


if __name__ == "__main__":
    main()
