#!/usr/bin/env python
"""Make the CPU toy world: a character tokenizer, a small explorer and a larger learner (Qwen3
architecture, trained from scratch on 1-3 digit addition, about a minute each on 2 cores), and
train/test prompt files. See megatron_s2l/toy.py.

    python tools/make_toy_models.py --out runs/demo/models
"""

from __future__ import annotations

import argparse
import logging
import time

from megatron_s2l.toy import make_toy_world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/demo/models", help="output directory")
    parser.add_argument("--explorer-steps", type=int, default=1500, help="supervised steps for the explorer")
    parser.add_argument("--learner-steps", type=int, default=600, help="supervised steps for the learner")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    start = time.perf_counter()
    paths = make_toy_world(args.out, args.explorer_steps, args.learner_steps, args.seed)
    for name, path in paths.items():
        print(f"{name:9s} {path}")
    print(f"toy world ready in {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
