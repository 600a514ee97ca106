"""Weight sync from the Megatron learner into LocalEngine: memory and disk paths, versions, digests."""

from __future__ import annotations

import contextlib
import os
import signal
import sys

import pytest
import torch

from megatron_s2l.rollout.local import build_local_engine
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.types import SamplingParams
from megatron_s2l.train.learner import build_learner
from megatron_s2l.train.weight_sync import WeightSync
from tests.learner_fixtures import fixed_batch, learner_config
from tests.utils import make_tiny_model, run_process


@pytest.fixture(scope="module")
def trained(mcore_world1, tmp_path_factory):
    """A learner one update away from its HF checkpoint, and that checkpoint's directory."""
    hf_dir = make_tiny_model(tmp_path_factory.mktemp("sync_model"), num_hidden_layers=2, seed=9)
    learner = build_learner(learner_config(**{"optimizer.lr": 1e-2}), str(hf_dir))
    plan = learner.plan(fixed_batch())
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    learner.train_step(plan)
    return learner, hf_dir


@pytest.mark.parametrize("mode", ["memory", "disk"])
def test_sync_moves_the_learner_weights_into_the_engine(trained, tmp_path, mode):
    learner, hf_dir = trained
    engine = build_local_engine(hf_dir)
    runtime = RolloutRuntime()
    prompt, greedy = [[9707, 11, 1879, 0]], SamplingParams(max_new_tokens=6, temperature=0.0)
    before = runtime.run(engine.generate(prompt, 1, greedy))[0][0].logprobs
    sync = WeightSync(engine, mode, runtime, torch.float32, tmp_path / "staging", hf_dir, verify=True)
    metrics = sync.sync(learner, version="7")  # verify=True: the engine's bytes equal the learner's
    after = runtime.run(engine.generate(prompt, 1, greedy))[0][0]
    assert runtime.run(engine.weight_version()) == "7" and after.weight_version == "7"
    assert after.logprobs != before  # the engine now serves the updated weights
    assert metrics["sync/gigabytes"] > 0.01 and metrics["sync/tensors"] > 10
    if mode == "disk":
        assert [p.name for p in (tmp_path / "staging").iterdir()] == ["version-7"]


def test_a_digest_mismatch_is_an_error(trained, tmp_path):
    learner, hf_dir = trained
    engine = build_local_engine(hf_dir)

    async def wrong_digest(names):
        return "0" * 32

    engine.weights_digest = wrong_digest
    sync = WeightSync(engine, "memory", RolloutRuntime(), torch.float32, tmp_path, hf_dir, verify=True)
    with pytest.raises(RuntimeError, match="differ from the learner's"):
        sync.sync(learner, version="8")


_TRAINER = """
import pathlib, subprocess, sys, time, torch
from megatron_s2l.rollout.weight_broadcast import serialize_tensors
folder = pathlib.Path(sys.argv[1])
named = [("w", torch.arange(4.0))]
(folder / "payload").write_text(serialize_tensors(named))
server = subprocess.Popen([sys.executable, "-c", sys.argv[2], str(folder)], stdin=subprocess.DEVNULL,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
(folder / "server.pid").write_text(str(server.pid))
deadline = time.monotonic() + 60
while not (folder / "mapped").exists() and time.monotonic() < deadline:
    time.sleep(0.1)
print("trainer done")
"""
_SERVER = """
import base64, pathlib, pickle, sys, time, torch.multiprocessing
folder = pathlib.Path(sys.argv[1])
named = pickle.loads(base64.b64decode((folder / "payload").read_text()))
(folder / "mapped").write_text(str(named[0][1].tolist()))
time.sleep(60)
"""


def test_a_trainer_that_shared_cpu_weights_leaves_its_output_pipes_closed(tmp_path):
    """weight_sync=tensor on CPU: torch's shared-memory manager lives on while the server maps the weights. It
    must not hold the trainer's stderr, or `s2l train 2>&1 | tee` and captured runs wait forever after the end."""
    try:
        result = run_process([sys.executable, "-c", _TRAINER, str(tmp_path), _SERVER], "trainer", timeout=45)
        assert "trainer done" in result.stdout
        assert (tmp_path / "mapped").read_text() == "[0.0, 1.0, 2.0, 3.0]"  # the server really holds the weights
    finally:
        if (tmp_path / "server.pid").exists():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(int((tmp_path / "server.pid").read_text()), signal.SIGKILL)
