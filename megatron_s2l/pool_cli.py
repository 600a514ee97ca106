"""`s2l pool build | inspect`: make an explorer pool from a run config, and look inside one.

`build` reads the same YAML as `s2l train` (explorer.model_path, explorer.pool_path, explorer.n_per_prompt,
explorer.temperature/top_p, rollout.max_response_length, data.*, seed), so the pool is made from exactly the
prompts the run will train on. It samples with LocalEngine (transformers, CPU or one GPU) and resumes an
interrupted build when rerun with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from megatron_s2l.config import load_config
from megatron_s2l.data import load_prompts, read_rows
from megatron_s2l.data.dataset import chat_template_digest
from megatron_s2l.preflight import preflight_pool_build
from megatron_s2l.reward import build_reward
from megatron_s2l.rollout.engines import build_engine, sampling_params
from megatron_s2l.rollout.pool_manifest import data_index

logger = logging.getLogger(__name__)


def add_pool_arguments(subparsers) -> None:
    pool = subparsers.add_parser("pool", help="build or inspect an offline explorer pool",
                                 description="The explorer's samples, generated once and reused by every "
                                             "S2L-PO run (and learner) on the same prompts.")
    sub = pool.add_subparsers(dest="pool_command", required=True)
    build = sub.add_parser("build", help="sample explorer responses for every training prompt",
                           description="e.g. `s2l pool build --config examples/configs/tiny_cpu.yaml "
                                       "explorer.n_per_prompt=8`; rerun the same command to resume.")
    build.add_argument("--config", help="run YAML (the same file `s2l train` uses)")
    build.add_argument("--out", help="pool directory (default: explorer.pool_path)")
    build.add_argument("--chunk-size", type=int, default=64, help="prompts per chunk file (default 64)")
    build.add_argument("--chunks-in-flight", type=int, default=None,
                       help="chunks sampled at once (default: 4 from a server, so that it stays busy while a "
                            "chunk's longest responses finish; 1 in-process)")
    build.add_argument("--explorer-url", default=None,
                       help="sample from this running SGLang server of the explorer (at scale) instead of loading "
                            "explorer.model_path in-process")
    build.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    build.add_argument("--batch-rows", type=int, default=64,
                       help="sequences per forward pass (prompts x samples); lower it if memory runs out")
    build.add_argument("--score", action="store_true",
                       help="score the samples with the reward module, for pool statistics (training "
                            "re-scores explorer samples anyway)")
    build.add_argument("overrides", nargs="*", help="key.sub=value overrides of the YAML")
    build.set_defaults(handler=run_build)
    inspect = sub.add_parser("inspect", help="manifest, statistics and example samples of a pool")
    inspect.add_argument("path", help="pool directory")
    inspect.add_argument("--learner-tokenizer", help="check the pool against this learner's tokenizer dir")
    inspect.add_argument("--show", type=int, default=0, help="print this many samples of the first prompt")
    inspect.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    inspect.set_defaults(handler=run_inspect)


def run_build(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, [*args.overrides, "explorer.mode=pool"]
                      + ([f"explorer.pool_path={args.out}"] if args.out else []))
    preflight_pool_build(cfg, args.explorer_url or "")  # files, lengths and rows: before a model loads

    def engine():
        return build_engine(cfg.explorer.model_path, args.explorer_url or "", name="explorer",
                            rollout=cfg.rollout, seed=cfg.seed, device=args.device,
                            max_batch_rows=args.batch_rows)

    # a server stays busy through each chunk's tail; in-process generation runs one call at a time anyway
    in_flight = args.chunks_in_flight if args.chunks_in_flight is not None else 4 if args.explorer_url else 1
    try:
        build_from_config(cfg, engine, chunk_size=args.chunk_size, chunks_in_flight=in_flight,
                          score=args.score)
    except KeyboardInterrupt:
        from megatron_s2l import platform  # lazy: torch (a fast --help)

        print(f"explorer pool build stopped (Ctrl-C); the finished chunks are kept in {cfg.explorer.pool_path} "
              "and the same command resumes the build", file=sys.stderr)
        platform.end_as_ctrl_c()
    print(f"explorer pool ready: {cfg.explorer.pool_path}")
    return 0


def build_from_config(cfg, make_engine, chunk_size: int = 64, chunks_in_flight: int = 1,
                      score: bool = False) -> None:
    """The pool of a run config (explorer.*, data.*, rollout.max_response_length, seed), sampled by the engine
    `make_engine()` returns (made once the prompts are read: a bad dataset fails before a model loads)."""
    from megatron_s2l.rollout.pool import build_pool  # lazy: pyarrow, torch (a fast --help)

    prompts = _load_prompts(cfg)
    build_pool(make_engine(), prompts, cfg.explorer.n_per_prompt, sampling_params(cfg, "explorer"),
               cfg.explorer.pool_path, explorer_model=cfg.explorer.model_path,
               tokenizer_dir=cfg.explorer.model_path, dataset_name=cfg.data.path,
               reward=_build_reward(cfg) if score else None, chunk_size=chunk_size, seed=cfg.seed,
               chunks_in_flight=chunks_in_flight,
               data_index=_data_index(cfg) if cfg.data.path else None)


def run_inspect(args: argparse.Namespace) -> int:
    # lazy: pyarrow, torch (a fast --help)
    from megatron_s2l.rollout.pool import CHUNKS, MANIFEST, ExplorerPool, tokenizer_hash

    path = Path(args.path)
    if not (path / MANIFEST).is_file():
        raise FileNotFoundError(f"{path} has no {MANIFEST}; is it a pool made by `s2l pool build`?")
    manifest = json.loads((path / MANIFEST).read_text())
    report: dict = {"manifest": manifest}
    if args.learner_tokenizer:
        learner_hash = tokenizer_hash(args.learner_tokenizer)
        report["learner_tokenizer_hash"] = learner_hash
        report["tokenizer_matches"] = learner_hash == manifest["tokenizer_hash"]
    if manifest.get("status") == "complete":
        pool = ExplorerPool.open(path, manifest["tokenizer_hash"])
        report["stats"] = pool.stats()
        if args.show and pool.num_prompts:
            first = min(pool.prompt_stats())
            report["samples"] = [{"prompt_id": s.prompt_id, "sample_index": i, "finish_reason": s.finish_reason,
                                  "reward": s.reward, "answer": s.answer, "text": s.text}
                                 for i, s in enumerate(pool.samples(first)[:args.show])]
    else:
        report["chunks_done"] = len(list((path / CHUNKS).glob("chunk-*.parquet")))
    print(json.dumps(report, indent=2) if args.json else _describe(report))
    return 0


def _describe(report: dict) -> str:
    m = report["manifest"]
    lines = [f"explorer pool: {m['status']}, format {m['format_version']}, created {m['created']}",
             f"  explorer       {m['explorer_model']} (engine {m['engine']})",
             f"  tokenizer      {m['tokenizer_hash']}",
             f"  dataset        {m['dataset_name'] or '-'} ({m['dataset_hash']}), {m['num_prompts']} prompts",
             f"  sampling       n={m['n_per_prompt']} "
             + " ".join(f"{k}={v}" for k, v in m["sampling"].items())]
    if "tokenizer_matches" in report:
        verdict = "matches" if report["tokenizer_matches"] else "DIFFERS: this learner cannot use the pool"
        lines.append(f"  learner tok.   {report['learner_tokenizer_hash']} {verdict}")
    if "chunks_done" in report:
        lines.append(f"  progress       {report['chunks_done']}/{m['num_chunks']} chunks; "
                     "rerun the build to resume")
    lines += [f"  {k:<30} {v:.4g}" for k, v in report.get("stats", {}).items()]
    for s in report.get("samples", []):
        lines.append(f"--- {s['prompt_id']} #{s['sample_index']} {s['finish_reason']} reward={s['reward']} "
                     f"answer={s['answer']!r}\n{s['text']}")
    return "\n".join(lines)


def _load_prompts(cfg):
    """The run's training prompts as PromptRecords (data module: dataset, template, length filter)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path or cfg.explorer.model_path)
    return list(load_prompts(cfg.data, tokenizer))


def _data_index(cfg) -> dict:
    """The rows the pool's prompts come from and how they were rendered (pool_manifest.data_index)."""
    rows, _ = read_rows(cfg.data.path, cfg.data.on_bad_row)
    return data_index(rows, cfg.data.template, cfg.data.max_prompt_length,
                      chat_template_digest(cfg.model.path or cfg.explorer.model_path))


def _build_reward(cfg):
    return build_reward(cfg.reward)
