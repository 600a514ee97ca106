"""Prompt datasets for training and evaluation: templates, tokenisation, filters, a resumable order.

Templates (DataConfig.template):
  dapo           the DAPO instruction (the paper's training prompt) inside the tokenizer's chat template
  qwen3_nothink  the question + " /no_think" inside the chat template (the paper's evaluation prompt)
  plain          the question text as it is, no chat template
Prompts longer than max_prompt_length tokens are dropped and counted; duplicate questions are dropped
(DAPO-Math-17k was deduplicated on the prompt). Order: a permutation per epoch seeded by (seed, epoch);
the cursor (epoch, position) is saved in checkpoints so a resumed run sees the same prompts.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import random
from pathlib import Path
from typing import Optional

from megatron_s2l.config import DataConfig
from megatron_s2l.data.loaders import drop_bad_golds, read_rows

logger = logging.getLogger(__name__)

DAPO_TEMPLATE = ("Solve the following math problem step by step. The last line of your response should be of "
                 "the form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
                 "{question}\n\nRemember to put your answer on its own line after \"Answer:\".")


@dataclasses.dataclass
class Prompt:
    prompt_id: str  # content hash of the rendered prompt: stable across runs (explorer pools key on it)
    prompt_ids: list[int]
    text: str
    gold: str
    source: str  # "file:line" it came from


def render(question: str, template: str, tokenizer) -> str:
    """The prompt text a template makes of a question."""
    if template == "plain":
        return question
    if template == "dapo":
        content = DAPO_TEMPLATE.format(question=question)
    elif template == "qwen3_nothink":
        content = f"{question} /no_think"
    else:
        raise ValueError(f"data.template={template!r}: use dapo, qwen3_nothink or plain")
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"data.template={template} needs a tokenizer with a chat template; this one has none "
                         "(use data.template=plain, or a tokenizer that ships one)")
    return tokenizer.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                         add_generation_prompt=True)


def chat_template_digest(tokenizer_dir: str | Path) -> str:
    """Hash of a tokenizer folder's chat template (tokenizer_config.json's, or chat_template.jinja/.json),
    read without loading the tokenizer: with the template and the question it fixes a prompt's text."""
    folder, parts = Path(tokenizer_dir), []
    config = folder / "tokenizer_config.json"
    if config.is_file():
        parts.append(json.dumps(json.loads(config.read_text(encoding="utf-8")).get("chat_template")))
    for name in ("chat_template.jinja", "chat_template.json"):
        if (folder / name).is_file():
            parts.append((folder / name).read_text(encoding="utf-8"))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def load_prompts(data_cfg: DataConfig, tokenizer, path: Optional[str] = None) -> list[Prompt]:
    """Read, render, tokenise, filter and deduplicate (file order); logs what was dropped and why."""
    rows, skipped = read_rows(path or data_cfg.path, data_cfg.on_bad_row)
    rows = drop_bad_golds(rows, path or data_cfg.path, data_cfg.max_bad_gold_fraction)
    prompts, seen, too_long = [], set(), 0
    for row in rows:
        text = render(row.question, data_cfg.template, tokenizer)
        if text in seen:
            continue
        seen.add(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) > data_cfg.max_prompt_length:
            too_long += 1
            continue
        digest = hashlib.sha1(text.encode()).hexdigest()[:16]
        prompts.append(Prompt(prompt_id=digest, prompt_ids=ids, text=text, gold=row.gold, source=row.where))
    logger.info("%s: %d prompts (%d duplicates, %d over %d tokens, %d malformed rows skipped)",
                path or data_cfg.path, len(prompts), len(rows) - len(seen), too_long,
                data_cfg.max_prompt_length, skipped)
    if not prompts:
        raise ValueError(f"{path or data_cfg.path}: no usable prompts (check data.max_prompt_length="
                         f"{data_cfg.max_prompt_length} and the template)")
    return prompts


class PromptDataset:
    """Prompts in a seeded order, epoch after epoch, with a cursor that checkpoints."""

    def __init__(self, prompts: list[Prompt], seed: int, shuffle: bool = True):
        self.prompts, self.seed, self.shuffle = prompts, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._permutation(0)

    def _permutation(self, epoch: int) -> list[int]:
        order = list(range(len(self.prompts)))
        if self.shuffle:
            random.Random(f"{self.seed}/{epoch}").shuffle(order)
        return order

    def next_batch(self, n: int) -> list[Prompt]:
        batch = []
        while len(batch) < n:
            if self.position == len(self._order):
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._permutation(self.epoch)
            batch.append(self.prompts[self._order[self.position]])
            self.position += 1
        return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "num_prompts": len(self.prompts)}

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != len(self.prompts):
            raise ValueError(f"the checkpoint's dataset had {state['num_prompts']} prompts, this one has "
                             f"{len(self.prompts)}; resume with the same data.path and data settings")
        self.epoch, self.position = state["epoch"], state["position"]
        self._order = self._permutation(self.epoch)


def build_dataset(data_cfg: DataConfig, tokenizer, seed: int) -> PromptDataset:
    return PromptDataset(load_prompts(data_cfg, tokenizer), seed, data_cfg.shuffle)
