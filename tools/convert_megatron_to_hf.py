#!/usr/bin/env python
"""Megatron checkpoint (converted or trained) -> HF safetensors directory. Same as `s2l convert megatron-to-hf`.

    python tools/convert_megatron_to_hf.py --ckpt runs/s2l/checkpoints/step_000016 --out runs/s2l/hf
"""

import sys

from megatron_s2l.cli import main

if __name__ == "__main__":
    sys.exit(main([*"convert megatron-to-hf".split(), *sys.argv[1:]]))
