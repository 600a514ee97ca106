"""`s2l eval`: pass@k of a model on benchmarks with the paper's protocol (16 samples per problem,
Qwen3 "nothink" sampling: T 0.7, top_p 0.8, top_k 20, presence penalty 1.5, question + " /no_think").

Writes per-problem JSONL and a summary JSON (pass@1..k, mean length, finish reasons, diversity) per
benchmark. Any RolloutEngine works: LocalEngine from --model, or a running SGLang server via --url.
During training the `Evaluator` scores the learner replica on the run's held-out sets the same way.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
from pathlib import Path
from typing import Optional

from megatron_s2l.config import DataConfig, RunConfig, to_dict
from megatron_s2l.data import load_prompts
from megatron_s2l.eval.passk import mean_pass_at_k, pass_at_k
from megatron_s2l.model.files import check_safetensors, require_model_dir
from megatron_s2l.reward import Reward, build_reward
from megatron_s2l.rollout.diversity import group_diversity
from megatron_s2l.rollout.engines import build_engine, sampling_params
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.sampling import sample_and_score
from megatron_s2l.rollout.types import PromptRecord, RolloutEngine, SamplingParams

logger = logging.getLogger(__name__)


def pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ks = [1]
    while ks[-1] * 2 <= k:
        ks.append(ks[-1] * 2)
    return sorted(set(ks + [k]))


def load_eval_prompts(cfg: RunConfig, path: str, tokenizer) -> list[PromptRecord]:
    """A run's held-out set: rendered like its training data, in file order, at most eval.max_prompts of them."""
    data = DataConfig(**{**to_dict(cfg.data), "path": path, "shuffle": False})
    return load_prompts(data, tokenizer)[: cfg.eval.max_prompts]


def evaluate_prompts(engine: RolloutEngine, prompts: list[PromptRecord], tokenizer, reward: Reward, k: int,
                     params: SamplingParams, runtime: RolloutRuntime) -> tuple[list[dict], dict]:
    """k samples per prompt -> per-problem records and a summary (pass@1..k, lengths, finish reasons)."""
    samples = runtime.run(sample_and_score(engine, prompts, k, params, tokenizer, reward, "learner"))
    records, finish = [], collections.Counter()
    for prompt, mine in zip(prompts, samples):
        correct = sum(s.reward > 0 for s in mine)
        finish.update(s.finish_reason for s in mine)
        records.append({
            "prompt_id": prompt.prompt_id, "gold": prompt.gold, "n": k, "correct": correct,
            **{f"pass@{j}": pass_at_k(k, correct, j) for j in pass_ks(k)},
            "answers": [s.answer for s in mine], "mean_length": sum(len(s.response_ids) for s in mine) / k,
            "finish_reasons": [s.finish_reason for s in mine], "responses": [s.text for s in mine],
            **group_diversity([s.text for s in mine], [s.answer for s in mine]),
        })
    summary = {"num_problems": len(records), "k": k,
               **{f"pass@{j}": v for j, v in mean_pass_at_k([r["correct"] for r in records], k, pass_ks(k)).items()},
               "mean_length": sum(r["mean_length"] for r in records) / len(records),
               "finish_reasons": dict(finish),
               **{m: sum(r[m] for r in records) / len(records)
                  for m in ("unique_answer_ratio", "self_bleu", "edit_diversity")}}
    return records, summary


class Evaluator:
    """The run's held-out sets, scored on the learner replica every eval.every_steps steps and at the end: mean
    pass@1 over eval.samples_per_prompt samples per problem; with k > 1 also pass@k and the answers' diversity."""

    def __init__(self, eval_sets: dict[str, list[PromptRecord]], every_steps: int, total_steps: int,
                 engine: Optional[RolloutEngine], tokenizer, reward: Optional[Reward], k: int,
                 params: SamplingParams, runtime: Optional[RolloutRuntime]):
        self.eval_sets = eval_sets  # metric prefix ("eval" or "eval/<name>") -> held-out prompts
        self.every_steps, self.total_steps = every_steps, total_steps
        self.engine, self.tokenizer, self.reward, self.runtime = engine, tokenizer, reward, runtime
        self.k, self.params = k, params

    @classmethod
    def nothing(cls) -> "Evaluator":
        """For ranks other than the driver: no sets, so never due."""
        return cls({}, 0, 0, None, None, None, 1, SamplingParams(), None)

    def due(self, step: int) -> bool:
        every = self.every_steps
        return bool(self.eval_sets) and every > 0 and (step % every == 0 or step == self.total_steps)

    def evaluate(self) -> dict[str, float]:
        metrics = {}
        for prefix, prompts in self.eval_sets.items():
            _, summary = evaluate_prompts(self.engine, prompts, self.tokenizer, self.reward, self.k, self.params,
                                          self.runtime)
            metrics |= {f"{prefix}/accuracy": summary["pass@1"], f"{prefix}/mean_length": summary["mean_length"]}
            if self.k > 1:  # and the diversity of each problem's k samples, which the paper tracks
                keys = (f"pass@{self.k}", "unique_answer_ratio", "self_bleu")
                metrics |= {f"{prefix}/{key}": summary[key] for key in keys}
        return metrics


