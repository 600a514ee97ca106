#!/usr/bin/env python
"""Build an offline explorer pool from a run config (resumable). Same as `s2l pool build`.

    python tools/build_explorer_pool.py --config examples/configs/s2l_qwen3_8b.yaml --explorer-url http://host:30001
"""

import sys

from megatron_s2l.cli import main

if __name__ == "__main__":
    sys.exit(main([*"pool build".split(), *sys.argv[1:]]))
