"""Training checkpoints: model + optimizer through megatron-core dist_checkpointing (reshardable), the
trainer's own state as JSON, written to a temporary directory and renamed when complete.

Layout of `<checkpoint.dir>/step_000012/`:
  model/            dist checkpoint of the learner (the same format `s2l convert` reads and writes)
  optimizer/        dist checkpoint of the optimizer state (`fully_reshardable`)
  s2l_model.json    the HF config (so `s2l convert megatron-to-hf` exports any training checkpoint)
  hf_assets/        tokenizer and config files
  trainer_state.json  step, schedule, data/pool cursors, ledger, lr schedule, RNG, weight version
Only fully written checkpoints carry a `step_*` name, so a crash mid-write never hides the last good one.
"""

from __future__ import annotations

import base64
import ctypes
import json
import logging
import multiprocessing as mp
import pickle
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_s2l import platform
from megatron_s2l.config import CheckpointConfig
from megatron_s2l.model import checkpoint_io, convert

logger = logging.getLogger(__name__)

STATE_FILE = "trainer_state.json"
# Distributed-optimizer state as its DP-sharded buffers (reshardable across DP). megatron-core 0.16's
# model-space formats fail without apex/TE (fully_sharded_model_space is deprecated and does not build,
# fully_reshardable drops Adam's per-parameter step), so TP/PP changes restart the optimizer state.
_OPTIMIZER_FORMAT = {"distrib_optim_sharding_type": "dp_reshardable"}
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


# where dist_checkpointing's writer keeps its results queue: megatron-core's own module, or nvidia-resiliency-ext's
# (newer megatron-core versions write through it when it is installed, as in the NGC containers)
_WRITER_MODULES = ("megatron.core.dist_checkpointing.strategies.filesystem_async",
                   "nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async")


def _start_write_results_server() -> None:
    """dist_checkpointing's writers report back through a multiprocessing Manager, a process that megatron-core
    starts at the first save and keeps. A stop signal sent to the whole job (Slurm's scancel and time limit;
    torchrun, which passes SIGTERM and SIGINT to each worker's process group) reached it too and killed it, so
    the save that the stop asked for failed. Start it here instead, deaf to those signals and ended with this
    process (it would otherwise outlive a SIGKILL of the trainer)."""
    import megatron.core.dist_checkpointing.strategies.torch  # noqa: F401  (imports the writer it uses)

    unstarted = [sys.modules[name] for name in _WRITER_MODULES
                 if getattr(sys.modules.get(name), "_results_queue", "absent") is None]
    if not unstarted:
        return
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(_write_results_server_init)
    for module in unstarted:
        module._results_queue = manager.Queue()  # the queue's proxy keeps the manager (and its process)


