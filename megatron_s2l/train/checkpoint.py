"""Training checkpoints: model + optimizer through megatron-core dist_checkpointing (reshardable), the
trainer's own state as JSON, and a manifest of every file's size and checksum, written last; all in a
temporary directory that is renamed when complete.

Layout of `<checkpoint.dir>/step_000012/`:
  model/            dist checkpoint of the learner (the same format `s2l convert` reads and writes)
  optimizer/        dist checkpoint of the optimizer state (`fully_reshardable`)
  s2l_model.json    the HF config (so `s2l convert megatron-to-hf` exports any training checkpoint)
  hf_assets/        tokenizer and config files
  trainer_state.json  step, schedule, data/pool cursors, ledger, lr schedule, RNG, weight version
  manifest.json     size and CRC-32 of every other file (train/manifest.py)
Only fully written checkpoints carry a `step_*` name, so a crash mid-write never hides the last good one; a
failed save is removed. A resume checks the manifest first: `resume=auto` takes the newest checkpoint that
verifies, naming each one it skips and why; an explicit one that does not verify is a `CheckpointError`.
Checkpoints from before manifests count as complete (unverified) when their state and metadata files are
there.
"""

from __future__ import annotations

import base64
import ctypes
import errno
import json
import logging
import multiprocessing as mp
import os
import pickle
import random
import re
import shutil
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint import CheckpointException

