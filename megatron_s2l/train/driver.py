"""The driver rank's side of training: prompts, rollout engines, explorer pool, collector, scorer, the
rollout ledger and periodic evaluation. Only global rank 0 builds these; the other ranks only learn.

`build_trainer` composes everything for `s2l train`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch

from megatron_s2l import platform
from megatron_s2l.config import RunConfig, to_dict, to_yaml
from megatron_s2l.metrics.ledger import RolloutLedger
from megatron_s2l.metrics.logger import build_metrics_logger
from megatron_s2l.model import specs
from megatron_s2l.rollout.collector import RolloutCollector, build_collector
from megatron_s2l.rollout.engine import RolloutEngine
from megatron_s2l.rollout.pool import ExplorerPool, tokenizer_hash
from megatron_s2l.rollout.schedule import build_schedule
from megatron_s2l.rollout.types import Group
from megatron_s2l.train.checkpoint import Checkpointer
from megatron_s2l.train.learner import build_learner
from megatron_s2l.train.memory_budget import report_memory_budget
from megatron_s2l.train.trainer import Trainer
from megatron_s2l.train.weight_sync import WeightSync

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class RolloutSide:
    """Everything the driver needs to turn a step number into scored groups."""

    cfg: RunConfig
    dataset: object  # megatron_s2l.data prompt dataset with a resumable cursor
    collector: RolloutCollector
    learner_engine: RolloutEngine
    explorer: Optional[object]  # ExplorerPool | RolloutEngine | None
    scorer: object
    tokenizer: object
    ledger: RolloutLedger
    eval_sets: dict[str, list]  # metric prefix ("eval" or "eval/<name>") -> held-out prompts
    pad_id: int
    dp_size: int

    def collect(self, step: int) -> tuple[list[Group], dict[str, float]]:
        """This step's scored groups; a failed collection consumes no prompts or pool draws."""
        before = self.state_dict()  # a fresh copy, as for checkpoints
        try:
            prompts = self.dataset.next_batch(self.cfg.rollout.prompts_per_step)
            groups, metrics = self.collector.collect(prompts, step)
        except BaseException:
            self.load_state_dict(before)
            raise
        kept = groups[: len(groups) - len(groups) % self.groups_multiple]
        metrics["rollout/num_groups_trimmed"] = float(len(groups) - len(kept))
        metrics |= _weight_versions(kept)
        if not kept:
            raise RuntimeError(f"step {step}: dynamic sampling kept {len(groups)} groups, fewer than the "
                               f"{self.groups_multiple} the learner layout needs; raise rollout.max_oversample_rounds")
        return kept, metrics

    @property
    def groups_multiple(self) -> int:
        """Groups per step must make a batch that splits into mini-batches x DP ranks x micro-batches."""
        rows = self.cfg.optimizer.mini_batches_per_step * self.dp_size * self.cfg.parallel.sequences_multiple
        return rows // math.gcd(rows, self.cfg.rollout.group_size)

    def eval_due(self, step: int, total: int) -> bool:
        every = self.cfg.eval.every_steps
        return bool(self.eval_sets) and every > 0 and (step % every == 0 or step == total)

    def evaluate(self) -> dict[str, float]:
        """Mean pass@1 over k samples per problem of the learner replica, whose weights were just synced, on
        each held-out set; with k > 1 also pass@k and the answers' diversity."""
        from megatron_s2l.eval.runner import eval_sampling_params, evaluate_prompts

        k = self.cfg.eval.samples_per_prompt
        params = eval_sampling_params(self.cfg)
        metrics = {}
        for prefix, prompts in self.eval_sets.items():
            _, summary = evaluate_prompts(self.learner_engine, prompts, self.tokenizer, self.scorer, k, params,
                                          self.collector.loop)
            metrics |= {f"{prefix}/accuracy": summary["pass@1"], f"{prefix}/mean_length": summary["mean_length"]}
            if k > 1:  # and the diversity of each problem's k samples, which the paper tracks
                keys = (f"pass@{k}", "unique_answer_ratio", "self_bleu")
                metrics |= {f"{prefix}/{key}": summary[key] for key in keys}
        return metrics

    def state_dict(self) -> dict:
        state = {"dataset": self.dataset.state_dict(), "schedule": self.collector.schedule.state_dict(),
                 "ledger": self.ledger.state_dict()}
        if isinstance(self.explorer, ExplorerPool):
            state["pool"] = self.explorer.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state["dataset"])
        self.collector.schedule.load_state_dict(state["schedule"])
        self.ledger.load_state_dict(state["ledger"])
        if "pool" in state and isinstance(self.explorer, ExplorerPool):
            self.explorer.load_state_dict(state["pool"])

    def close(self) -> None:
        loop = self.collector.loop
        for engine in (self.learner_engine, self.explorer):
            if engine is not None and hasattr(engine, "close") and not isinstance(engine, ExplorerPool):
                loop.run_until_complete(engine.close())
        self.scorer.close()
        self.collector.close()


