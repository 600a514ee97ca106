#!/usr/bin/env python
"""pass@k of a model on benchmarks with the paper's protocol. Same as `s2l eval`.

    python tools/eval_passk.py --model runs/s2l/hf --data ../shared/data/aime24/test.jsonl --k 16 --out runs/eval
"""

import sys

from megatron_s2l.cli import main

if __name__ == "__main__":
    sys.exit(main([*"eval".split(), *sys.argv[1:]]))