from megatron_s2l import platform
from megatron_s2l.config import CheckpointConfig
from megatron_s2l.model import checkpoint_io, convert
from megatron_s2l.train.manifest import MANIFEST_FILE, verify, write_manifest

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


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from or written: the message names it, the file or directory, what
    is wrong and the fix. A ValueError, so that `s2l` prints it as one line and exits with 2."""


_NOT_CHOSEN = object()


class Checkpointer:
    """Saves and restores the learner and the trainer state; every rank calls save/load/resume_path."""

    # config
    cfg: CheckpointConfig
    directory: Path
    hf_config: dict
    hf_dir: str | Path
    # state
    _resume: object  # the checkpoint to resume from (Optional[Path]) once chosen

    def __init__(self, cfg: CheckpointConfig, directory: str | Path, hf_config: dict, hf_dir: str | Path):
        self.cfg = cfg
        self.directory = Path(directory)
        self.hf_config, self.hf_dir = hf_config, hf_dir
        self._resume = _NOT_CHOSEN

    def checkpoints(self) -> list[Path]:
        """Fully written checkpoints (renamed to `step_*`; their files unchecked), oldest first."""
        if not self.directory.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.directory.iterdir() if (m := _STEP_DIR.match(p.name))]
        return [p for _, p in sorted(found)]

    def resume_path(self) -> Optional[Path]:
        """The checkpoint `checkpoint.resume` asks for: none, the newest that verifies (`auto`), or a
        directory, which must verify. Collective; chosen once (verifying reads every byte)."""
        if self._resume is _NOT_CHOSEN:
            self._resume = self._choose_resume()
        return self._resume

    def _choose_resume(self) -> Optional[Path]:
        if self.cfg.resume == "none":
            return None
        if self.cfg.resume == "auto":
            return self._newest_verified()
        path = Path(self.cfg.resume)
        if not platform.from_rank0(path.is_dir()):
            raise FileNotFoundError(f"checkpoint.resume={path}: not a checkpoint directory (it does not "
                                    f"exist); use `auto` or one of {[str(p) for p in self.checkpoints()]}")
        problem = self.problem(path)
        if problem:
            raise CheckpointError(f"checkpoint.resume={path}: damaged checkpoint: {problem}; resume from an "
                                  "earlier one (checkpoint.resume=auto takes the newest that verifies)")
        return path

    def _newest_verified(self) -> Optional[Path]:
        found = platform.from_rank0(self.checkpoints())
        if not found:
            logger.info("checkpoint.resume=auto: no checkpoint in %s yet, starting fresh", self.directory)
            return None
        skipped = []
        for path in reversed(found):
            problem = self.problem(path)
            if not problem:
                if skipped:
                    logger.warning("checkpoint.resume=auto: resuming from %s, the newest checkpoint that "
                                   "verifies", path)
                return path
            logger.warning("checkpoint.resume=auto: skipping %s: %s", path, problem)
            skipped.append(f"{path.name}: {problem}")
        raise CheckpointError(f"checkpoint.resume=auto: no checkpoint in {self.directory} verifies "
                              f"({'; '.join(skipped)}); move them away to start the run over")

    def problem(self, path: Path) -> str:
        """Collective: '' when `path` can be resumed from, else what is wrong with it. One from before
        manifests only needs its state and metadata files (a warning says its bytes are unchecked)."""
        if platform.from_rank0((path / MANIFEST_FILE).is_file()):
            return verify(path)
        problem = platform.from_rank0(_missing_parts(path) if platform.is_rank0() else None)
        if not problem:
            logger.warning("%s has no %s (saved by an older megatron-s2l): its files are all there, but "
                           "their bytes are not checked", path, MANIFEST_FILE)
        return problem

    def save(self, step: int, learner, trainer_state: dict) -> Path:
        """Write checkpoint `step` atomically (collective) and drop old ones beyond `keep_last`. A failed save
        is removed; a full disk or an unwritable directory is a CheckpointError that says so."""
        final = self.directory / f"step_{step:06d}"
        tmp = self.directory / f".tmp-step_{step:06d}"
        _start_write_results_server()
        error = None
        try:
            self._write(tmp, step, learner, trainer_state)
        except (Exception, CheckpointException) as exc:  # noqa: BLE001 - CheckpointException: a BaseException
            error = exc
        if platform.any_rank(error is not None):  # every rank fails together, none waits in a collective
            self._fail(step, tmp, learner, error)
        if platform.is_rank0():
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in self.checkpoints()[: -self.cfg.keep_last]:
                shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        _barrier()
        return final

    def _write(self, tmp: Path, step: int, learner, trainer_state: dict) -> None:
        """Every file of checkpoint `step` into `tmp`, the manifest last (collective)."""
        from megatron.core import dist_checkpointing

        _on_rank0(lambda: _prepare(tmp, self.hf_dir))
        model_state = convert.unwrap(learner.model).sharded_state_dict(prefix="")
        checkpoint_io.save_megatron_checkpoint(learner.model, tmp, self.hf_config,
                                               extra_meta={"dtype": learner.cfg.model.dtype})
        has_optimizer_state = learner.num_updates > 0  # before the first update there are no moments
        if has_optimizer_state:
            optimizer_state = learner.optimizer.sharded_state_dict(model_state, metadata=_OPTIMIZER_FORMAT)
            dist_checkpointing.save(optimizer_state, str(tmp / "optimizer"))
        state = {**trainer_state, "step": step, "lr_scheduler": learner.scheduler.state_dict(),
                 "num_updates": learner.num_updates, "rng": rng_state(), "layout": _layout(),
                 "has_optimizer_state": has_optimizer_state}
        _on_rank0(lambda: (tmp / STATE_FILE).write_text(json.dumps(state, indent=1, default=_jsonable)))
        write_manifest(tmp)  # once every rank's files are on disk: the save's commit mark

    def _fail(self, step: int, tmp: Path, learner, error: Optional[BaseException]) -> NoReturn:
        """Collective, after a failed save: remove it, then raise a CheckpointError for a full disk or an
        unwritable directory (rank 0's diagnosis, on every rank), else the error itself."""
        if platform.is_rank0():
            shutil.rmtree(tmp, ignore_errors=True)
        message = self._write_problem(step, learner, error) if platform.is_rank0() else ""
        message = platform.from_rank0(message)
        if message:
            raise CheckpointError(message) from error
        if error is not None:
            raise error
        raise RuntimeError(f"saving checkpoint step {step} failed on another rank; the reason is in its "
                           "output")

    def _write_problem(self, step: int, learner, error: Optional[BaseException]) -> str:
        """What a failed save ran into, for the user: no space, or no permission ('' for anything else). A
        full disk rarely says so (torch's writer reports `unexpected pos`), so free space is checked too."""
        code, filename, said = _what_failed(error)
        needed, free = _approx_bytes(learner), shutil.disk_usage(_existing_parent(self.directory)).free
        latest = self.checkpoints()
        kept = f"the last checkpoint, {latest[-1]}, is untouched" if latest else "no checkpoint came before"
        if code in (errno.ENOSPC, errno.EDQUOT) or free < needed:
            return (f"checkpoint step {step} does not fit in {self.directory}: no space left on the device "
                    f"({_size(free)} free, a checkpoint takes about {_size(needed)}; the writer said: {said}). "
                    f"The partial save was removed and {kept}. Free space there, lower "
                    "checkpoint.keep_last, or set checkpoint.dir to a disk with room")
        if code in (errno.EACCES, errno.EPERM, errno.EROFS):
            return (f"cannot write checkpoint step {step}: {filename or self.directory}: "
                    f"{os.strerror(code)}. Make {self.directory} writable or set checkpoint.dir to a "
                    f"writable directory (a checkpoint takes about {_size(needed)}); {kept}")
        return ""

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


def _on_rank0(write: Callable[[], object]) -> None:
    """Collective: `write()` on rank 0 while the others wait; if it raised, every rank raises (instead of the
    others waiting for rank 0 in the next collective)."""
    error = None
    if platform.is_rank0():
        try:
            write()
        except Exception as exc:  # noqa: BLE001 - the other ranks must hear of it
            error = exc
    if platform.any_rank(error is not None):
        raise error or RuntimeError("rank 0 failed to write the checkpoint; the reason is in its output")


def _prepare(tmp: Path, hf_dir: str | Path) -> None:
    """A fresh temporary directory with the checkpoint's folders and the tokenizer files (copied first: only
    megatron-core's shard writes come after, and they report failures on every rank)."""
    shutil.rmtree(tmp, ignore_errors=True)  # a leftover from a crash during an earlier save
    (tmp / checkpoint_io.MODEL_SUBDIR).mkdir(parents=True)
    (tmp / "optimizer").mkdir()
    checkpoint_io.copy_hf_assets(hf_dir, tmp / checkpoint_io.HF_ASSETS_SUBDIR)


def _missing_parts(path: Path) -> str:
    """What a checkpoint without a manifest lacks ('' when nothing): a readable state, the metadata files."""
    try:
        state = json.loads((path / STATE_FILE).read_text())
    except FileNotFoundError:
        return f"{STATE_FILE} is missing"
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} is unreadable ({type(err).__name__}: {err})"
    needed = [checkpoint_io.MODEL_META_FILE, f"{checkpoint_io.MODEL_SUBDIR}/.metadata"]
    needed += ["optimizer/.metadata"] if state.get("has_optimizer_state") else []
    return next((f"{name} is missing" for name in needed if not (path / name).is_file()), "")


