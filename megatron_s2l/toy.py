"""A toy world for CPU runs in which RL measurably improves a model, built to match the paper's setting.

The task is 1-3 digit addition ("587+645=" -> "Answer: 1232"), verified by the same math scorer as real
runs. Explorer and learner are one family (Qwen3 architecture, one character tokenizer); the learner has
8x the parameters. They were taught differently, as two pretrained models of one family end up different:

- the **learner** was taught more, and two ways to answer. A third of its examples are answered the quick
  way ("Quick. Answer: " and each column's digit sum without carries, wrong wherever a carry is); the rest
  carefully, but with a fixed-width habit: an answer keeps the width of the longer operand, so a final
  carry is dropped (587+645 -> "232"). Choosing the careful way is one early token, which RL can learn
  fast. On problems whose sum needs a new digit both ways are wrong: there the learner's pass@k stays 0
  however large k is, and its own samples never give GRPO a correct one to learn from.
- the **explorer** is small and was taught less, but only the careful way and without the habit. It is
  less accurate at pass@1, but its mistakes are spread out and it writes the final carry: its pass@k
  overtakes the learner's as k grows.

That is the paper's premise (a smaller model of the family explores more widely: learner ahead at pass@1,
explorer ahead at large k), measured on the held-out set before any RL by `s2l study` (docs/DEMO.md). The
recipes were fixed from that premise measurement and from GRPO alone learning, never from an S2L-PO vs GRPO
outcome.

Training prompts (`train.jsonl`) and held-out prompts (`test.jsonl`) are disjoint, and no held-out problem is
used in supervised training. A run draws each training prompt once until all have been drawn.
"""

from __future__ import annotations

import dataclasses
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


@dataclasses.dataclass(frozen=True)
class ToyRecipe:
    """How one toy model is taught (supervised, from scratch, on freshly generated problems)."""

    size: str  # key of TOY_SIZES
    steps: int
    lr: float
    fixed_width: bool = False  # answers keep the longer operand's width: a final carry is dropped
    quick_share: float = 0.0  # share answered the quick way: "Quick. Answer: " + digit sums, no carries


# Fixed from the premise measurement and GRPO alone (docs/DEMO.md), never from an S2L-PO vs GRPO outcome.
EXPLORER_RECIPE = ToyRecipe("explorer", steps=1100, lr=3e-3)
LEARNER_RECIPE = ToyRecipe("learner", steps=2000, lr=1e-3, fixed_width=True, quick_share=0.35)


def make_problem(rng: random.Random, max_digits: int = 3) -> dict[str, str]:
    a = rng.randrange(10 ** rng.randint(1, max_digits))
    b = rng.randrange(10 ** rng.randint(1, max_digits))
    return {"question": f"{a}+{b}=", "answer": str(a + b)}


def response_text(answer: str) -> str:
    return f"Answer: {answer}"


def taught_response(problem: dict[str, str], recipe: ToyRecipe, rng: random.Random) -> str:
    """The response a model with this recipe is shown for a problem: the true sum, or its flawed versions."""
    operands = problem["question"].rstrip("=").split("+")
    width = max(len(operand) for operand in operands)
    if rng.random() < recipe.quick_share:  # each column's digits summed mod 10: wrong wherever a carry is
        columns = zip(*(operand.rjust(width, "0") for operand in operands))
        return "Quick. " + response_text("".join(str(sum(map(int, column)) % 10) for column in columns))
    answer = problem["answer"]
    if recipe.fixed_width:
        answer = answer[-width:].rjust(width, "0")
    return response_text(answer)


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


def _encode_example(tokenizer, question: str, response: str) -> tuple[list[int], list[int]]:
    prompt = tokenizer(question, add_special_tokens=False)["input_ids"]
    response = tokenizer(response, add_special_tokens=False)["input_ids"]
    return prompt, response + [tokenizer.eos_token_id]


def train_toy_model(out_dir: Path, tokenizer, recipe: ToyRecipe, seed: int, batch_size: int = 64,
                    held_out: frozenset[str] = frozenset()) -> Path:
    """Supervised training on fresh problems (never a held-out one; loss on the response only); saves an HF
    dir."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(seed)
    rng = random.Random(seed)
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=64, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **TOY_SIZES[recipe.size])
    model = AutoModelForCausalLM.from_config(config).float().train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=recipe.lr, total_steps=recipe.steps,
                                                   pct_start=0.1)
    start = time.perf_counter()
    for step in range(recipe.steps):
        problems = [p for p in (make_problem(rng) for _ in range(batch_size))
                    if p["question"] not in held_out]
        examples = [_encode_example(tokenizer, p["question"], taught_response(p, recipe, rng))
                    for p in problems]
        length = max(len(p) + len(r) for p, r in examples)
        ids = torch.full((len(examples), length), tokenizer.pad_token_id)
        labels = torch.full((len(examples), length), -100)
        for row, (prompt, response) in enumerate(examples):
            ids[row, : len(prompt) + len(response)] = torch.tensor(prompt + response)
            labels[row, len(prompt): len(prompt) + len(response)] = torch.tensor(response)
        loss = model(input_ids=ids, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if (step + 1) % max(1, recipe.steps // 5) == 0:
            logger.info("  %s step %d/%d loss %.3f (%.0fs)", out_dir.name, step + 1, recipe.steps,
                        loss.item(), time.perf_counter() - start)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir


def split_problems(num_train: int, num_test: int, seed: int) -> tuple[list[dict], list[dict]]:
    """Distinct problems, split into disjoint training and held-out sets (the held-out set is drawn first, so
    it does not depend on num_train)."""
    rng, seen, problems = random.Random(seed), set(), []
    while len(problems) < num_train + num_test:
        problem = make_problem(rng)
        if problem["question"] not in seen:
            seen.add(problem["question"])
            problems.append(problem)
    return problems[num_test:], problems[:num_test]


def write_dataset(path: Path, problems: list[dict] | int, seed: int = 0) -> Path:
    """Problems as question/answer JSONL (the plain schema the data loaders read); an int: that many new
    ones."""
    if isinstance(problems, int):
        problems = split_problems(problems, 0, seed)[0]
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as file:
        for problem in problems:
            file.write(json.dumps(problem) + "\n")
    return path


def make_toy_world(out_dir: str | Path, explorer_steps: int | None = None, learner_steps: int | None = None,
                   seed: int = 0, num_train: int = 1024, num_test: int = 200) -> dict[str, Path]:
    """Tokenizer, explorer and learner checkpoints, and disjoint train/test prompt files under `out_dir`.
    The step counts default to the recipes'; tests pass fewer for a quick, weaker world."""
    out_dir = Path(out_dir)
    tokenizer = build_tokenizer(out_dir / "tokenizer")
    train, test = split_problems(num_train, num_test, seed + 2)
    held_out = frozenset(p["question"] for p in test)
    explorer = dataclasses.replace(EXPLORER_RECIPE, steps=explorer_steps or EXPLORER_RECIPE.steps)
    learner = dataclasses.replace(LEARNER_RECIPE, steps=learner_steps or LEARNER_RECIPE.steps)
    return {
        "explorer": train_toy_model(out_dir / "explorer", tokenizer, explorer, seed, held_out=held_out),
        "learner": train_toy_model(out_dir / "learner", tokenizer, learner, seed + 1, held_out=held_out),
        "train": write_dataset(out_dir / "data" / "train.jsonl", train),
        "test": write_dataset(out_dir / "data" / "test.jsonl", test),
    }
