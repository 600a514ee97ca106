"""Prompt datasets: local files in several schemas (loaders.py), templates and ordering (dataset.py)."""

from megatron_s2l.data.dataset import (DAPO_TEMPLATE, Prompt, PromptDataset, build_dataset, load_prompts,
                                       render)
from megatron_s2l.data.loaders import (BadRowError, RawRow, drop_bad_golds, gsm8k_gold, question_key,
                                       read_rows)

__all__ = ["DAPO_TEMPLATE", "BadRowError", "Prompt", "PromptDataset", "RawRow", "build_dataset",
           "drop_bad_golds", "gsm8k_gold", "load_prompts", "question_key", "read_rows", "render"]