def _what_failed(error: Optional[BaseException]) -> tuple[Optional[int], Optional[str], str]:
    """The errno behind a failed save (None if none), the file it names, and the innermost message. Looks
    through causes, and through each failed rank's exception that megatron-core's writer wrapped in a
    CheckpointException, where a shard writer's OSError is only text ("Worker failure: [Errno 28] ...")."""
    causes, todo = [], [error]
    while todo:
        exc = todo.pop(0)
        if exc is None or any(exc is seen for seen in causes):
            continue
        causes.append(exc)
        todo += [exc.__cause__, exc.__context__]
        if isinstance(exc, CheckpointException):
            todo += [failure[0] for failure in exc.failures.values()]
    said = next(iter(str(causes[-1]).strip().splitlines()), "") if causes else ""
    for exc in causes:
        if isinstance(exc, OSError) and exc.errno:
            return exc.errno, exc.filename, said[:200]
        if found := re.search(r"\[Errno (\d+)\]", str(exc)):
            return int(found.group(1)), None, said[:200]
    return None, None, said[:200]


def _approx_bytes(learner) -> int:
    """A checkpoint's size: the weights in their dtype, plus Adam's fp32 master copy and two moments."""
    weight_bytes = torch.empty((), dtype=getattr(torch, learner.cfg.model.dtype)).element_size()
    return learner.args.num_parameters * (weight_bytes + 12)


def _existing_parent(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _size(num_bytes: int) -> str:
    return f"{num_bytes / 1e9:.1f} GB" if num_bytes >= 1e9 else f"{num_bytes / 1e6:.1f} MB"


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