def _weight_versions(groups: list[Group]) -> dict[str, float]:
    """Oldest weight version behind this step's learner samples (the replica's staleness, in steps)."""
    versions = [s.weight_version for g in groups for s in g.samples if s.source == "learner"]
    numeric = [float(v) for v in versions if v.isdigit()]
    return {"rollout/learner_weight_version": min(numeric)} if numeric else {}


# ---------------------------------------------------------------------------------------------
# building


def build_learner_engine(cfg: RunConfig) -> RolloutEngine:
    """The learner replica: in-process transformers, or SGLang servers (weights hot-swapped each step)."""
    if cfg.rollout.engine == "local":
        from megatron_s2l.rollout.local import build_local_engine

        return build_local_engine(cfg.model.path, seed=cfg.seed, version="0")
    from megatron_s2l.rollout.sglang import SGLangEngine

    return SGLangEngine(cfg.rollout.learner_url, worker_urls=cfg.rollout.learner_worker_urls or None,
                        update_mode=cfg.rollout.weight_sync, bucket_mb=cfg.rollout.weight_sync_bucket_mb,
                        api_key=cfg.rollout.api_key, request_timeout_s=cfg.rollout.request_timeout_s,
                        master_address=os.environ.get("MASTER_ADDR", "127.0.0.1"), name="learner-replica")


def build_explorer(cfg: RunConfig):
    """The explorer: an offline pool (checked against the learner's tokenizer), a frozen engine, or None."""
    mode = cfg.explorer.mode
    if mode == "off":
        return None
    learner_tokenizer = tokenizer_hash(cfg.model.path)
    if mode == "pool":
        return ExplorerPool.open(cfg.explorer.pool_path, learner_tokenizer, seed=cfg.seed)
    if cfg.explorer.model_path and tokenizer_hash(cfg.explorer.model_path) != learner_tokenizer:
        raise ValueError(f"explorer {cfg.explorer.model_path} and learner {cfg.model.path} use different "
                         "tokenizers; S2L-PO needs models of one family (the learner scores the explorer's tokens)")
    if cfg.explorer.url:
        from megatron_s2l.rollout.sglang import SGLangEngine

        return SGLangEngine(cfg.explorer.url, api_key=cfg.rollout.api_key,
                            request_timeout_s=cfg.rollout.request_timeout_s, name="explorer")
    from megatron_s2l.rollout.local import build_local_engine

    return build_local_engine(cfg.explorer.model_path, seed=cfg.seed + 1, version="frozen")


