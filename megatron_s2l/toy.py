"""A toy world for CPU runs: an addition task with a verifiable `Answer:` line, a character-level
tokenizer, and a small explorer and a larger learner of the same family (Qwen3 architecture) trained
from scratch for a minute or two each, saved as ordinary HF checkpoints.

The explorer is trained longer than the learner (about 65% vs 20% of problems solved when sampling at
T=1), so early in RL the explorer's samples contain correct answers the learner rarely finds on its own:
the situation S2L-PO is designed for, at a size where the whole pipeline (pool, Megatron learner, weight
sync, checkpoints) runs on a laptop.
"""

from __future__ import annotations

import json
import logging
import random
import string
import time
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]
CHARACTERS = string.digits + string.ascii_letters + " +-*/=?:.,()$#\n"
TOY_SIZES = {  # Qwen3 shapes: same family, 8x apart in parameters
    "explorer": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16),
    "learner": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                    num_key_value_heads=2, head_dim=32),
}
TOY_LR = {"explorer": 3e-3, "learner": 1e-3}  # the larger model needs the smaller step


def make_problem(rng: random.Random, max_digits: int = 3) -> dict[str, str]:
    a = rng.randrange(10 ** rng.randint(1, max_digits))
    b = rng.randrange(10 ** rng.randint(1, max_digits))
    return {"question": f"{a}+{b}=", "answer": str(a + b)}


def prompt_text(question: str) -> str:
    """The toy prompt: the question itself (what the `plain` data template produces)."""
    return question


def response_text(answer: str) -> str:
    return f"Answer: {answer}"


def build_tokenizer(out_dir: Path):
    """A character-level fast tokenizer (every character is a token), saved in HF format."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + list(CHARACTERS))}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    core.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def _encode_example(tokenizer, problem: dict[str, str]) -> tuple[list[int], list[int]]:
    prompt = tokenizer(prompt_text(problem["question"]), add_special_tokens=False)["input_ids"]
    response = tokenizer(response_text(problem["answer"]), add_special_tokens=False)["input_ids"]
    return prompt, response + [tokenizer.eos_token_id]


def train_toy_model(out_dir: Path, tokenizer, size: dict, steps: int, seed: int, batch_size: int = 64,
                    lr: float = 3e-3) -> Path:
    """Supervised training on fresh addition problems (loss on the response only); saves an HF dir."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **size)
    model = AutoModelForCausalLM.from_config(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    start = time.perf_counter()
    for step in range(steps):
        examples = [_encode_example(tokenizer, make_problem(rng)) for _ in range(batch_size)]
        length = max(len(p) + len(r) for p, r in examples)
        ids = torch.full((batch_size, length), tokenizer.pad_token_id)
        labels = torch.full((batch_size, length), -100)
        for row, (prompt, response) in enumerate(examples):
            ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
            labels[row, len(prompt): len(prompt) + len(response)] = torch.tensor(response)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % max(1, steps // 5) == 0:
            logger.info("  %s step %d/%d loss %.3f (%.0fs)", out_dir.name, step + 1, steps, loss.item(),
                        time.perf_counter() - start)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def write_dataset(path: Path, num_problems: int, seed: int) -> Path:
    """Addition problems as question/answer JSONL (the plain schema the data loaders read)."""
    rng = random.Random(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for _ in range(num_problems):
            file.write(json.dumps(make_problem(rng)) + "\n")
    return path


def make_toy_world(out_dir: str | Path, explorer_steps: int = 1500, learner_steps: int = 600,
                   seed: int = 0, num_train: int = 256, num_test: int = 200) -> dict[str, Path]:
    """Tokenizer, explorer and learner checkpoints, and train/test prompt files under `out_dir`."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    paths = {
        "explorer": train_toy_model(out_dir / "explorer", tokenizer, TOY_SIZES["explorer"], explorer_steps, seed,
                                    lr=TOY_LR["explorer"]),
        "learner": train_toy_model(out_dir / "learner", tokenizer, TOY_SIZES["learner"], learner_steps, seed + 1,
                                   lr=TOY_LR["learner"]),
        "train": write_dataset(out_dir / "data" / "train.jsonl", num_train, seed + 2),
        "test": write_dataset(out_dir / "data" / "test.jsonl", num_test, seed + 3),
    }
    return paths
