"""GRPO loss against hand-computed numbers: every ratio mode, clip branch, dual clip, KL, reduction."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_s2l.algo.loss import LossInputs, finalize_metrics, kl_penalty, policy_loss, reduction_weights
from megatron_s2l.config import AlgorithmConfig

EXPLORER, LEARNER = 0, 1


def one_token(logprob: float, old: float, adv: float, source: int = LEARNER, **extra) -> LossInputs:
    """A batch of one sequence with one response token and weight 1 (so loss == token loss)."""
    t = lambda v: torch.tensor([[v]], dtype=torch.float32)  # noqa: E731
    logprob_t = t(logprob).requires_grad_()
    fields = {k: t(v) for k, v in extra.items()}
    return LossInputs(logprobs=logprob_t, old_logprobs=t(old), advantages=torch.tensor([adv]),
                      mask=torch.tensor([[True]]), weights=t(1.0), source=torch.tensor([source]), **fields)


def cfg(**kw) -> AlgorithmConfig:
    return AlgorithmConfig(kl_coef=0.0, **kw)


@pytest.mark.parametrize("delta,adv,expected,clipped", [
    (0.1, 2.0, -2.0 * math.exp(0.1), False),  # inside the trust region
    (0.5, 2.0, -2.0 * 1.2, True),  # ratio 1.65 > 1 + eps_high, A > 0: clipped to 1.2
    (-0.5, 2.0, -2.0 * math.exp(-0.5), False),  # ratio 0.61 < 0.8 but A > 0: the unclipped term is larger
    (-0.5, -1.0, 0.8, True),  # ratio 0.61 < 1 - eps_low, A < 0: clipped to 0.8
    (0.5, -1.0, math.exp(0.5), False),  # ratio 1.65, A < 0: unclipped (pessimistic) term wins
])
def test_clip_branches(delta, adv, expected, clipped):
    inputs = one_token(-1.0 + delta, -1.0, adv)
    loss, metrics = policy_loss(inputs, cfg(dual_clip=None))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert metrics["loss/clip_frac"].item() == float(clipped)
    loss.backward()
    expected_grad = 0.0 if clipped else -adv * math.exp(delta)  # d(-A r)/d logp = -A r
    assert inputs.logprobs.grad.item() == pytest.approx(expected_grad, rel=1e-6, abs=1e-12)


def test_clip_higher_uses_its_own_bound():
    loss, _ = policy_loss(one_token(-1.0 + 0.5, -1.0, 1.0), cfg(eps_high=0.28, dual_clip=None))
    assert loss.item() == pytest.approx(-1.28)


def test_dual_clip_caps_negative_advantage_loss():
    inputs = one_token(-1.0 + math.log(5.0), -1.0, -1.0)  # ratio 5, A = -1: PPO loss 5
    loss, metrics = policy_loss(inputs, cfg(dual_clip=3.0))
    assert loss.item() == pytest.approx(3.0)  # min(5, c * |A|)
    assert metrics["loss/dual_clip_frac"].item() == 1.0
    loss.backward()
    assert inputs.logprobs.grad.item() == 0.0
    loss_off, _ = policy_loss(one_token(-1.0 + math.log(5.0), -1.0, -1.0), cfg(dual_clip=None))
    assert loss_off.item() == pytest.approx(5.0)


def test_tis_weights_explorer_tokens_only():
    # pi_old / pi_explorer = e^1 = 2.718 -> truncated at 2.0
    explorer = one_token(-1.0, -1.0, 1.5, EXPLORER, behaviour_logprobs=-2.0)
    loss, _ = policy_loss(explorer, cfg(ratio="tis", tis_clamp=2.0))
    assert loss.item() == pytest.approx(-1.5 * 2.0)
    explorer_small = one_token(-1.0, -1.0, 1.5, EXPLORER, behaviour_logprobs=-0.5)  # weight e^-0.5
    loss, _ = policy_loss(explorer_small, cfg(ratio="tis"))
    assert loss.item() == pytest.approx(-1.5 * math.exp(-0.5), rel=1e-6)
    learner = one_token(-1.0, -1.0, 1.5, LEARNER, behaviour_logprobs=-2.0)
    loss, _ = policy_loss(learner, cfg(ratio="tis"))
    assert loss.item() == pytest.approx(-1.5)


def test_luffy_shapes_explorer_tokens_without_clipping():
    p, gamma, adv = 0.5, 0.1, 2.0
    explorer = one_token(math.log(p), math.log(0.05), adv, EXPLORER)  # ratio 10 would be clipped by PPO
    loss, metrics = policy_loss(explorer, cfg(ratio="luffy", luffy_gamma=gamma))
    assert loss.item() == pytest.approx(-adv * p / (p + gamma), rel=1e-6)
    assert metrics["loss/clip_frac"].item() == 0.0
    loss.backward()  # d/dlogp [-A p/(p+g)] = -A * g p / (p+g)^2
    assert explorer.logprobs.grad.item() == pytest.approx(-adv * gamma * p / (p + gamma) ** 2, rel=1e-5)
    learner = one_token(math.log(p), math.log(0.05), adv, LEARNER)
    loss, _ = policy_loss(learner, cfg(ratio="luffy"))
    assert loss.item() == pytest.approx(-adv * 1.2)  # ordinary clipped PPO


@pytest.mark.parametrize("kind,expected", [
    ("k1", -1.0 - (-1.5)),
    ("k3", math.exp(-0.5) - (-0.5) - 1),
    ("low_var_kl", math.exp(-0.5) - (-0.5) - 1),
])
def test_kl_estimators(kind, expected):
    assert kl_penalty(torch.tensor(-1.0), torch.tensor(-1.5), kind).item() == pytest.approx(expected, rel=1e-6)
    inputs = one_token(-1.0, -1.0, 0.0, ref_logprobs=-1.5)
    loss, metrics = policy_loss(inputs, AlgorithmConfig(kl_coef=0.1, kl_type=kind))
    assert loss.item() == pytest.approx(0.1 * expected, rel=1e-6)
    assert metrics["loss/kl"].item() == pytest.approx(expected, rel=1e-6)


def test_k3_is_clamped():
    assert kl_penalty(torch.tensor(-30.0), torch.tensor(0.0), "k3").item() == 10.0


def test_entropy_bonus():
    inputs = one_token(-1.0, -1.0, 0.0, entropy=2.5)
    loss, _ = policy_loss(inputs, cfg(entropy_coef=0.01))
    assert loss.item() == pytest.approx(-0.025)


def test_reductions_by_hand():
    mask = torch.tensor([[True, False, False], [True, True, True]])  # lengths 1 and 3
    token_loss = torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 6.0]])
    expected = {
        "token_mean": (1 + 2 + 4 + 6) / 4,
        "seq_mean_token_mean": (1 / 1 + (2 + 4 + 6) / 3) / 2,
        "seq_mean_token_sum_norm": (1 + 2 + 4 + 6) / (2 * 8),  # norm_length 8
    }
    for reduction, value in expected.items():
        weights = reduction_weights(mask, reduction, num_sequences=2, num_tokens=4, norm_length=8)
        assert (weights * token_loss).sum().item() == pytest.approx(value), reduction
    with pytest.raises(ValueError, match="reduction"):
        reduction_weights(mask, "sum", 2, 4, 8)


def test_token_mean_is_global_not_per_micro_batch():
    """Two micro-batches with global weights sum to the whole-batch token mean."""
    mask = torch.tensor([[True, False, False], [True, True, True]])
    token_loss = torch.tensor([[1.0, 0.0, 0.0], [2.0, 4.0, 6.0]])
    whole = (reduction_weights(mask, "token_mean", 2, 4, 8) * token_loss).sum()
    parts = sum((reduction_weights(mask[i:i + 1], "token_mean", 2, 4, 8) * token_loss[i:i + 1]).sum()
                for i in range(2))
    assert parts.item() == pytest.approx(whole.item())
    per_micro_mean = (1.0 + (2 + 4 + 6) / 3) / 2  # what per-micro-batch normalisation would give
    assert whole.item() != pytest.approx(per_micro_mean)


def test_metrics_split_by_source():
    logprobs = torch.tensor([[-1.0, -1.0], [-1.0, -1.0]])
    inputs = LossInputs(logprobs=logprobs, old_logprobs=logprobs - torch.tensor([[0.5, 0.0], [0.0, 0.0]]),
                        advantages=torch.tensor([1.0, 1.0]), mask=torch.ones(2, 2, dtype=torch.bool),
                        weights=torch.full((2, 2), 0.25), source=torch.tensor([EXPLORER, LEARNER]),
                        behaviour_logprobs=torch.tensor([[-3.0, -3.0], [-1.0, -1.0]]))
    _, sums = policy_loss(inputs, cfg(dual_clip=None))
    metrics = finalize_metrics({k: v.item() for k, v in sums.items()})
    assert metrics["loss/clip_frac/explorer"] == 0.5 and metrics["loss/clip_frac/learner"] == 0.0
    assert metrics["loss/clip_frac"] == 0.25
    assert metrics["loss/ratio_max"] == pytest.approx(math.exp(0.5))
    assert metrics["tokens/explorer"] == 2 and metrics["tokens"] == 4
    assert metrics["loss/behaviour_gap/learner"] == 0.0  # trainer and engine agree
    assert metrics["loss/behaviour_gap/explorer"] == pytest.approx(((-1.5 + 3) + (-1 + 3)) / 2)
