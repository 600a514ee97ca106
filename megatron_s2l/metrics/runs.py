"""A run's folder: reading a finished (or running) run back (the rows of its metrics.jsonl, one per step), and
keeping one run per folder (`check_run_dir`: another run's folder is refused unless this run resumes it)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of <run_dir>/metrics.jsonl by step; a resumed run's repeated steps keep the last row."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory (logging.run_dir)?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {row["step"]: row for row in rows}
    return [latest[s] for s in sorted(latest)]


# ---------------------------------------------------------------------------------------------
# one folder, one run

RECORDS = ("config.yaml", "metrics.jsonl")  # what makes a folder a run's (with its checkpoints)
# what `logging.overwrite=true` deletes besides those and the checkpoints
OTHER_RECORDS = ("wandb_run_id", "wandb", "tensorboard", "profile", "weight_sync")
# config fields a resumed run may change: length, saving, logging, layout, servers, evaluation
RESUMABLE = ("steps", "checkpoint.", "logging.", "parallel.", "eval.", "model.megatron_checkpoint",
             "reward.num_workers", "reward.timeout_s", "rollout.engine", "rollout.learner_url",
             "rollout.learner_worker_urls", "rollout.api_key", "rollout.request_timeout_s",
             "rollout.weight_sync", "rollout.verify_weight_sync", "explorer.url",
             "explorer.accept_pool_mismatch")


def earlier_run(run_dir: str | Path, checkpoint_dir: str | Path) -> list[Path]:
    """The records and checkpoints an earlier run left in run_dir (and its checkpoint dir); [] if none."""
    run_dir, checkpoint_dir = Path(run_dir), Path(checkpoint_dir)
    found = [run_dir / name for name in RECORDS if (run_dir / name).is_file()]
    if checkpoint_dir.is_dir():
        found += sorted(p for p in checkpoint_dir.iterdir()
                        if p.is_dir() and p.name.startswith(("step_", ".tmp-step_")))
    return found


def check_run_dir(run_dir: str | Path, checkpoint_dir: str | Path, config: dict, resuming: bool,
                  overwrite: bool) -> list[Path]:
    """Refuse a run_dir that holds another run (its metrics, config and checkpoints would mix with this one's)
    unless this run resumes it with the same config, or `overwrite`: then returns what to delete. A run that
    resumes its own folder keeps it even with `overwrite`, so a resubmitted job (the launchers always pass
    checkpoint.resume=auto) never deletes its own checkpoints."""
    held = earlier_run(run_dir, checkpoint_dir)
    if not held:
        return []
    config_file = Path(run_dir) / "config.yaml"
    old = yaml.safe_load(config_file.read_text()) or {} if config_file.is_file() else {}
    changed = config_changes(old, config)
    if resuming and not changed:
        return []
    if overwrite:
        return held
    if not resuming:
        names = ", ".join(p.name for p in held[:4]) + (", ..." if len(held) > 4 else "")
        raise ValueError(f"logging.run_dir={run_dir} holds another run ({names}) that this one would mix "
                         "with: use a new logging.run_dir, resume that run (--resume auto), or "
                         "logging.overwrite=true to delete its records first")
    shown = "; ".join(changed[:6]) + (f"; and {len(changed) - 6} more" if len(changed) > 6 else "")
    raise ValueError(f"logging.run_dir={run_dir}: resuming a run with another config ({shown}); resume "
                     "with the config in its config.yaml (only steps and the checkpoint, logging, parallel "
                     "and eval settings may change), or start a new logging.run_dir")


def config_changes(old: dict, new: dict) -> list[str]:
    """`field: old -> new` for every field both configs have that differs, except those a resume may change
    (fields only one of them has come from another version of the package and are left out)."""
    before, after = _flatten(old), _flatten(new)
    return [f"{key}: {before[key]!r} -> {after[key]!r}" for key in after
            if key in before and before[key] != after[key] and not key.startswith(RESUMABLE)]


def clear_run(run_dir: str | Path, held: list[Path]) -> None:
    """Delete an earlier run's records (`held`, from earlier_run) and its other logs in run_dir."""
    for path in [*held, *(Path(run_dir) / name for name in OTHER_RECORDS)]:
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def _flatten(tree: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out |= _flatten(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out
