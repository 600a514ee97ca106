#!/usr/bin/env python
"""HF checkpoint -> Megatron dist checkpoint (any TP x PP; run under torchrun for TP/PP > 1).
Same as `s2l convert hf-to-megatron`.

    python tools/convert_hf_to_megatron.py --hf /models/Qwen3-8B-Base --out /ckpt/qwen3-8b-mcore
"""

import sys

from megatron_s2l.cli import main

if __name__ == "__main__":
    sys.exit(main([*"convert hf-to-megatron".split(), *sys.argv[1:]]))
