"""`s2l train` end to end on CPU with the Megatron-Core learner and LocalEngine (toy models)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from megatron_s2l.rollout.schedule import AnnealSchedule
from tests.utils import TINY_CONFIG, read_rows, run_process, run_s2l, toy_overrides


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


# Golden metrics: the first 3 steps of a fixed-seed tiny S2L-PO run (mixing on) reproduce the recorded G_w/G_s,
# rewards, losses and gradient norm. A change that alters the numerics fails here and must update the file on
# purpose: S2L_UPDATE_GOLDEN=1 .venv/bin/python -m pytest tests/e2e/test_train_e2e.py -k golden
# Tolerance: splits and rewards (means of 0/1 scores) exactly; float metrics to a relative 1e-4 (absolute 1e-10
# near zero), which any change of the algorithm exceeds by orders of magnitude and summation order on the same
# machine type does not. The toy world is made in one-thread processes (conftest), so the same machine type
# makes it bit for bit; another CPU type may round differently (then rerun with S2L_UPDATE_GOLDEN=1 and say so).
GOLDEN = Path(__file__).parent / "golden" / "s2l_3steps.json"
EXACT = ("schedule/G_w", "schedule/G_s", "reward/explorer_mean", "reward/learner_mean", "rollout/num_samples")
CLOSE = ("loss/total", "loss/pg", "loss/kl", "loss/entropy", "loss/clip_frac", "train/grad_norm",
         "advantage/zero_variance_frac", "advantage/explorer_mean", "advantage/learner_mean")


@pytest.mark.slow
def test_golden_metrics_of_the_first_three_steps(toy_world, tmp_path):
    run_dir = tmp_path / "run"
    run_s2l(["train", "--config", str(TINY_CONFIG),
             *toy_overrides(toy_world, steps=3, **{"schedule.t_mix": 3, "eval.every_steps": 0, "seed": 1234,
                                                   "rollout.group_size": 4, "optimizer.mini_batches_per_step": 2}),
             f"logging.run_dir={run_dir}"])
    got = [{key: row[key] for key in EXACT + CLOSE if key in row} for row in read_rows(run_dir)]
    if os.environ.get("S2L_UPDATE_GOLDEN") == "1":
        GOLDEN.write_text(json.dumps(got, indent=1) + "\n")
    want = json.loads(GOLDEN.read_text())
    assert [sorted(row) for row in got] == [sorted(row) for row in want], "the logged metrics changed"
    assert [(row["schedule/G_w"], row["schedule/G_s"]) for row in got] == [(4, 0), (2, 2), (0, 4)]
    for step, (mine, recorded) in enumerate(zip(got, want), start=1):
        for key in mine:
            tolerance = {} if key in EXACT else {"rel": 1e-4, "abs": 1e-10}
            assert mine[key] == pytest.approx(recorded[key], **tolerance), f"step {step}: {key}"


@pytest.mark.slow
def test_study_runs_arms_over_seeds_and_resumes(toy_world, tmp_path):
    out = tmp_path / "study"
    args = ["study", "--config", str(TINY_CONFIG), "--arms", "s2l,grpo", "--seeds", "2", "--seed-offset", "3",
            "--premise-k", "4", "--out", str(out), *toy_overrides(toy_world, steps=2, **{"schedule.t_mix": 2})]
    first = run_s2l(args, timeout=900)
    study = json.loads((out / "study.json").read_text())
    assert study["premise"]["k"] == [1, 2, 4]
    for who in ("explorer", "learner"):  # pass@k cannot fall as k grows
        values = study["premise"][f"{who}_pass_at_k"]
        assert values == sorted(values) and 0 <= values[0] <= values[-1] <= 1
    for arm in ("s2l", "grpo"):
        results = study["arms"][arm]
        assert results["seeds"] == [3, 4]
        for key in ("start_pass1", "final_pass1", "best_pass1", "learner_tokens", "explorer_tokens", "wall_s"):
            assert len(results[key]) == 2, key
        # every seed starts from the same model, but samples its own evaluation and its own prompts
        seeds_rows = [read_rows(out / "runs" / arm / f"seed{s}", before_training=True) for s in (3, 4)]
        assert [rows[0]["step"] for rows in seeds_rows] == [0, 0]
        assert results["final_pass1"] == [rows[-1]["eval/accuracy"] for rows in seeds_rows]
    assert study["arms"]["grpo"]["explorer_tokens"] == [0, 0] and min(study["arms"]["s2l"]["explorer_tokens"]) > 0
    assert "Premise (before training)" in (out / "study.md").read_text() and (out / "study.png").stat().st_size
    assert first.stdout.count(": pass@1 ") == 4
    again = run_s2l(args, timeout=600)  # a finished study: every run is skipped
    assert again.stdout.count("done earlier, skipped") == 4


@pytest.mark.slow
def test_trace_step_lists_the_files_one_step_runs_code_in(toy_world, tmp_path):
    """tools/trace_step.py: the files a mixed step (explorer and learner samples) enters, in order (README)."""
    result = run_process([sys.executable, "tools/trace_step.py", "--step", "2", "--json", "--", "train", "--config",
                          str(TINY_CONFIG), *toy_overrides(toy_world, steps=3, **{"schedule.t_mix": 3, "eval.every_steps": 0}),
                          f"logging.run_dir={tmp_path}"], "trace_step.py", timeout=600)
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    files = traced["files"]
    assert traced["step"] == 2 and len(files) == len(set(files))
    # every file the step enters is on the reading path or a named helper, and the path is Algorithm 1's order:
    # rollout, reward, advantages, batch, update, sync (the toy run's explorer is the pool, its replica in-process)
    assert traced["unclassified"] == [], traced["unclassified"]
    assert traced["reading_path"] == ["train/trainer.py", "rollout/collector.py", "rollout/schedule.py",
                                      "rollout/pool.py", "rollout/sampling.py", "reward/scorer.py", "rollout/local.py",
                                      "algo/advantages.py", "train/batch.py", "train/learner.py", "algo/loss.py",
                                      "train/weight_sync.py"], traced["reading_path"]
    assert "reading path, 12 files: train/trainer.py -> rollout/collector.py" in result.stdout
    assert "train/build.py" not in files and "cli.py" not in files  # assembly happens once, before step 1
