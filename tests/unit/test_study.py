"""`s2l study` without training: the report from hand-written run directories (numbers checked by hand),
resuming a killed study (the launcher mocked), and how a failing run is reported."""

from __future__ import annotations

import json
import math
import sys

import pytest

from megatron_s2l import cli
from megatron_s2l.config import ConfigError, load_config
from megatron_s2l.eval import study

# held-out pass@1 at the evaluated steps 0, 2, 4 (steps 1 and 3 have no evaluation), per arm and seed
CURVES = {
    "s2l": {3: [0.7, 0.5, 0.6], 4: [0.1, 0.9, 0.8], 5: [0.2, 0.4, 1.0]},
    "grpo": {3: [0.2, 0.3, 0.4], 4: [0.2, 0.5, 0.4], 5: [0.2, 0.3, 0.7]},
}
SETUP = {"config": "c.yaml", "overrides": ["steps=4"], "steps": 4, "seeds": [3, 4, 5]}
PREMISE = {"k": [1, 2, 4], "explorer_pass_at_k": [0.3, 0.5, 0.9], "learner_pass_at_k": [0.4, 0.5, 0.6]}


def _write_run(out, arm, seed, accs, wall_s=10.0, done=True):
    """metrics.jsonl with steps 0..4 as the trainer writes it (the ledger's token totals grow every step)."""
    run_dir = out / "runs" / arm / f"seed{seed}"
    run_dir.mkdir(parents=True)
    rows = []
    for step in range(5):
        row = {"step": step, "rollout/learner_tokens_total": 100.0 * step + seed,
               "rollout/explorer_tokens_total": 10.0 * step}
        if step % 2 == 0:
            row["eval/accuracy"] = accs[step // 2]
        rows.append(row)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if done:
        (run_dir / "study_run.json").write_text(json.dumps({"arm": arm, "seed": seed, "wall_s": wall_s,
                                                            "returncode": 0}))
    return run_dir


@pytest.fixture
def study_dir(tmp_path):
    for arm, seeds in CURVES.items():
        for seed in (5, 3, 4):  # written out of order: the lists must still follow the seeds
            _write_run(tmp_path, arm, seed, seeds[seed], wall_s=float(seed))
    (tmp_path / "premise.json").write_text(json.dumps(PREMISE))
    return tmp_path


def test_se_arithmetic_by_hand():
    # [0.4, 0.4, 0.7]: mean 0.5, deviations -0.1 -0.1 0.2, variance 0.06 / 2 = 0.03, SE sqrt(0.03 / 3) = 0.1
    assert study.mean([0.4, 0.4, 0.7]) == pytest.approx(0.5)
    assert study.std_err([0.4, 0.4, 0.7]) == pytest.approx(0.1)
    assert study.std_err([0.7]) is None and study.mean([]) is None
    # [0.6, 0.8, 1.0]: sample std 0.2, SE 0.2 / sqrt(3); difference SE = sqrt(0.1^2 + 0.2^2 / 3)
    diff, se = study.diff_se([0.6, 0.8, 1.0], [0.4, 0.4, 0.7])
    assert diff == pytest.approx(0.3) and se == pytest.approx(math.sqrt(0.01 + 0.04 / 3))
    assert study.diff_se([0.5], [0.4, 0.4, 0.7]) == (pytest.approx(0.0), None)


def test_study_json_shape_and_values(study_dir):
    results = study.collect_results(study_dir, ["s2l", "grpo"], [3, 4, 5])
    study.write_report(study_dir, {**results, "setup": SETUP})
    written = json.loads((study_dir / "study.json").read_text())
    assert written["premise"] == PREMISE
    assert set(written["arms"]) == {"s2l", "grpo"}
    s2l = written["arms"]["s2l"]
    assert set(s2l) == {"seeds", "start_pass1", "final_pass1", "best_pass1", "learner_tokens",
                        "explorer_tokens", "wall_s"}
    assert s2l["seeds"] == [3, 4, 5]
    assert s2l["start_pass1"] == [0.7, 0.1, 0.2]  # the step-0 rows
    assert s2l["final_pass1"] == [0.6, 0.8, 1.0]  # the last step's rows
    assert s2l["best_pass1"] == [0.6, 0.9, 1.0]  # steps >= 1 only (seed 3's step 0 is not counted)
    assert s2l["learner_tokens"] == [403, 404, 405] and s2l["explorer_tokens"] == [40, 40, 40]
    assert all(isinstance(t, int) for t in s2l["learner_tokens"] + s2l["explorer_tokens"])
    assert s2l["wall_s"] == [3.0, 4.0, 5.0]
    assert written["arms"]["grpo"]["final_pass1"] == [0.4, 0.4, 0.7]
    assert written["curves"]["grpo"][1] == [[0, 0.2], [2, 0.5], [4, 0.4]]
    assert written["threshold"] == pytest.approx(0.35)  # grpo: start 0.2, final 0.5
    assert (study_dir / "study.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_markdown_report(study_dir):
    results = study.collect_results(study_dir, ["s2l", "grpo"], [3, 4, 5])
    md = study.render_markdown({**results, "setup": SETUP})
    assert "`c.yaml`" in md and "`steps=4`" in md and "4 steps" in md and "[3, 4, 5]" in md
    assert "| 4 | 0.900 | 0.600 |" in md and "Regime: **paper's regime**: the learner is at least as good" in md
    rows = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| s2l")
            or line.startswith("| grpo")}
    # grpo: start 0.2 (SE 0), final 0.5 ± 0.1, gain 0.3 ± 0.1; threshold 0.35 reached at steps 4, 2, 4:
    # mean 10/3, sample std sqrt(4/3), SE 2/3
    assert rows["grpo"].startswith("| grpo | 3 | 0.200 ± 0.000 | 0.500 ± 0.100 | 0.533 ± 0.088 | "
                                   "0.300 ± 0.100 | 3.3 ± 0.7 (reached by 3/3) |")
    assert rows["grpo"].endswith("| 404 | 40 | 4 s |")  # the last rows' token totals; walls 3, 4, 5 s
    # s2l: final 0.8 ± 0.2/sqrt(3); first step at or above 0.35: 2, 2, 2
    assert "0.800 ± 0.115" in rows["s2l"] and "2.0 ± 0.0 (reached by 3/3)" in rows["s2l"]
    assert "Threshold: pass@1 0.350" in md
    # final: 0.8 - 0.5, SE sqrt(0.1^2 + 0.2^2 / 3) = 0.153; best: s2l 0.6 0.9 1.0 (SE 0.120), grpo 0.4 0.5 0.7
    # (SE 0.088): 0.833 - 0.533, SE sqrt(0.0144 + 0.0078) = 0.149
    # paired by seed: final 0.2, 0.4, 0.3 and best 0.2, 0.4, 0.3: mean 0.3, sample std 0.1, SE 0.1 / sqrt(3)
    assert ("- s2l − grpo: final pass@1 +0.300 ± 0.153 (+2.0 SE), paired +0.300 ± 0.058; "
            "best pass@1 +0.300 ± 0.149 (+2.0 SE), paired +0.300 ± 0.058") in md
    assert "](study.png)" in md


def test_a_negative_difference_is_shown_with_its_sign(study_dir):
    results = study.collect_results(study_dir, ["s2l", "grpo"], [3, 4, 5])
    results["arms"] = {"worse": results["arms"]["grpo"], "grpo": results["arms"]["s2l"]}
    results["curves"] = {"worse": results["curves"]["grpo"], "grpo": results["curves"]["s2l"]}
    md = study.render_markdown(results)
    assert "- worse − grpo: final pass@1 -0.300 ± 0.153 (-2.0 SE), paired -0.300 ± 0.058" in md


def test_threshold_and_steps_to_threshold():
    curve = [[0, 0.5], [2, 0.3], [4, 0.6], [6, 0.7]]
    assert study.steps_to_threshold(curve, 0.45) == 4  # step 0 does not count
    assert study.steps_to_threshold(curve, 0.8) is None
    arms = {"s2l": {"seeds": [0], "start_pass1": [0.1], "final_pass1": [0.3]}}
    assert study.threshold({"arms": arms}) == pytest.approx(0.2)  # no grpo arm: the first arm
    arms["grpo"] = {"seeds": [0, 1], "start_pass1": [0.2, 0.4], "final_pass1": [0.6, 0.8]}
    assert study.threshold({"arms": arms}) == pytest.approx(0.5)


@pytest.mark.parametrize("explorer, learner, expected", [
    ([0.3, 0.9], [0.4, 0.6], "paper's regime"),     # learner ahead at pass@1, explorer ahead at the largest k
    ([0.5, 0.9], [0.4, 0.6], "explorer stronger"),  # explorer ahead already at pass@1
    ([0.3, 0.5], [0.4, 0.6], "premise not met"),    # learner ahead everywhere
])
def test_regime(explorer, learner, expected):
    premise = {"k": [1, 64], "explorer_pass_at_k": explorer, "learner_pass_at_k": learner}
    assert study.regime(premise) == expected
    assert f"Regime: **{expected}**" in "\n".join(study._premise_lines(premise))


def test_missing_step0_row_is_an_error(tmp_path):
    run_dir = _write_run(tmp_path, "s2l", 0, [0.1, 0.2, 0.3])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()][1:]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match="step-0 eval/accuracy"):
        study.summarize_run(run_dir)


