"""`s2l eval`: pass@k of a model on benchmarks with the paper's protocol (16 samples per problem,
Qwen3 "nothink" sampling: T 0.7, top_p 0.8, top_k 20, presence penalty 1.5, question + " /no_think").

Writes per-problem JSONL and a summary JSON (pass@1..k, mean length, finish reasons, diversity) per
benchmark. Any RolloutEngine works: LocalEngine from --model, or a running SGLang server via --url.
The trainer's periodic evaluation uses `evaluate_prompts` directly.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import logging
from pathlib import Path

from megatron_s2l.eval.diversity import group_diversity
from megatron_s2l.eval.passk import mean_pass_at_k, pass_at_k
from megatron_s2l.rollout.engine import RolloutEngine
from megatron_s2l.rollout.types import SamplingParams

logger = logging.getLogger(__name__)


def pass_ks(k: int) -> list[int]:
    """1, 2, 4, ... up to k, and k itself."""
    ks = [1]
    while ks[-1] * 2 <= k:
        ks.append(ks[-1] * 2)
    return sorted(set(ks + [k]))


def eval_sampling_params(cfg) -> SamplingParams:
    """How a run's held-out sets are sampled (cfg: RunConfig): eval.* sampling, the rollout's length limit."""
    ev = cfg.eval
    return SamplingParams(max_new_tokens=cfg.rollout.max_response_length, temperature=ev.temperature,
                          top_p=ev.top_p, top_k=ev.top_k, presence_penalty=ev.presence_penalty, seed=cfg.seed)


def load_eval_prompts(cfg, path: str, tokenizer) -> list:
    """A run's held-out set (cfg: RunConfig): rendered like its training data, in file order, at most
    eval.max_prompts of them."""
    from megatron_s2l.config import DataConfig, to_dict
    from megatron_s2l.data import load_prompts

    data = DataConfig(**{**to_dict(cfg.data), "path": path, "shuffle": False})
    return load_prompts(data, tokenizer)[: cfg.eval.max_prompts]


def evaluate_prompts(engine: RolloutEngine, prompts: list, tokenizer, scorer, k: int, params: SamplingParams,
                     loop: asyncio.AbstractEventLoop) -> tuple[list[dict], dict]:
    """k samples per prompt -> per-problem records and a summary (pass@1..k, lengths, finish reasons)."""
    generations = loop.run_until_complete(engine.generate([list(p.prompt_ids) for p in prompts], k, params))
    texts = tokenizer.batch_decode([g.response_ids for gens in generations for g in gens], skip_special_tokens=True)
    results = scorer.score_batch(texts, [p.gold for p in prompts for _ in range(k)])
    records, finish = [], collections.Counter()
    for i, (prompt, gens) in enumerate(zip(prompts, generations)):
        mine = results[i * k:(i + 1) * k]
        correct = sum(r.reward > 0 for r in mine)
        finish.update(g.finish_reason for g in gens)
        records.append({
            "prompt_id": prompt.prompt_id, "gold": prompt.gold, "n": k, "correct": correct,
            **{f"pass@{j}": pass_at_k(k, correct, j) for j in pass_ks(k)},
            "answers": [r.answer for r in mine], "mean_length": sum(len(g.response_ids) for g in gens) / k,
            "finish_reasons": [g.finish_reason for g in gens],
            **group_diversity(texts[i * k:(i + 1) * k], [r.answer for r in mine]),
        })
    summary = {"num_problems": len(records), "k": k,
               **{f"pass@{j}": v for j, v in mean_pass_at_k([r["correct"] for r in records], k, pass_ks(k)).items()},
               "mean_length": sum(r["mean_length"] for r in records) / len(records),
               "finish_reasons": dict(finish),
               **{m: sum(r[m] for r in records) / len(records)
                  for m in ("unique_answer_ratio", "self_bleu", "edit_diversity")}}
    return records, summary


def run_eval(engine: RolloutEngine, prompts: list, tokenizer, scorer, k: int, out_dir: Path, name: str,
             params: SamplingParams, loop: asyncio.AbstractEventLoop) -> dict:
    """Evaluate and write <out_dir>/<name>.jsonl (per problem) and <out_dir>/<name>.summary.json."""
    records, summary = evaluate_prompts(engine, prompts, tokenizer, scorer, k, params, loop)
    out_dir.mkdir(parents=True, exist_ok=True)
    with (out_dir / f"{name}.jsonl").open("w") as file:
        for record in records:
            file.write(json.dumps(record) + "\n")
    (out_dir / f"{name}.summary.json").write_text(json.dumps({"benchmark": name, **summary}, indent=2))
    logger.info("%s: %s", name, " ".join(f"pass@{j}={summary[f'pass@{j}']:.3f}" for j in pass_ks(k)))
    return summary


def add_eval_arguments(subparsers) -> None:
    ev = subparsers.add_parser(
        "eval", help="pass@k on benchmarks with the paper's protocol",
        description="e.g. `s2l eval --model runs/hf --data ../shared/data/aime24/test.jsonl --k 16 --out runs/eval`")
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
    ev.set_defaults(handler=run_eval_command)


def run_eval_command(args: argparse.Namespace) -> int:
    from transformers import AutoTokenizer

    from megatron_s2l.config import DataConfig
    from megatron_s2l.data import load_prompts
    from megatron_s2l.reward import build_scorer

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, presence_penalty=args.presence_penalty, seed=args.seed)
    engine = _build_engine(args)
    scorer, loop = build_scorer(), asyncio.new_event_loop()
    try:
        for data in args.data:
            prompts = load_prompts(DataConfig(path=data, template=args.template, max_prompt_length=10**6), tokenizer)
            name = Path(data).parent.name if Path(data).stem in ("test", "train") else Path(data).stem
            run_eval(engine, prompts[:args.max_prompts], tokenizer, scorer, args.k, Path(args.out), name, params, loop)
    finally:
        loop.run_until_complete(engine.close())
        scorer.close()
        loop.close()
    return 0


def _build_engine(args: argparse.Namespace) -> RolloutEngine:
    if args.url:
        from megatron_s2l.rollout.sglang import SGLangEngine

        return SGLangEngine(args.url)
    from megatron_s2l.rollout.local import build_local_engine

    return build_local_engine(args.model, seed=args.seed)
