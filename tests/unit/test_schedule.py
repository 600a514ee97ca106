"""alpha schedules: the paper's table, every kind's table, rounding, adaptive rule, checkpoint state."""

from __future__ import annotations

import json

import pytest

from megatron_s2l.config import ScheduleConfig
from megatron_s2l.rollout.schedule import KINDS, AnnealSchedule, build_schedule


def g_w_column(schedule: AnnealSchedule) -> list[int]:
    return [g_w for _, _, g_w, _ in schedule.table()]


def test_linear_matches_the_paper_table():
    schedule = AnnealSchedule("linear", group_size=16, t_mix=8, total_steps=16)
    assert g_w_column(schedule) == [16, 14, 12, 10, 7, 5, 3, 0] + [0] * 8
    assert sum(g_w_column(schedule)) == 67  # PAPER.md: 67/256 explorer rollouts
    assert [g_s for *_, g_s in schedule.table()][:8] == [0, 2, 4, 6, 9, 11, 13, 16]


def test_linear_14b_setting():
    schedule = AnnealSchedule("linear", group_size=8, t_mix=4, total_steps=16)
    assert g_w_column(schedule)[:5] == [8, 6, 3, 0, 0]


@pytest.mark.parametrize("group_size", [1, 2, 3, 5, 7, 8, 10, 16, 17, 31, 64, 100])
@pytest.mark.parametrize("t_mix", [2, 3, 4, 5, 6, 7, 8, 11, 13, 16, 50])
def test_linear_rounding_is_exact_ceil(group_size, t_mix):
    """G_w must equal the exact integer ceil(G (T_mix - i) / (T_mix - 1)); float noise must not add 1."""
    schedule = AnnealSchedule("linear", group_size, t_mix, total_steps=t_mix + 2)
    for i in range(1, t_mix + 3):
        exact = -(-group_size * max(t_mix - i, 0) // (t_mix - 1))
        g_w, g_s = schedule.split(i)
        assert (g_w, g_w + g_s) == (exact, group_size), (i, g_w, exact)


def test_float_noise_does_not_round_up():
    # 0.28 * 25 = 7.000000000000001 in binary floating point
    schedule = AnnealSchedule("constant", group_size=25, t_mix=3, total_steps=3, constant_alpha=0.28)
    assert 0.28 * 25 > 7
    assert schedule.split(1) == (7, 18)


def test_step_kind_switches_at_t_mix():
    schedule = AnnealSchedule("step", group_size=16, t_mix=8, total_steps=10)
    assert g_w_column(schedule) == [16] * 7 + [0] * 3


def test_cosine_table():
    schedule = AnnealSchedule("cosine", group_size=16, t_mix=8, total_steps=10)
    # (1 + cos(pi k / 7)) / 2 * 16 for k = 0..6: 16, 15.2, 12.99, 9.78, 6.22, 3.01, 0.80
    assert g_w_column(schedule) == [16, 16, 13, 10, 7, 4, 1, 0, 0, 0]
    alphas = [a for _, a, _, _ in schedule.table()]
    assert alphas == sorted(alphas, reverse=True)


def test_constant_table():
    schedule = AnnealSchedule("constant", group_size=16, t_mix=5, total_steps=7, constant_alpha=0.25)
    assert g_w_column(schedule) == [4, 4, 4, 4, 0, 0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_t_mix_one_means_no_mixing(kind):
    schedule = AnnealSchedule(kind, group_size=16, t_mix=1, total_steps=3)
    assert g_w_column(schedule) == [0, 0, 0]


@pytest.mark.parametrize("kind", KINDS)
def test_every_kind_sums_to_g_and_reaches_zero_at_t_mix(kind):
    schedule = AnnealSchedule(kind, group_size=12, t_mix=6, total_steps=9)
    for step, alpha, g_w, g_s in schedule.table():
        assert g_w + g_s == 12 and 0 <= g_w <= 12 and 0.0 <= alpha <= 1.0
        if step >= 6:
            assert g_w == 0


def test_adaptive_without_observations_is_linear():
    adaptive = AnnealSchedule("adaptive", group_size=16, t_mix=8, total_steps=16)
    assert g_w_column(adaptive) == [16, 14, 12, 10, 7, 5, 3, 0] + [0] * 8


def test_adaptive_drops_when_learner_catches_up():
    schedule = AnnealSchedule("adaptive", group_size=16, t_mix=8, total_steps=10, adaptive_window=2)
    schedule.observe(1, 0.8, None)  # step 1 is explorer-only under the linear envelope
    assert schedule.split(2) == (14, 2)  # no learner rate yet: linear
    schedule.observe(2, 0.8, 0.2)  # learner at 1/4 of the explorer: gap 0.75 > linear 0.714
    assert schedule.split(3) == (12, 4)
    schedule.observe(3, 0.6, 0.6)  # window {2, 3}: s_w = 0.7, s_s = 0.4, alpha <= 1 - 4/7 = 3/7
    assert schedule.alpha(4) == pytest.approx(3 / 7)
    assert schedule.split(4) == (7, 9)
    schedule.observe(4, 0.5, 0.5)  # window {3, 4}: caught up, alpha -> 0 before T_mix
    assert schedule.split(5) == (0, 16)
    schedule.observe(5, None, 0.1)  # the learner regresses: alpha never rises again
    assert schedule.split(6) == (0, 16)


def test_adaptive_explorer_that_solves_nothing_hands_over():
    schedule = AnnealSchedule("adaptive", group_size=8, t_mix=6, total_steps=6)
    schedule.observe(1, 0.0, None)
    schedule.observe(2, 0.0, 0.0)
    assert schedule.split(3) == (0, 8)


def test_adaptive_state_round_trip_gives_the_same_plan():
    schedule = AnnealSchedule("adaptive", group_size=16, t_mix=8, total_steps=10)
    schedule.observe(1, 0.9, None)
    schedule.observe(2, 0.9, 0.45)
    state = json.loads(json.dumps(schedule.state_dict()))
    resumed = AnnealSchedule("adaptive", group_size=16, t_mix=8, total_steps=10)
    assert g_w_column(resumed) != g_w_column(schedule)
    resumed.load_state_dict(state)
    assert g_w_column(resumed) == g_w_column(schedule)
    with pytest.raises(ValueError, match="schedule.kind"):
        AnnealSchedule("linear", 16, 8, 10).load_state_dict(state)


def test_build_schedule_from_config():
    schedule = build_schedule(ScheduleConfig(kind="constant", constant_alpha=0.5), 16, 4, 8)
    assert g_w_column(schedule) == [8, 8, 8, 0, 0, 0, 0, 0]


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="exp"), "schedule.kind"),
    (dict(t_mix=0), "schedule.t_mix"),
    (dict(group_size=0), "G=0"),
])
def test_bad_settings_name_the_field(kwargs, match):
    args = dict(kind="linear", group_size=16, t_mix=8, total_steps=16) | kwargs
    with pytest.raises(ValueError, match=match):
        AnnealSchedule(**args)


def test_steps_are_one_indexed():
    with pytest.raises(ValueError, match="1-indexed"):
        AnnealSchedule("linear", 16, 8, 16).split(0)
