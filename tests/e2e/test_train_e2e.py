"""`s2l train` end to end on CPU with the Megatron-Core learner and LocalEngine (toy models)."""

from __future__ import annotations

import json

import pytest

from megatron_s2l.rollout.schedule import AnnealSchedule
from tests.utils import TINY_CONFIG, read_rows, run_s2l, toy_overrides


def _train(world, run_dir, nproc=1, **extra):
    args = ["train", "--config", str(TINY_CONFIG), *toy_overrides(world, **extra), f"logging.run_dir={run_dir}"]
    return run_s2l(args, nproc=nproc)


def _check_schedule_and_sources(rows, group_size=4, t_mix=3, steps=4, kind="linear"):
    schedule = AnnealSchedule(kind, group_size, t_mix, steps)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for row in rows:
        g_w, g_s = schedule.split(row["step"])
        assert (row["schedule/G_w"], row["schedule/G_s"]) == (g_w, g_s)
        assert row["schedule/alpha"] == pytest.approx(schedule.alpha(row["step"]))
        assert ("reward/explorer_mean" in row) == (g_w > 0) and ("reward/learner_mean" in row) == (g_s > 0)
        assert (row["rollout/explorer_tokens"] > 0) == (g_w > 0)
        assert row["rollout/num_samples"] == 4 * group_size
        for key in ("loss/kl", "loss/clip_frac", "loss/entropy", "train/grad_norm", "timing/train_s",
                    "timing/sync_s", "sync/gb_per_s", "response/mean_length", "throughput/tokens_per_s",
                    "perf/tflops_per_gpu", "memory/host_peak_gib", "groups/unique_answer_ratio"):
            assert key in row, key
    assert "eval/accuracy" in rows[1] and "eval/accuracy" in rows[3]


@pytest.mark.slow
def test_s2l_po_tp1(toy_world, tmp_path):
    result = _train(toy_world, tmp_path / "run", **{"eval.extra": f"{{again: {toy_world['test']}}}",
                                                   "eval.samples_per_prompt": 2})
    rows = read_rows(tmp_path / "run")
    _check_schedule_and_sources(rows)
    evals = [r for r in rows if "eval/accuracy" in r]
    assert [0 <= r["eval/again/accuracy"] <= r["eval/again/pass@2"] <= 1 for r in evals] == [True, True]
    assert [0 < r["eval/unique_answer_ratio"] <= 1 and "eval/self_bleu" in r for r in evals] == [True, True]
    assert "step 4/4 | alpha 0.00 G_w/G_s 0/4" in result.stdout  # the progress line
    assert "learner memory per GPU before activations: " in result.stdout  # the startup report
    assert rows[-1]["rollout/flops_saving_online"] > 0  # pool samples are free at training time
    assert (tmp_path / "run" / "checkpoints" / "step_000004" / "trainer_state.json").is_file()


@pytest.mark.slow
@pytest.mark.dist
def test_s2l_po_tp2_under_torchrun(toy_world, tmp_path):
    _train(toy_world, tmp_path / "run", nproc=2,
           **{"parallel.tp": 2, "logging.profile_steps": "[2,3]", "logging.profile_ranks": "[0,1]"})
    _check_schedule_and_sources(read_rows(tmp_path / "run"))
    for rank in (0, 1):  # each profiled rank's trace of steps 2-3 holds both steps' phases
        trace = json.loads((tmp_path / "run" / "profile" / f"rank{rank}_steps2-3.json").read_text())
        names = [event.get("name") for event in trace["traceEvents"]]
        assert names.count("s2l/train") == 2 and names.count("s2l/logprob") == 2


@pytest.mark.slow
def test_grpo_only_and_per_source_modes(toy_world, tmp_path):
    _train(toy_world, tmp_path / "grpo", **{"explorer.mode": "off"})
    for row in read_rows(tmp_path / "grpo"):
        assert (row["schedule/G_w"], row["schedule/G_s"]) == (0, 4) and "reward/explorer_mean" not in row
        assert row["rollout/explorer_tokens_total"] == 0
    _train(toy_world, tmp_path / "per_source", **{"algorithm.group_mode": "per_source", "schedule.kind": "step"})
    _check_schedule_and_sources(read_rows(tmp_path / "per_source"), kind="step")
