"""Learner in one process: plan errors, a non-finite loss skips the update, weights stream out."""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.model import convert
from megatron_s2l.train.learner import build_learner
from tests.learner_fixtures import fixed_batch, learner_config


@pytest.fixture(scope="module")
def learner(mcore_world1, tmp_path_factory):
    from tests.utils import make_tiny_model

    hf_dir = make_tiny_model(tmp_path_factory.mktemp("learner"), num_hidden_layers=2, seed=5)
    return build_learner(learner_config(), str(hf_dir))


def _weights(learner) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in convert.iter_hf_tensors(learner.model, learner.args)}


def test_update_changes_weights_and_reports_metrics(learner):
    before = _weights(learner)
    plan = learner.plan(fixed_batch())
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    metrics = learner.train_step(plan)
    after = _weights(learner)
    assert metrics["train/skipped_updates"] == 0 and metrics["train/grad_norm"] > 0
    assert any(not torch.equal(before[k], after[k]) for k in before)
    for key in ("loss/pg/explorer", "loss/pg/learner", "loss/clip_frac", "loss/entropy", "loss/kl"):
        assert key in metrics


def test_non_finite_loss_skips_the_update(learner, caplog):
    batch = fixed_batch()
    batch.advantages[0] = float("nan")
    before = _weights(learner)
    plan = learner.plan(batch)
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)
    updates = learner.num_updates
    with caplog.at_level("WARNING"):
        metrics = learner.train_step(plan)
    assert metrics["train/skipped_updates"] == 1 and learner.num_updates == updates
    assert "non-finite gradient norm" in caplog.text
    after = _weights(learner)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_a_streak_of_non_finite_steps_stops_training(learner, monkeypatch):
    monkeypatch.setattr(learner.cfg.optimizer, "max_nonfinite_steps", 2)
    learner.nonfinite_steps = 0

    def step(nan: bool):
        batch = fixed_batch()
        if nan:
            batch.advantages[0] = float("nan")
        plan = learner.plan(batch)
        learner.compute_logprobs(plan)
        learner.compute_logprobs(plan, reference=True)
        return learner.train_step(plan)

    step(nan=True)
    step(nan=False)  # a good step ends the streak
    step(nan=True)
    with pytest.raises(FloatingPointError, match="2 training steps in a row .*max_nonfinite_steps=2"):
        step(nan=True)


def test_plan_rejects_indivisible_batches(learner):
    with pytest.raises(ValueError, match="parallel.micro_batch_size=2"):
        learner.plan(fixed_batch(num_sequences=7))
