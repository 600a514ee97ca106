"""Assembly of a training run: every object `s2l train` needs, from the config. Nothing runs here: no
checkpoint is loaded and no weights move (those are the first lines of `Trainer.run`). The checkpoint to
resume from is chosen and verified first, so that a damaged one fails before the model is built.

The learner lives on every rank. The rollout side (prompts, engines, explorer, reward, ledger, held-out sets)
lives on the driver, global rank 0; the other ranks get a `NullRollout` and an empty `Evaluator`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Union

import torch

from megatron_s2l import platform
from megatron_s2l.config import RunConfig, to_dict
from megatron_s2l.data import build_dataset
from megatron_s2l.eval.runner import Evaluator, build_evaluator
from megatron_s2l.metrics.logger import build_metrics_logger
from megatron_s2l.model import specs
from megatron_s2l.preflight import check_explorer_tokenizer
from megatron_s2l.reward import build_reward
from megatron_s2l.rollout.collector import NullRollout, RolloutCollector
from megatron_s2l.rollout.engines import build_engine, sampling_params
from megatron_s2l.rollout.ledger import RolloutLedger
from megatron_s2l.rollout.pool import ExplorerPool, tokenizer_hash
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.schedule import build_schedule
from megatron_s2l.rollout.types import RolloutEngine
from megatron_s2l.train.checkpoint import Checkpointer
from megatron_s2l.train.learner import build_learner
from megatron_s2l.train.memory_budget import report_memory_budget
from megatron_s2l.train.stopping import RunControl
from megatron_s2l.train.trainer import Trainer
from megatron_s2l.train.weight_sync import WeightSync


def build_trainer(cfg: RunConfig) -> Trainer:
    """Learner on every rank; rollout side and evaluator on the driver."""
    hf_config = specs.load_hf_config(cfg.model.path)
    run_dir = Path(cfg.logging.run_dir)
    checkpointer = Checkpointer(cfg.checkpoint, cfg.checkpoint.dir or run_dir / "checkpoints", hf_config,
                                cfg.model.path)
    resuming = checkpointer.resume_path() is not None  # verified now: a damaged one fails before the build
    learner = build_learner(cfg, cfg.model.path, cfg.model.megatron_checkpoint)
    report_memory_budget(learner)  # before the first rollout: a layout that cannot fit shows now
    rollout, evaluator, engine, runtime = NullRollout(), Evaluator.nothing(), None, None
    if platform.is_rank0():
        runtime = RolloutRuntime()
        rollout = build_rollout(cfg, learner.args.num_parameters, runtime)
        engine = rollout.learner
        evaluator = build_evaluator(cfg, engine, rollout.tokenizer, rollout.reward, runtime)
    # weights travel in the learner's dtype (engines serve what they were started with: bf16 on GPU, fp32
    # for CPU runs); norms that Megatron keeps in fp32 are cast on the way
    weight_sync = WeightSync(engine, cfg.rollout.weight_sync, runtime, dtype=getattr(torch, cfg.model.dtype),
                             staging_dir=run_dir / "weight_sync", hf_dir=cfg.model.path,
                             verify=cfg.rollout.verify_weight_sync)
    metrics = build_metrics_logger(cfg.logging, cfg.steps, to_dict(cfg), platform.is_rank0(), resuming)
    return Trainer(cfg, learner, rollout, evaluator, weight_sync, checkpointer, metrics,
                   RunControl(cfg.checkpoint.exit_interval))


def build_rollout(cfg: RunConfig, learner_params: int, runtime: RolloutRuntime) -> RolloutCollector:
    """The driver's rollout side: dataset, explorer, learner replica, reward, schedule and ledger."""
    from transformers import AutoTokenizer  # lazy: the other ranks never load it

    tokenizer = AutoTokenizer.from_pretrained(cfg.model.path)
    explorer = build_explorer(cfg)
    replica_url = cfg.rollout.learner_url if cfg.rollout.engine == "sglang" else ""
    learner_engine = build_engine(cfg.model.path, replica_url, name="learner-replica", rollout=cfg.rollout,
                                  seed=cfg.seed, learner_replica=True)
    explorer_size = learner_params  # parameters, for the ledger's FLOPs
    if cfg.explorer.mode != "off" and cfg.explorer.model_path:
        explorer_size = specs.model_args_from_hf(specs.load_hf_config(cfg.explorer.model_path)).num_parameters
    ledger = RolloutLedger(learner_params=learner_params, explorer_params=explorer_size,
                           explorer_is_pool=cfg.explorer.mode == "pool")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return RolloutCollector(
        build_dataset(cfg.data, tokenizer, cfg.seed), build_schedule(cfg.schedule, cfg.rollout.group_size,
                                                                      cfg.t_mix, cfg.steps),
        ledger, learner_engine, sampling_params(cfg, "learner"), tokenizer, build_reward(cfg.reward), runtime,
        prompts_per_step=cfg.rollout.prompts_per_step, explorer=explorer,
        explorer_params=sampling_params(cfg, "explorer"), dynamic_sampling=cfg.rollout.dynamic_sampling,
        max_oversample_rounds=cfg.rollout.max_oversample_rounds, seed=cfg.seed, pad_id=pad_id,
        max_staleness=cfg.rollout.max_staleness, last_step=cfg.steps,
        rollouts_dir=Path(cfg.logging.run_dir) / "rollouts" if cfg.logging.save_rollouts else None)


def build_explorer(cfg: RunConfig) -> Union[ExplorerPool, RolloutEngine, None]:
    """The explorer: an offline pool (checked against the learner's tokenizer), a frozen engine, or None."""
    mode = cfg.explorer.mode
    if mode == "off":
        return None
    if mode == "pool":
        return ExplorerPool.open(cfg.explorer.pool_path, tokenizer_hash(cfg.model.path), seed=cfg.seed,
                                 max_response_length=cfg.rollout.max_response_length)
    check_explorer_tokenizer(cfg)
    return build_engine(cfg.explorer.model_path, cfg.explorer.url, name="explorer", rollout=cfg.rollout,
                        seed=cfg.seed + 1, version="frozen")