def _write_results_server_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    try:  # Linux: SIGKILL when the trainer process ends, however it ends
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def rng_state() -> str:
    """Python, numpy and torch RNG states of this process, as a base64 string for JSON."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    return base64.b64encode(pickle.dumps(state)).decode()


def set_rng_state(encoded: str) -> None:
    state = pickle.loads(base64.b64decode(encoded))
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])


class Checkpointer:
    """Saves and restores the learner and the trainer state; every rank calls save/load."""

    def __init__(self, cfg: CheckpointConfig, directory: str | Path, hf_config: dict, hf_dir: str | Path):
        self.cfg = cfg
        self.directory = Path(directory)
        self.hf_config, self.hf_dir = hf_config, hf_dir

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def resume_path(self) -> Optional[Path]:
        """The checkpoint `checkpoint.resume` asks for: none, the latest (`auto`), or a directory."""
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            found = self.checkpoints()
            if not found:
                logger.info("checkpoint.resume=auto: no checkpoint in %s yet, starting fresh", self.directory)
            return found[-1] if found else None
        path = Path(self.cfg.resume)
        if not (path / STATE_FILE).is_file():
            raise FileNotFoundError(f"checkpoint.resume={path}: not a complete checkpoint ({STATE_FILE} missing); "
                                    f"use `auto` or one of {[str(p) for p in self.checkpoints()]}")
        return path

    def save(self, step: int, learner, trainer_state: dict) -> Path:
        """Write checkpoint `step` atomically (collective) and drop old ones beyond `keep_last`."""
        from megatron.core import dist_checkpointing

        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".tmp-step_{step:06d}"
        _start_write_results_server()
        if platform.is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash during an earlier save
            (tmp / checkpoint_io.MODEL_SUBDIR).mkdir(parents=True)
            (tmp / "optimizer").mkdir()
        _barrier()
        model_state = convert.unwrap(learner.model).sharded_state_dict(prefix="")
        checkpoint_io.save_megatron_checkpoint(learner.model, tmp, self.hf_config, hf_assets_from=self.hf_dir,
                                               extra_meta={"dtype": learner.cfg.model.dtype})
        has_optimizer_state = learner.num_updates > 0  # before the first update there are no moments
        if has_optimizer_state:
            dist_checkpointing.save(learner.optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_FORMAT),
                                    str(tmp / "optimizer"))
        if platform.is_rank0():
            state = {**trainer_state, "step": step, "lr_scheduler": learner.scheduler.state_dict(),
                     "num_updates": learner.num_updates, "rng": rng_state(), "layout": _layout(),
                     "has_optimizer_state": has_optimizer_state}
            (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=_jsonable))
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    def _load_optimizer(self, path: Path, learner, num_updates: int) -> None:
        from megatron.core import dist_checkpointing

        model_state = convert.unwrap(learner.model).sharded_state_dict(prefix="")
        _materialize_optimizer_state(learner.optimizer)
        optimizer_state = dist_checkpointing.load(
            learner.optimizer.sharded_state_dict(model_state, is_loading=True, metadata=_OPTIMIZER_FORMAT),
            str(path / "optimizer"))
        with torch.no_grad():  # the state is copied into leaf parameters that require grad
            learner.optimizer.load_state_dict(optimizer_state)
        _restore_adam_steps(learner.optimizer, num_updates)

    def load(self, path: Path, learner) -> dict:
        """Restore model, optimizer and lr schedule into `learner` (any TP/PP for the model; the optimizer
        state reshards across DP only); returns the trainer state. Collective."""
        state = json.loads((path / STATE_FILE).read_text())
        checkpoint_io.load_megatron_checkpoint(learner.model, path, self.hf_config)
        saved, now = state["layout"], _layout()
        if not state["has_optimizer_state"]:
            pass  # saved before the first update: a fresh optimizer is the same thing
        elif (saved["tp"], saved["pp"]) == (now["tp"], now["pp"]):
            self._load_optimizer(path, learner, state["num_updates"])
        else:
            logger.warning("checkpoint %s was written at tp=%d pp=%d, this run is tp=%d pp=%d: the model is "
                           "resharded, the optimizer state (Adam moments) starts fresh",
                           path, saved["tp"], saved["pp"], now["tp"], now["pp"])
        learner.scheduler.load_state_dict(state["lr_scheduler"])
        learner.num_updates = state["num_updates"]
        set_rng_state(state["rng"])
        logger.info("resumed from %s (step %d)", path, state["step"])
        return state


def _layout() -> dict[str, int]:
    from megatron.core import parallel_state

    return {"tp": parallel_state.get_tensor_model_parallel_world_size(),
            "pp": parallel_state.get_pipeline_model_parallel_world_size(),
            "dp": parallel_state.get_data_parallel_world_size()}


def _materialize_optimizer_state(optimizer) -> None:
    """A fresh optimizer has no Adam state yet; without apex/TE, megatron's distributed optimizer can
    only describe (and so load) a populated state. Fill it with placeholders that the load overwrites."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        if hasattr(inner, "_init_optimizer_states_with_dummy_values") and not inner.optimizer.state:
            inner._init_optimizer_states_with_dummy_values()


def _restore_adam_steps(optimizer, num_updates: int) -> None:
    """torch.optim.Adam keeps a per-parameter `step` (bias correction). megatron-core 0.16 without
    apex/TE does not round-trip it through the distributed optimizer's checkpoint (it comes back as
    the placeholder count plus the parameter index), so set it from the update count we saved."""
    for inner in getattr(optimizer, "chained_optimizers", [optimizer]):
        for param_state in inner.optimizer.state.values():
            if "step" in param_state:
                param_state["step"] = torch.tensor(float(num_updates))


def _jsonable(value):
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, (np.integer, np.floating)):
        return value.item()
    raise TypeError(f"trainer state value {value!r} is not JSON serialisable")
