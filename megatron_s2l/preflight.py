"""Fail fast: everything `s2l train` can check before torch.distributed and the model are built, in a second
or two instead of after the learner's build (24 s at 135M parameters, minutes at 8B).

Checked, each failure one line naming the file, the field and the fix (exit code 2 from the CLI):
  model      model.path (and an in-process online explorer) is a local HF folder with config.json, tokenizer
             files and whole safetensors files; an explicit checkpoint.resume is a complete checkpoint
  lengths    data.max_prompt_length + rollout.max_response_length fit the model's max_position_embeddings
  layout     TP x PP divides the world and the model; a step's G x prompts_per_step sequences split into
             mini-batches x data-parallel ranks x micro-batches
  driver     (global rank 0 only, which owns them) the run folder holds no other run (metrics/runs.py); every
             training and held-out row parses and few enough golds are empty; the explorer pool matches the
             run and covers its prompts (rollout/pool_manifest.py)
`s2l pool build` runs the model, lengths and data checks that concern it (preflight_pool_build).
Sampling ranges (temperature, top_p, top_k) are the config's own validation, so --print-config catches them
too. Nothing here imports torch; only a pool made before data indexes existed needs the tokenizer (a few
seconds) to tell which prompts it covers.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

from megatron_s2l.config import ConfigError, RunConfig, check_parallel_fits_model, to_dict
from megatron_s2l.data.dataset import chat_template_digest, load_prompts
from megatron_s2l.data.loaders import RawRow, drop_bad_golds, read_rows
from megatron_s2l.metrics.runs import check_run_dir, clear_run
from megatron_s2l.model.files import check_safetensors, load_hf_config, require_model_dir
from megatron_s2l.rollout import pool_manifest

logger = logging.getLogger(__name__)

TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer.model")
CHECKPOINT_STATE = "trainer_state.json"  # what a complete checkpoint holds (train/checkpoint.py)


def preflight_train(cfg: RunConfig, world_size: int | None = None, rank: int | None = None) -> None:
    """Every check of this module for one process of `s2l train` (world size and rank from torchrun's
    environment unless given). With logging.overwrite=true an earlier run's records are deleted here, once
    every check has passed."""
    start = time.perf_counter()
    world_size = int(os.environ.get("WORLD_SIZE", "1")) if world_size is None else world_size
    rank = int(os.environ.get("RANK", "0")) if rank is None else rank
    hf_config = check_model(cfg.model.path, "model.path")
    check_lengths(cfg, hf_config, f"model.path={cfg.model.path}")
    check_layout(cfg, hf_config, world_size)
    check_resume(cfg)
    if cfg.explorer.mode == "online" and not cfg.explorer.url:  # an explorer loaded in-process
        explorer = cfg.explorer.model_path
        check_lengths(cfg, check_model(explorer, "explorer.model_path"), f"explorer.model_path={explorer}")
    check_explorer_tokenizer(cfg)
    if rank == 0:  # the driver owns the run folder, the prompts and the explorer
        run_dir = Path(cfg.logging.run_dir)
        held = check_run_dir(run_dir, cfg.checkpoint.dir or run_dir / "checkpoints", to_dict(cfg),
                             resuming=cfg.checkpoint.resume != "none", overwrite=cfg.logging.overwrite)
        rows = check_data(cfg)
        if cfg.explorer.mode == "pool":
            check_pool(cfg, rows)
        if held:
            clear_run(run_dir, held)
            logger.warning("logging.overwrite=true: deleted the earlier run's records in %s (%s)", run_dir,
                           ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else ""))
    logger.info("preflight checks passed in %.2f s", time.perf_counter() - start)


def preflight_pool_build(cfg: RunConfig, explorer_url: str = "") -> None:
    """What `s2l pool build` can check before it loads a model: the explorer's folder (its whole checkpoint and
    context when it samples in-process; its tokenizer when a server samples), the tokenizer that renders the
    prompts, and every training row."""
    if not cfg.explorer.model_path:
        raise ConfigError("explorer.model_path is empty; set it to the explorer's HF checkpoint directory (its "
                          "tokenizer is the pool's, also when --explorer-url samples)")
    if explorer_url:
        check_tokenizer(cfg.explorer.model_path, "explorer.model_path")
    else:
        hf_config = check_model(cfg.explorer.model_path, "explorer.model_path")
        check_lengths(cfg, hf_config, f"explorer.model_path={cfg.explorer.model_path}")
    if cfg.model.path:
        check_tokenizer(cfg.model.path, "model.path")
    check_data(cfg, held_out=False)


def check_model(path: str, field: str) -> dict:
    """A local HF checkpoint folder with tokenizer files and whole safetensors files; returns its config."""
    folder = check_tokenizer(path, field)
    check_safetensors(folder)
    return load_hf_config(folder)


def check_tokenizer(path: str, field: str) -> Path:
    """A local HF checkpoint folder (config.json) with tokenizer files."""
    folder = require_model_dir(path, field)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise FileNotFoundError(f"{field}={path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); copy "
                                "the model's tokenizer into that folder")
    return folder


def check_explorer_tokenizer(cfg: RunConfig) -> None:
    """An online explorer's token ids mean what they mean to the learner (which scores them); a pool's
    tokenizer is checked with the pool."""
    explorer = cfg.explorer.model_path
    if cfg.explorer.mode != "online" or not explorer:
        return
    if pool_manifest.tokenizer_hash(explorer) != pool_manifest.tokenizer_hash(cfg.model.path):
        raise ValueError(f"explorer.model_path={explorer} and model.path={cfg.model.path} use different "
                         "tokenizers; S2L-PO needs models of one family (the learner scores the explorer's "
                         "tokens): pick an explorer with the learner's tokenizer")


def check_lengths(cfg: RunConfig, hf_config: dict, model: str) -> None:
    """A prompt and its response fit the context (max_position_embeddings) of `model` ("field=path")."""
    limit = hf_config.get("max_position_embeddings")
    prompt, response = cfg.data.max_prompt_length, cfg.rollout.max_response_length
    if limit and prompt + response > limit:
        fix = (f"lower rollout.max_response_length to {limit - prompt} (or data.max_prompt_length)"
               if limit > prompt else f"lower data.max_prompt_length below {limit}")
        raise ConfigError(f"data.max_prompt_length={prompt} + rollout.max_response_length={response} = "
                          f"{prompt + response} tokens, more than max_position_embeddings={limit} in the "
                          f"config.json of {model}: {fix}")


def check_layout(cfg: RunConfig, hf_config: dict, world_size: int) -> None:
    """TP x PP fits the world and the model, and a step's sequences split into mini-batches x data-parallel
    ranks x micro-batches (the learner trims whole groups only when dynamic sampling came up short)."""
    parallel = cfg.parallel
    heads = hf_config.get("num_attention_heads", 1)
    check_parallel_fits_model(parallel, heads, hf_config.get("num_key_value_heads", heads),
                              hf_config.get("num_hidden_layers", 1))
    if world_size % (parallel.tp * parallel.pp):
        raise ConfigError(f"parallel.tp={parallel.tp} x parallel.pp={parallel.pp} does not divide the "
                          f"{world_size} launched processes (torchrun --nproc-per-node x nodes); launch a "
                          f"multiple of {parallel.tp * parallel.pp} processes, or change parallel.tp/pp")
    dp, mini = world_size // (parallel.tp * parallel.pp), cfg.optimizer.mini_batches_per_step
    prompts, group = cfg.rollout.prompts_per_step, cfg.rollout.group_size
    unit = mini * dp * parallel.sequences_multiple
    if (prompts * group) % unit == 0:
        return
    split = f"optimizer.mini_batches_per_step={mini} x data-parallel {dp}"
    fixes = [f"rollout.prompts_per_step a multiple of {unit // math.gcd(unit, group)}"]
    if not parallel.micro_batch_tokens:
        split += f" x parallel.micro_batch_size={parallel.micro_batch_size}"
        per_rank = prompts * group // (mini * dp) if (prompts * group) % (mini * dp) == 0 else 0
        if per_rank:
            sizes = [d for d in range(1, per_rank + 1) if per_rank % d == 0]
            fixes.insert(0, f"parallel.micro_batch_size from {sizes[-8:]}")
    raise ConfigError(f"a step's {prompts * group} sequences (rollout.prompts_per_step={prompts} x "
                      f"rollout.group_size={group}) do not split into {split}; use {' or '.join(fixes)}")


def check_resume(cfg: RunConfig) -> None:
    resume = cfg.checkpoint.resume
    if resume not in ("none", "auto") and not (Path(resume) / CHECKPOINT_STATE).is_file():
        raise FileNotFoundError(f"checkpoint.resume={resume}: not a complete checkpoint ({CHECKPOINT_STATE} "
                                "missing); give a step_* directory of a finished save, or `auto` for the "
                                "latest")


def check_data(cfg: RunConfig, held_out: bool = True) -> list[RawRow]:
    """Every row of the training set and (`held_out`) of the held-out sets in use parses, and few enough golds
    are empty; returns the training rows with a usable gold."""
    if not cfg.data.path:
        raise ConfigError("data.path is empty: set it to the training prompts (.jsonl, .parquet or a "
                          "datasets directory)")
    held_out = [cfg.eval.path, *cfg.eval.extra.values()] if held_out and cfg.eval.every_steps else []
    for path in [cfg.data.path, *held_out]:
        rows, _ = read_rows(path, cfg.data.on_bad_row)
        rows = drop_bad_golds(rows, path, cfg.data.max_bad_gold_fraction)
        if not rows:
            raise ValueError(f"{path}: no usable rows; every row was malformed or had no gold answer")
        if path == cfg.data.path:
            train_rows = rows
    return train_rows


def check_pool(cfg: RunConfig, rows: list[RawRow]) -> None:
    """The explorer pool is complete, has the learner's tokenizer, matches the run (pool_manifest), and holds
    every training prompt."""
    path = cfg.explorer.pool_path
    manifest = pool_manifest.read_manifest(path)
    pool_manifest.check_learner_tokenizer(path, manifest, cfg.model.path)
    pool_manifest.check_against_run(path, manifest, cfg)
    data = cfg.data
    missing = pool_manifest.uncovered_rows(path, rows, data.template, data.max_prompt_length,
                                           chat_template_digest(cfg.model.path))
    missing = [row.where for row in missing] if missing is not None else _uncovered_by_rendering(cfg)
    if missing:
        lines = ", ".join(where.removeprefix(f"{data.path}:") for where in missing[:5])
        lines += ", ..." if len(missing) > 5 else ""
        raise ValueError(f"explorer.pool_path={path} lacks {len(missing)} of the prompts of "
                         f"data.path={data.path} (line {lines}); it was built from "
                         f"{manifest.get('dataset_name') or 'other data'}: build a pool from this run's data "
                         "(`s2l pool build --config <this run's YAML>`), or point explorer.pool_path at one")


def _uncovered_by_rendering(cfg: RunConfig) -> list[str]:
    """Where the training prompts the pool lacks come from, by rendering every prompt (pools without a data
    index, or built with another template): the exact check, at the cost of loading the tokenizer."""
    import pyarrow.parquet as pq  # lazy: pyarrow (this path only)
    from transformers import AutoTokenizer  # lazy: transformers (this path only)

    logger.info("explorer.pool_path=%s has no data index for this run's data settings: rendering the prompts "
                "to check that it covers them", cfg.explorer.pool_path)
    prompts = load_prompts(cfg.data, AutoTokenizer.from_pretrained(cfg.model.path))
    held = set()
    for chunk in sorted((Path(cfg.explorer.pool_path) / pool_manifest.CHUNKS).glob("chunk-*.parquet")):
        held.update(pq.read_table(chunk, columns=["prompt_id"]).column("prompt_id").to_pylist())
    return [prompt.source for prompt in prompts if prompt.prompt_id not in held]
