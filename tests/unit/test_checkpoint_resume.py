"""Learner checkpoints: an interrupted save leaves the last good one; resume continues bit-exactly; a stop signal
to every process of the job leaves the checkpoint writer able to save."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import types

import psutil
import pytest
import torch

from megatron_s2l.config import CheckpointConfig
from megatron_s2l.model import convert, specs
from megatron_s2l.train.checkpoint import Checkpointer, _start_write_results_server
from megatron_s2l.train.learner import build_learner
from tests.learner_fixtures import fixed_batch, learner_config
from tests.utils import REPO, make_tiny_model, spawned_children, subprocess_env, wait_for


def _update(learner, seed: int) -> dict:
    plan = learner.plan(fixed_batch(seed=seed))
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    return learner.train_step(plan)


def _weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in convert.iter_hf_tensors(learner.model, learner.args)}


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("ckpt_model"), num_hidden_layers=2, seed=7)


def test_resume_learner_continues_bit_exactly(mcore_world1, hf_dir, tmp_path):
    cfg = learner_config(**{"optimizer.lr_schedule": "warmup_cosine", "optimizer.warmup_steps": 1})
    checkpointer = Checkpointer(CheckpointConfig(resume="auto"), tmp_path, specs.load_hf_config(hf_dir), hf_dir)
    learner = build_learner(cfg, str(hf_dir))
    _update(learner, seed=1)
    checkpointer.save(1, learner, {"cursor": 17})
    uninterrupted = [_update(learner, seed=s) for s in (2, 3)]

    resumed = build_learner(cfg, str(hf_dir))
    state = checkpointer.load(checkpointer.resume_path(), resumed)
    assert state["cursor"] == 17 and state["step"] == 1
    after_resume = [_update(resumed, seed=s) for s in (2, 3)]
    for a, b in zip(uninterrupted, after_resume):
        assert a == b  # every metric, bitwise (lr schedule, Adam moments and step restored)
    expected, actual = _weights(learner), _weights(resumed)
    assert all(torch.equal(expected[k], actual[k]) for k in expected)


def test_resume_survives_a_crash_during_checkpoint_write(mcore_world1, hf_dir, tmp_path, monkeypatch):
    cfg = learner_config()
    checkpointer = Checkpointer(CheckpointConfig(resume="auto", keep_last=2), tmp_path,
                                specs.load_hf_config(hf_dir), hf_dir)
    learner = build_learner(cfg, str(hf_dir))
    checkpointer.save(1, learner, {})
    good = _weights(learner)
    _update(learner, seed=1)

    from megatron.core import dist_checkpointing

    real_save = dist_checkpointing.save

    def crash_on_optimizer(state, path, *args, **kwargs):
        if path.endswith("optimizer"):
            raise OSError("disk full (simulated)")
        return real_save(state, path, *args, **kwargs)

    monkeypatch.setattr(dist_checkpointing, "save", crash_on_optimizer)
    with pytest.raises(OSError, match="disk full"):
        checkpointer.save(2, learner, {})
    monkeypatch.undo()

    assert [p.name for p in checkpointer.checkpoints()] == ["step_000001"]
    restored = build_learner(cfg, str(hf_dir))
    checkpointer.load(checkpointer.resume_path(), restored)
    assert all(torch.equal(good[k], v) for k, v in _weights(restored).items())
    checkpointer.save(2, learner, {})  # the next save cleans up after the crash
    checkpointer.save(3, learner, {})
    assert [p.name for p in checkpointer.checkpoints()] == ["step_000002", "step_000003"]  # keep_last=2
    assert not list(tmp_path.glob(".tmp-*"))


def test_resume_from_a_bad_path_names_the_fix(tmp_path):
    checkpointer = Checkpointer(CheckpointConfig(resume=str(tmp_path / "nope")), tmp_path, {}, tmp_path)
    with pytest.raises(FileNotFoundError, match="not a checkpoint directory"):
        checkpointer.resume_path()
    assert Checkpointer(CheckpointConfig(resume="auto"), tmp_path, {}, tmp_path).resume_path() is None


def test_the_checkpoint_writers_results_server_survives_stop_signals(monkeypatch):
    """Slurm and torchrun send a stop signal to every process of a worker, helpers included; the save that the
    stop asks for needs megatron-core's results server alive."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    monkeypatch.setattr(filesystem_async, "_results_queue", None)  # this process may have one from other tests
    nvrx = types.SimpleNamespace(_results_queue=None)  # newer megatron-core writes through nvidia-resiliency-ext's
    monkeypatch.setitem(sys.modules, "nvidia_resiliency_ext.checkpointing.async_ckpt.filesystem_async", nvrx)
    before = spawned_children()
    _start_write_results_server()
    (server,) = spawned_children() - before
    for stop in (signal.SIGTERM, signal.SIGINT):
        server.send_signal(stop)
    time.sleep(1)
    for queue in (filesystem_async._results_queue, nvrx._results_queue):
        queue.put("written")  # raises BrokenPipeError or EOFError once the server is gone
        assert queue.get(timeout=10) == "written"
    _start_write_results_server()  # one server for the whole run
    assert spawned_children() - before == {server}


def test_the_checkpoint_writers_results_server_ends_with_the_trainer(tmp_path):
    """Deaf to SIGTERM, it must still not outlive a trainer that was killed."""
    trainer = subprocess.Popen(
        [sys.executable, "-c", "import time; from megatron_s2l.train import checkpoint as c; "
         "c._start_write_results_server(); print('started', flush=True); time.sleep(300)"],
        cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, text=True)
    try:
        assert trainer.stdout.readline() == "started\n"
        (server,) = spawned_children(trainer.pid)
        trainer.kill()
        trainer.wait(timeout=30)
        assert wait_for(lambda: not server.is_running() or server.status() == psutil.STATUS_ZOMBIE, timeout_s=30)
    finally:
        trainer.kill()
