"""Prompt datasets: local files in several schemas (loaders.py), templates and ordering (dataset.py)."""

from megatron_s2l.data.dataset import (DAPO_TEMPLATE, Prompt, PromptDataset, build_dataset, load_prompts,
                                       render)
from megatron_s2l.data.loaders import BadRowError, RawRow, gsm8k_gold, read_rows

__all__ = ["DAPO_TEMPLATE", "BadRowError", "Prompt", "PromptDataset", "RawRow", "build_dataset", "gsm8k_gold",
           "load_prompts", "read_rows", "render"]
