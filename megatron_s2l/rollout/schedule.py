"""The explorer share alpha over training steps, and the split of each group G into G_w + G_s.

Steps are 1-indexed (the paper's i). Every kind reaches alpha = 0 at step T_mix and stays there, so from
T_mix on training is plain on-policy GRPO. G_w = ceil(alpha * G), G_s = G - G_w (the paper's rounding;
the released code rounded both up and made groups of G + 1).

Kinds:
  linear    the paper: alpha_i = 1 - (i-1)/(T_mix-1) for i <= T_mix, else 0.
            G=16, T_mix=8 gives G_w = 16, 14, 12, 10, 7, 5, 3, 0, then 0.
  step      abrupt switch (the paper's ablation): alpha = 1 for i < T_mix, 0 for i >= T_mix.
  cosine    alpha_i = (1 + cos(pi (i-1)/(T_mix-1))) / 2 for i <= T_mix: slow start, slow finish.
  constant  alpha = constant_alpha for i < T_mix, 0 for i >= T_mix.
  adaptive  not in the paper: anneals at least as fast as `linear`, faster once the learner's own success
            rate approaches the explorer's (rule in `AnnealSchedule._adaptive_alpha`).

Departures from the paper: T_mix = 1 (the formula divides by zero) means no mixing at all (alpha_1 = 0),
which keeps "alpha(T_mix) = 0" true for every kind; kinds other than linear are ours.
"""

from __future__ import annotations

import math
from typing import Optional

from megatron_s2l.config import ScheduleConfig


KINDS = ("linear", "step", "cosine", "constant", "adaptive")


def ceil_count(x: float) -> int:
    """ceil for a product that should be an integer but carries float noise (7.000000000000001 -> 7)."""
    return math.ceil(round(x, 9))


class AnnealSchedule:
    """alpha(step) and split(step) for one run; `observe` feeds the adaptive kind (a no-op for the others)."""

    # config
    kind: str
    group_size: int  # G
    t_mix: int  # T_mix: first step with alpha = 0
    total_steps: int
    constant_alpha: float
    adaptive_window: int
    # state (adaptive only): step -> (explorer success rate, learner success rate); None = not sampled
    observations: dict[int, tuple[Optional[float], Optional[float]]]

    def __init__(self, kind: str, group_size: int, t_mix: int, total_steps: int,
                 constant_alpha: float = 0.5, adaptive_window: int = 2):
        if kind not in KINDS:
            raise ValueError(f"schedule.kind={kind!r} is unknown; use one of {list(KINDS)}")
        if group_size < 1:
            raise ValueError(f"group size G={group_size} is invalid; use G >= 1 (paper: 16)")
        if t_mix < 1:  # T_mix > steps is refused by RunConfig.validate when an explorer is used
            raise ValueError(f"schedule.t_mix={t_mix} is invalid; use T_mix >= 1 (paper: half the steps)")
        if not 0.0 <= constant_alpha <= 1.0:
            raise ValueError(f"schedule.constant_alpha={constant_alpha} must be in [0, 1]")
        if adaptive_window < 1:
            raise ValueError(f"schedule.adaptive_window={adaptive_window} must be >= 1")
        self.kind, self.group_size, self.t_mix, self.total_steps = kind, group_size, t_mix, total_steps
        self.constant_alpha, self.adaptive_window = constant_alpha, adaptive_window
        self.observations = {}

    # ------------------------------------------------------------------------------------------
    # alpha and the split

    def alpha(self, step: int) -> float:
        """Explorer share at 1-indexed `step` (0 from T_mix on)."""
        if step < 1:
            raise ValueError(f"step={step}: steps are 1-indexed")
        if step >= self.t_mix:
            return 0.0
        if self.kind == "step":
            return 1.0
        if self.kind == "constant":
            return self.constant_alpha
        progress = (step - 1) / (self.t_mix - 1)  # in [0, 1); t_mix >= 2 here
        if self.kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if self.kind == "linear":
            return 1.0 - progress
        return self._adaptive_alpha(step)

    def split(self, step: int) -> tuple[int, int]:
        """(G_w, G_s) for `step`: G_w = ceil(alpha * G) explorer samples, G_s = G - G_w learner samples."""
        g_w = min(self.group_size, max(0, ceil_count(self.alpha(step) * self.group_size)))
        return g_w, self.group_size - g_w

    def table(self) -> list[tuple[int, float, int, int]]:
        """(step, alpha, G_w, G_s) for every step of the run, for logging the plan at start-up."""
        return [(i, self.alpha(i), *self.split(i)) for i in range(1, self.total_steps + 1)]

    # ------------------------------------------------------------------------------------------
    # adaptive

    def observe(self, step: int, explorer_success: Optional[float], learner_success: Optional[float]) -> None:
        """Record the step's success rates (fraction of samples with reward > 0; None if that source
        had no samples). Only the adaptive kind uses them; recording is cheap and keeps one code path."""
        self.observations[int(step)] = (explorer_success, learner_success)

    def _adaptive_alpha(self, step: int) -> float:
        """alpha_i = min(linear_i, min over j <= i of (1 - r_j)), where r_j = min(1, s_s / s_w) compares the
        learner's mean success s_s with the explorer's s_w over the last `adaptive_window` observed steps
        before j (each averaged over the steps that had samples of that source).

        So alpha never rises, is never above the paper's linear schedule (hence reaches 0 by T_mix), and
        drops to the learner's relative gap (s_w - s_s) / s_w once that is smaller. No observations, or a
        source missing from the window, leave the linear value. An explorer that solves nothing (s_w = 0)
        gives r = 1: it has nothing left to teach.
        """
        alpha = 1.0 - (step - 1) / (self.t_mix - 1)
        for j in range(2, step + 1):
            r = self._learner_ratio(before=j)
            if r is not None:
                alpha = min(alpha, 1.0 - r)
        return max(alpha, 0.0)

    def _learner_ratio(self, before: int) -> Optional[float]:
        recent = sorted(s for s in self.observations if s < before)[-self.adaptive_window:]
        explorer = [self.observations[s][0] for s in recent if self.observations[s][0] is not None]
        learner = [self.observations[s][1] for s in recent if self.observations[s][1] is not None]
        if not explorer or not learner:
            return None
        s_w, s_s = sum(explorer) / len(explorer), sum(learner) / len(learner)
        return 1.0 if s_w <= 0 else min(1.0, s_s / s_w)

    # ------------------------------------------------------------------------------------------
    # checkpoints

    def state_dict(self) -> dict:
        """JSON-able state: the observations (empty for every kind but adaptive in effect)."""
        return {"kind": self.kind, "observations": {str(k): list(v) for k, v in self.observations.items()}}

    def load_state_dict(self, state: dict) -> None:
        if state.get("kind", self.kind) != self.kind:
            raise ValueError(f"checkpoint schedule kind {state['kind']!r} != configured {self.kind!r}; "
                             "resume with the same schedule.kind")
        self.observations = {int(k): (v[0], v[1]) for k, v in state.get("observations", {}).items()}


def build_schedule(schedule_cfg: ScheduleConfig, group_size: int, t_mix: int, total_steps: int
                   ) -> AnnealSchedule:
    """The schedule for a run; `t_mix` is RunConfig.t_mix (the config's value or its default)."""
    return AnnealSchedule(schedule_cfg.kind, group_size, t_mix, total_steps,
                          constant_alpha=schedule_cfg.constant_alpha, adaptive_window=schedule_cfg.adaptive_window)