def build_rollout_side(cfg: RunConfig, learner_params: int, dp_size: int) -> RolloutSide:
    from transformers import AutoTokenizer

    from megatron_s2l.data import build_dataset
    from megatron_s2l.eval.runner import load_eval_prompts
    from megatron_s2l.reward import build_scorer

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    dataset = build_dataset(cfg.data, tokenizer, cfg.seed)
    eval_sets = {}
    if cfg.eval.every_steps:
        paths = {"eval": cfg.eval.path} | {f"eval/{name}": path for name, path in cfg.eval.extra.items()}
        eval_sets = {prefix: load_eval_prompts(cfg, path, tokenizer) for prefix, path in paths.items()}
    explorer = build_explorer(cfg)
    learner_engine = build_learner_engine(cfg)
    scorer = build_scorer(cfg.reward)
    schedule = build_schedule(cfg.schedule, cfg.rollout.group_size, cfg.t_mix, cfg.steps)
    collector = build_collector(cfg.rollout, cfg.explorer, schedule, learner_engine, explorer, tokenizer, scorer,
                                more_prompts=dataset.next_batch, seed=cfg.seed, loop=asyncio.new_event_loop())
    explorer_params = learner_params
    if cfg.explorer.mode != "off" and cfg.explorer.model_path:
        explorer_params = specs.model_args_from_hf(specs.load_hf_config(cfg.explorer.model_path)).num_parameters
    ledger = RolloutLedger(learner_params=learner_params, explorer_params=explorer_params,
                           explorer_is_pool=cfg.explorer.mode == "pool")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RolloutSide(cfg, dataset, collector, learner_engine, explorer, scorer, tokenizer, ledger, eval_sets,
                       pad_id, dp_size)


def build_trainer(cfg: RunConfig, dims: platform.ParallelDims) -> Trainer:
    """Learner on every rank; rollout side on the driver; resume when asked."""
    hf_config = specs.load_hf_config(cfg.model.path)
    args = specs.model_args_from_hf(hf_config)
    learner = build_learner(cfg, cfg.model.path, cfg.model.megatron_checkpoint)
    report_memory_budget(learner)  # before the first rollout: a layout that cannot fit shows now
    run_dir = Path(cfg.logging.run_dir)
    rollout = build_rollout_side(cfg, args.num_parameters, dims.dp) if platform.is_rank0() else None
    loop = rollout.collector.loop if rollout is not None else None
    engine = rollout.learner_engine if rollout is not None else None
    weight_sync = WeightSync(engine, cfg.rollout.weight_sync, loop, dtype=_engine_dtype(cfg),
                             staging_dir=run_dir / "weight_sync", hf_dir=cfg.model.path,
                             verify=cfg.rollout.verify_weight_sync)
    checkpointer = Checkpointer(cfg.checkpoint, cfg.checkpoint.dir or run_dir / "checkpoints", hf_config,
                                cfg.model.path)
    resume = checkpointer.resume_path()
    metrics = build_metrics_logger(cfg.logging, cfg.steps, to_dict(cfg), platform.is_rank0(),
                                   resuming=resume is not None)
    step = 0
    if resume is not None:
        state = checkpointer.load(resume, learner)
        step = state["step"]
        if rollout is not None:
            rollout.load_state_dict(state)
        weight_sync.sync(learner, version=str(step))  # the replica serves the resumed weights
    return Trainer(cfg, learner, rollout, weight_sync, checkpointer, metrics, step=step)


def _engine_dtype(cfg: RunConfig) -> torch.dtype:
    """Weights travel in the learner's dtype (engines serve what they were started with: bf16 on GPU,
    fp32 for CPU runs); norms that Megatron keeps in fp32 are cast on the way."""
    return getattr(torch, cfg.model.dtype)


def run_training(cfg: RunConfig) -> int:
    """`s2l train`: set up the process group, train, and always tear down."""
    dims = platform.init_distributed(cfg.parallel.tp, cfg.parallel.pp, seed=cfg.seed,
                                     timeout_minutes=cfg.parallel.distributed_timeout_minutes,
                                     driver_wait_minutes=cfg.parallel.driver_wait_minutes)
    Path(cfg.logging.run_dir).mkdir(parents=True, exist_ok=True)
    if platform.is_rank0():
        (Path(cfg.logging.run_dir) / "config.yaml").write_text(to_yaml(cfg))
    trainer = build_trainer(cfg, dims)
    try:
        trainer.run()
    finally:
        trainer.close()
        platform.destroy_distributed()
    if trainer.stop_signal == "SIGINT":  # saved
        platform.end_as_ctrl_c()
    return 0