def build_evaluator(cfg: RunConfig, engine: RolloutEngine, tokenizer, reward: Reward,
                    runtime: RolloutRuntime) -> Evaluator:
    eval_sets = {}
    if cfg.eval.every_steps:
        paths = {"eval": cfg.eval.path} | {f"eval/{name}": path for name, path in cfg.eval.extra.items()}
        eval_sets = {prefix: load_eval_prompts(cfg, path, tokenizer) for prefix, path in paths.items()}
    return Evaluator(eval_sets, cfg.eval.every_steps, cfg.steps, engine, tokenizer, reward,
                     cfg.eval.samples_per_prompt, sampling_params(cfg, "eval"), runtime)


def run_eval(engine: RolloutEngine, prompts: list[PromptRecord], tokenizer, reward: Reward, k: int, out_dir: Path,
             name: str, params: SamplingParams, runtime: RolloutRuntime,
             save_responses: bool = False) -> dict:
    """Evaluate and write <out_dir>/<name>.jsonl (per problem; with save_responses, the prompt and the
    response texts too) and <out_dir>/<name>.summary.json."""
    records, summary = evaluate_prompts(engine, prompts, tokenizer, reward, k, params, runtime)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{name}.jsonl").open("w") as file:
        for prompt, record in zip(prompts, records):
            if save_responses:
                record = {"prompt": tokenizer.decode(prompt.prompt_ids), **record}
            else:
                record = {key: value for key, value in record.items() if key != "responses"}
            file.write(json.dumps(record) + "\n")
    (out_dir / f"{name}.summary.json").write_text(json.dumps({"benchmark": name, **summary}, indent=2))
    logger.info("%s: %s", name, " ".join(f"pass@{j}={summary[f'pass@{j}']:.3f}" for j in pass_ks(k)))
    return summary


def add_eval_arguments(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="pass@k on benchmarks with the paper's protocol",
        description="e.g. `s2l eval --model runs/hf --data examples/data/gsm8k/test.jsonl --k 4 "
                    "--out runs/eval`")
    ev.add_argument("--model", required=True, help="HF checkpoint directory (also the tokenizer)")
    ev.add_argument("--url", help="sample from this running SGLang server instead of loading --model")
    ev.add_argument("--data", required=True, nargs="+", help="benchmark files (.jsonl/.parquet/datasets dir)")
    ev.add_argument("--out", required=True, help="output directory")
    ev.add_argument("--k", type=int, default=16, help="samples per problem (default 16)")
    ev.add_argument("--template", default="qwen3_nothink", choices=["qwen3_nothink", "dapo", "plain"])
    ev.add_argument("--max-prompts", type=int, default=None, help="evaluate only the first N problems")
    ev.add_argument("--max-new-tokens", type=int, default=4096)
    ev.add_argument("--temperature", type=float, default=0.7)
    ev.add_argument("--top-p", type=float, default=0.8)
    ev.add_argument("--top-k", type=int, default=20)
    ev.add_argument("--presence-penalty", type=float, default=1.5)
    ev.add_argument("--seed", type=int, default=1234)
    ev.add_argument("--save-responses", action="store_true",
                    help="also write each problem's prompt and response texts (why is an answer null?)")
    ev.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    if not args.url:  # a missing or damaged checkpoint: a named error before anything loads
        check_safetensors(require_model_dir(args.model, "--model"))
    elif not Path(args.model).is_dir():
        raise FileNotFoundError(f"--model={args.model}: no such directory (the tokenizer is read from it); "
                                "give the local HF checkpoint directory the server was started with")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, presence_penalty=args.presence_penalty, seed=args.seed)
    engine = build_engine(args.model, args.url or "", name="evaluated", seed=args.seed)
    reward, runtime = build_reward(), RolloutRuntime()
    try:
        for data in args.data:
            prompts = load_prompts(DataConfig(path=data, template=args.template, max_prompt_length=10**6), tokenizer)
            name = Path(data).parent.name if Path(data).stem in ("test", "train") else Path(data).stem
            run_eval(engine, prompts[:args.max_prompts], tokenizer, reward, args.k, Path(args.out), name, params,
                     runtime, save_responses=args.save_responses)
    finally:
        runtime.run(engine.close())
        reward.close()
        runtime.close()
    return 0
