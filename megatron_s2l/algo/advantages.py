"""Group-relative advantages: A = (r - mean) / (std + eps) over each prompt's group.

Legend: N samples in the batch (all groups concatenated).

Modes (DESIGN.md §4):
  mixed       one group per prompt: the G_w explorer and G_s learner samples together (the paper).
  per_source  explorer and learner samples normalised separately (what the released code effectively did
              by training the two sources in separate steps).
Both see rewards from the same verifier on the same scale. std is the unbiased sample std (as verl);
groups of one sample, and groups whose rewards are all equal, get advantage 0 and are flagged.
`norm_by_std=False` gives Dr.GRPO's mean-only centring.
"""

from __future__ import annotations

import torch

from megatron_s2l.rollout.types import SOURCES, Group

EXPLORER, LEARNER = 0, 1  # source codes in tensors


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, norm_by_std: bool = True,
                     eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and zero-variance flags for samples labelled with integer group ids.

    rewards [N] float, group_ids [N] int -> advantages [N], zero_variance [N] bool.
    """
    rewards = rewards.double()
    _, inverse, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    num_groups = counts.numel()
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, rewards)
    means = sums / counts
    centred = rewards - means[inverse]  # [N]
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inverse, centred**2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()  # [num_groups], unbiased
    zero_variance = (sq == 0)[inverse] | (counts == 1)[inverse]
    advantages = centred / (std[inverse] + eps) if norm_by_std else centred
    return advantages.masked_fill(zero_variance, 0.0).float(), zero_variance


def advantages_for_groups(groups: list[Group], mode: str = "mixed", norm_by_std: bool = True,
                          eps: float = 1e-6) -> tuple[list[list[float]], dict[str, float]]:
    """Per-sample advantages for a step's groups (same nesting as the groups) plus metrics."""
    rewards, group_ids, sources = [], [], []
    for g, group in enumerate(groups):
        for sample in group.samples:
            source = SOURCES.index(sample.source)
            rewards.append(sample.reward if sample.reward is not None else 0.0)
            # per_source: explorer and learner samples of a prompt form two groups
            group_ids.append(2 * g + source if mode == "per_source" else g)
            sources.append(source)
    if mode not in ("mixed", "per_source"):
        raise ValueError(f"algorithm.group_mode={mode!r}: use 'mixed' (paper) or 'per_source'")
    if not rewards:
        return [[] for _ in groups], {}
    adv, zero_var = group_advantages(torch.tensor(rewards), torch.tensor(group_ids),
                                     norm_by_std=norm_by_std, eps=eps)
    nested, start = [], 0
    for group in groups:
        nested.append(adv[start:start + len(group.samples)].tolist())
        start += len(group.samples)
    source_t = torch.tensor(sources)
    metrics = {"advantage/zero_variance_frac": zero_var.float().mean().item(),
               "advantage/abs_mean": adv.abs().mean().item()}
    for code, name in ((EXPLORER, "explorer"), (LEARNER, "learner")):
        picked = adv[source_t == code]
        if picked.numel():
            metrics[f"advantage/{name}_mean"] = picked.mean().item()
    return nested, metrics