def _config(tmp_path, every_steps=2):
    path = tmp_path / "run.yaml"
    path.write_text(f"steps: 4\nexplorer: {{mode: pool, pool_path: pool, model_path: explorer}}\n"
                    f"eval: {{path: test.jsonl, every_steps: {every_steps}}}\n")
    return str(path)


def test_arm_overrides_and_unknown_arms(tmp_path):
    assert study.arm_overrides("constant", 4) == ["schedule.kind=constant", "schedule.t_mix=4"]
    assert study.arm_overrides("grpo", 4) == ["explorer.mode=off"]
    for arm in study.ARMS:  # every arm is a valid config
        load_config(_config(tmp_path), study.arm_overrides(arm, 4))
    with pytest.raises(ValueError, match="s2l, grpo, constant, per_source, luffy"):
        study.arm_overrides("bogus", 4)
    argv = ["study", "--config", _config(tmp_path), "--arms", "s2l,bogus", "--out", str(tmp_path / "o")]
    code = cli.main(argv)
    assert code == 2 and not (tmp_path / "o").exists()


def test_setup_errors_name_the_field(tmp_path):
    with pytest.raises(ConfigError, match="eval.every_steps"):
        study.check_setup(_config(tmp_path, every_steps=0), [], ["s2l"])
    with pytest.raises(ConfigError, match="rollout.gruop_size"):
        study.check_setup(_config(tmp_path), ["rollout.gruop_size=4"], ["s2l"])
    cfg = load_config(_config(tmp_path), ["explorer.model_path="])
    with pytest.raises(ConfigError, match="explorer.model_path"):
        study.measure_premise(cfg, 4)


