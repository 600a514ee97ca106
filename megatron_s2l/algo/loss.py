"""The GRPO/PPO token loss with S2L-PO's ratio options, KL to the reference, entropy, reductions.

Legend: B sequences, T tokens per sequence (response positions; padding is masked out).

The loss is the ordinary GRPO loss (the paper changes only how rollouts are made). What is ours:
  ratio modes for explorer tokens (DESIGN.md §4):
    learner_old  r = pi_theta / pi_old, pi_old recomputed by the learner for every token (default).
    tis          as learner_old, times a detached token weight min(pi_old / pi_explorer, clamp) on
                 explorer tokens (truncated importance sampling to the behaviour policy).
  stale learner tokens (asynchronous rollouts, age >= 1) get the same truncated weight against the older
  weights that sampled them (algorithm.stale_tis).
    luffy        explorer tokens use the shaped, unclipped objective -A * p / (p + gamma), p = pi_theta.
  reductions are per-token weights computed over the *global* batch (``reduction_weights``), so a batch
  split into micro-batches or data-parallel ranks gives exactly the same gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_s2l.algo.advantages import EXPLORER, LEARNER
from megatron_s2l.config import AlgorithmConfig

_LOG_RATIO_CLAMP = 20.0  # exp(20) ~ 5e8: keeps ratios finite when a token's log-prob collapses


@dataclass
class LossInputs:
    """Everything the loss needs for one micro-batch, all [B, T] unless noted."""

    logprobs: torch.Tensor  # current policy, differentiable
    old_logprobs: torch.Tensor  # learner before this step's updates
    advantages: torch.Tensor  # [B]
    mask: torch.Tensor  # bool, response tokens
    weights: torch.Tensor  # reduction weights (see reduction_weights)
    source: torch.Tensor  # [B] EXPLORER | LEARNER
    ref_logprobs: Optional[torch.Tensor] = None  # initial model, for the KL term
    behaviour_logprobs: Optional[torch.Tensor] = None  # the engine that sampled (explorer or replica)
    entropy: Optional[torch.Tensor] = None
    age: Optional[torch.Tensor] = None  # [B] weight versions between sampler and learner (asynchronous rollouts)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token KL(pi_theta || pi_ref) estimate. k3/low_var_kl: exp(d) - d - 1 with d = ref - logp,
    clamped to [-10, 10] (large d would otherwise dominate the loss through exp)."""
    if kind == "k1":
        return logprobs - ref_logprobs
    if kind in ("k3", "low_var_kl"):
        diff = (ref_logprobs - logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return (diff.exp() - diff - 1).clamp(-10.0, 10.0)
    raise ValueError(f"algorithm.kl_type={kind!r}: use k1, k3 or low_var_kl")


def reduction_weights(mask: torch.Tensor, reduction: str, num_sequences: int, num_tokens: int,
                      norm_length: int) -> torch.Tensor:
    """Token weights w [B, T] such that loss = sum(w * token_loss) implements `reduction` over a batch
    of `num_sequences` sequences and `num_tokens` valid tokens in total (global counts)."""
    mask = mask.float()
    if reduction == "token_mean":
        return mask / max(num_tokens, 1)
    if reduction == "seq_mean_token_mean":
        return mask / mask.sum(-1, keepdim=True).clamp(min=1) / max(num_sequences, 1)
    if reduction == "seq_mean_token_sum_norm":  # Dr.GRPO: a constant length instead of each length
        return mask / (max(num_sequences, 1) * norm_length)
    raise ValueError(f"algorithm.reduction={reduction!r} is not supported")


# Ratio modes: how explorer tokens enter the clipped token loss `pg` [B, T]. Each returns the new pg and
# whether explorer tokens are now unclipped (then they are left out of the clip metrics).

def learner_old_ratio(pg: torch.Tensor, inputs: LossInputs, cfg: AlgorithmConfig, adv: torch.Tensor,
                      is_explorer: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Explorer tokens train like the learner's own: the clipped pi_theta / pi_old."""
    return pg, False


def tis_weight(inputs: LossInputs, cfg: AlgorithmConfig) -> torch.Tensor:
    """Detached min(pi_old / pi_behaviour, tis_clamp) per token [B, T]: truncated importance sampling."""
    if inputs.behaviour_logprobs is None:
        raise ValueError("truncated importance sampling needs behaviour log-probs from the rollout engines")
    weight = (inputs.old_logprobs - inputs.behaviour_logprobs).clamp(max=_LOG_RATIO_CLAMP).exp()
    return weight.clamp(max=cfg.tis_clamp).detach()


def tis_ratio(pg: torch.Tensor, inputs: LossInputs, cfg: AlgorithmConfig, adv: torch.Tensor,
              is_explorer: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Explorer tokens' loss times a detached min(pi_old / pi_behaviour, tis_clamp)."""
    return torch.where(is_explorer, pg * tis_weight(inputs, cfg), pg), False


def luffy_ratio(pg: torch.Tensor, inputs: LossInputs, cfg: AlgorithmConfig, adv: torch.Tensor,
                is_explorer: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Explorer tokens use LUFFY's shaped, unclipped -A * p / (p + luffy_gamma), p = pi_theta."""
    prob = inputs.logprobs.exp()
    return torch.where(is_explorer, -adv * prob / (prob + cfg.luffy_gamma), pg), True


RATIO_MODES = {"learner_old": learner_old_ratio, "tis": tis_ratio, "luffy": luffy_ratio}


def policy_loss(inputs: LossInputs, cfg: AlgorithmConfig) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of per-token losses (the caller's weights fix the reduction) and metric sums."""
    mask = inputs.mask
    adv = inputs.advantages.unsqueeze(-1).expand_as(inputs.logprobs)  # [B, T]
    is_explorer = (inputs.source == EXPLORER).unsqueeze(-1).expand_as(mask)  # [B, T]
    log_ratio = (inputs.logprobs - inputs.old_logprobs).clamp(-_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = log_ratio.exp()  # [B, T]

    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    pg = torch.maximum(unclipped, clipped)  # [B, T]
    clip_active = clipped > unclipped
    if cfg.dual_clip is not None:  # bound the loss of negative-advantage tokens with huge ratios
        lower = -adv * cfg.dual_clip
        dual_active = (adv < 0) & (pg > lower)
        pg = torch.where(adv < 0, torch.minimum(pg, lower), pg)
    else:
        dual_active = torch.zeros_like(mask)

    pg, explorer_unclipped = RATIO_MODES[cfg.ratio](pg, inputs, cfg, adv, is_explorer)
    stale = None
    if inputs.age is not None:
        stale = ((inputs.age > 0) & (inputs.source == LEARNER)).unsqueeze(-1).expand_as(mask)  # [B, T]
        if cfg.stale_tis and bool(stale.any()):
            pg = torch.where(stale, pg * tis_weight(inputs, cfg), pg)
    if explorer_unclipped:  # its explorer tokens are not clipped: count only the learner's
        clip_active, dual_active = clip_active & ~is_explorer, dual_active & ~is_explorer

    token_loss = pg
    kl = None
    if cfg.kl_coef > 0:
        if inputs.ref_logprobs is None:
            raise ValueError("algorithm.kl_coef > 0 needs reference log-probs")
        kl = kl_penalty(inputs.logprobs, inputs.ref_logprobs, cfg.kl_type)
        token_loss = token_loss + cfg.kl_coef * kl
    if cfg.entropy_coef != 0:
        token_loss = token_loss - cfg.entropy_coef * inputs.entropy

    loss = (token_loss * inputs.weights).sum()
    per_token = {"loss/pg": pg, "loss/clip_frac": clip_active.float(), "loss/dual_clip_frac": dual_active.float(),
                 "loss/ppo_kl": -log_ratio, "loss/ratio": ratio}
    if kl is not None:
        per_token["loss/kl"] = kl
    if inputs.behaviour_logprobs is not None:
        # learner tokens: trainer vs rollout-engine mismatch (should be ~0); explorer tokens: how far the
        # explorer's choices are from the learner's (the off-policy gap S2L-PO trains across)
        per_token["loss/behaviour_gap"] = inputs.old_logprobs - inputs.behaviour_logprobs
    if inputs.entropy is not None:
        per_token["loss/entropy"] = inputs.entropy
    sums = _metric_sums(per_token, mask, ratio, inputs.source)
    if stale is not None and inputs.behaviour_logprobs is not None:  # the replica's gap by sample age
        for name, rows in (("fresh", ~stale & ~is_explorer), ("stale", stale)):
            selected = mask & rows
            sums[f"tokens/{name}"] = selected.sum().double()
            sums[f"loss/behaviour_gap/{name}"] = per_token["loss/behaviour_gap"].detach().double().masked_fill(
                ~selected, 0).sum()
    return loss, sums


def _metric_sums(per_token: dict[str, torch.Tensor], mask: torch.Tensor, ratio: torch.Tensor,
                 source: torch.Tensor) -> dict[str, torch.Tensor]:
    """Token sums and counts (overall and per source) so callers can average across micro-batches and
    ranks exactly; `*_max` entries are maxima."""
    sums: dict[str, torch.Tensor] = {}
    for suffix, rows in (("", torch.ones_like(source, dtype=torch.bool)),
                         ("/explorer", source == EXPLORER), ("/learner", source == LEARNER)):
        selected = mask & rows.unsqueeze(-1)
        sums[f"tokens{suffix}"] = selected.sum().double()
        for name, values in per_token.items():
            sums[name + suffix] = values.detach().double().masked_fill(~selected, 0).sum()
    masked_ratio = ratio.detach().masked_fill(~mask, 0.0)
    sums["loss/ratio_max"] = masked_ratio.max().double() if mask.any() else torch.zeros((), dtype=torch.float64)
    return sums


def finalize_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Turn aggregated token sums into means: `name/part` divided by `tokens/part` where that count exists
    (part: a source, or fresh/stale), else by `tokens` (counts, `*_max` and `*_sum` entries pass through)."""
    out = {}
    for name, value in sums.items():
        if name.startswith("tokens") or name.endswith(("_max", "_sum")):
            out[name] = value
            continue
        part = f"tokens/{name.rsplit('/', 1)[-1]}"
        count = sums.get(part if part in sums else "tokens", 0.0)
        if count > 0:
            out[name] = value / count
    return out