def test_resume_skips_done_runs_and_restarts_the_others(tmp_path, monkeypatch, capsys):
    out, config = tmp_path / "study", _config(tmp_path)
    out.mkdir()
    (out / "premise.json").write_text(json.dumps(PREMISE))
    _write_run(out, "s2l", 0, [0.1, 0.2, 0.3])  # finished before the kill
    stale = _write_run(out, "grpo", 0, [0.9, 0.9, 0.9], done=False)  # killed mid-run
    (stale / "train.log").write_text("partial\n")
    launched = []

    def fake_launch(cmd, run_dir, timeout_s, label):
        assert not run_dir.exists()  # the unfinished run starts from scratch
        launched.append((cmd, run_dir, timeout_s, label))
        _write_run(out, "grpo", 0, [0.2, 0.3, 0.4], done=False)

    monkeypatch.setattr(study, "launch_run", fake_launch)
    result = study.run_study(config, out, ["s2l", "grpo"], [0], ["steps=4"], run_timeout_s=99)
    assert len(launched) == 1
    cmd, run_dir, timeout_s, label = launched[0]
    assert run_dir == out / "runs/grpo/seed0" and timeout_s == 99 and label == "grpo seed 0"
    assert cmd[:7] == [sys.executable, "-m", "megatron_s2l.cli", "train", "--config", config, "steps=4"]
    assert cmd[7:] == ["explorer.mode=off", "seed=0", f"logging.run_dir={run_dir}"]
    record = json.loads((run_dir / "study_run.json").read_text())
    assert (record["arm"], record["seed"], record["returncode"]) == ("grpo", 0, 0) and record["wall_s"] >= 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == "[1/2] s2l seed 0: done earlier, skipped"
    assert printed[1].startswith("[2/2] grpo seed 0: pass@1 0.200 -> 0.400 (best 0.400), ")
    assert result["arms"]["grpo"]["final_pass1"] == [0.4] and result["arms"]["s2l"]["final_pass1"] == [0.3]
    assert json.loads((out / "study.json").read_text())["arms"]["grpo"]["seeds"] == [0]


def test_a_failing_run_stops_the_study_naming_its_log(tmp_path, monkeypatch):
    run_dir = tmp_path / "runs/s2l/seed0"
    lines = "; ".join(f"print('line {i}')" for i in range(30))
    with pytest.raises(study.StudyRunError) as err:
        study.launch_run([sys.executable, "-c", f"{lines}; raise SystemExit(3)"], run_dir, 60, "s2l seed 0")
    message = str(err.value)
    assert "s2l seed 0 exited with 3" in message and str(run_dir / "train.log") in message
    assert "line 29" in message and "line 9\n" not in message  # the last 20 lines only
    with pytest.raises(study.StudyRunError, match="timed out after 1 s"):
        study.launch_run([sys.executable, "-c", "import time; time.sleep(60)"], run_dir, 1, "s2l seed 0")

    def failing(cmd, run_dir, timeout_s, label):
        raise study.StudyRunError(f"{label} exited with 1; log {run_dir / 'train.log'}")

    out = tmp_path / "study"
    out.mkdir()
    (out / "premise.json").write_text(json.dumps(PREMISE))
    monkeypatch.setattr(study, "launch_run", failing)
    argv = ["study", "--config", _config(tmp_path), "--arms", "s2l", "--seeds", "1", "--out", str(out)]
    code = cli.main(argv)
    assert code == 1 and not (out / "runs/s2l/seed0/study_run.json").exists()
