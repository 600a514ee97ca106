"""Metric sinks and the rollout-compute ledger."""

from __future__ import annotations

import json

import pytest

from megatron_s2l.config import LoggingConfig
from megatron_s2l.rollout.ledger import RolloutLedger
from megatron_s2l.metrics.logger import build_metrics_logger, format_progress
from megatron_s2l.metrics.runs import read_metrics
from megatron_s2l.rollout.types import Group, Sample


def _group(explorer_lengths, learner_lengths) -> Group:
    samples = [Sample("p", [1], [0] * n, [0.0] * n, source="explorer") for n in explorer_lengths]
    samples += [Sample("p", [1], [0] * n, [0.0] * n, source="learner") for n in learner_lengths]
    return Group("p", [1], "1", samples)


def test_ledger_counts_tokens_and_the_saving_against_grpo():
    ledger = RolloutLedger(learner_params=800, explorer_params=100, explorer_is_pool=True)
    step1 = ledger.record([_group([10, 10, 10], [10])])  # 30 explorer tokens, 10 learner tokens
    assert (step1["rollout/explorer_tokens"], step1["rollout/learner_tokens"]) == (30, 10)
    assert step1["rollout/flops_saving_online"] == pytest.approx(1 - 10 / 40)  # the pool was free
    assert step1["rollout/flops_saving_total"] == pytest.approx(1 - (10 * 800 + 30 * 100) / (40 * 800))
    step2 = ledger.record([_group([], [20, 20])])
    assert step2["rollout/learner_tokens_total"] == 50 and step2["rollout/explorer_tokens_total"] == 30
    restored = RolloutLedger(800, 100)
    restored.load_state_dict(json.loads(json.dumps(ledger.state_dict())))
    assert restored.record([])["rollout/grpo_flops_total"] == step2["rollout/grpo_flops_total"]


def test_jsonl_tensorboard_and_console(tmp_path, caplog):
    cfg = LoggingConfig(run_dir=str(tmp_path), tensorboard=True)
    metrics = build_metrics_logger(cfg, total_steps=2, config={}, is_driver=True)
    with caplog.at_level("INFO"):
        metrics.log(1, {"schedule/alpha": 1.0, "schedule/G_w": 8, "schedule/G_s": 0, "timing/step_s": 2.0,
                        "timing/train_s": 1.0, "eval/accuracy": 0.25})
        metrics.log(2, {"schedule/alpha": 0.0, "schedule/G_w": 0, "schedule/G_s": 8})
    metrics.close()
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2]
    assert "step 1/2 | alpha 1.00 G_w/G_s 8/0" in caplog.text and "eval 0.250" in caplog.text
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert build_metrics_logger(cfg, 2, {}, is_driver=False).sinks == []  # other ranks log nothing


def test_a_resume_moves_the_rows_of_steps_that_run_again_aside(tmp_path):
    """Killed after logging steps 3 and 4 (the last row cut short) with step 2 saved: the resumed run logs 3
    and 4 again, and metrics.jsonl keeps one row per step."""
    cfg = LoggingConfig(run_dir=str(tmp_path))
    first = build_metrics_logger(cfg, total_steps=4, config={}, is_driver=True)
    for step in range(5):
        first.log(step, {"try": 1.0})
    first.close()
    with (tmp_path / "metrics.jsonl").open("a") as file:
        file.write('{"step": 5, "tr')  # a kill during the write
    resumed = build_metrics_logger(cfg, total_steps=4, config={}, is_driver=True, resuming=True)
    resumed.resumed(2)
    for step in (3, 4):
        resumed.log(step, {"try": 2.0})
    resumed.resumed(4)  # nothing later: nothing moves
    resumed.close()
    rows = [json.loads(row) for row in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["try"]) for r in rows] == [(0, 1), (1, 1), (2, 1), (3, 2), (4, 2)]
    dropped = (tmp_path / "metrics.dropped-after-step-2.jsonl").read_text().splitlines()
    assert [json.loads(row)["step"] for row in dropped[:2]] == [3, 4] and dropped[2] == '{"step": 5, "tr'
    assert not (tmp_path / "metrics.dropped-after-step-4.jsonl").exists()


def test_progress_line_tolerates_missing_metrics():
    line = format_progress(3, 16, {})
    assert line.startswith("step 3/16 | alpha - G_w/G_s 0/0")


def test_wandb_sink_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = LoggingConfig(run_dir=str(tmp_path / "run"), wandb=True, wandb_mode="offline")
    metrics = build_metrics_logger(cfg, total_steps=1, config={"steps": 1}, is_driver=True)
    metrics.log(1, {"reward/learner_mean": 0.5, "schedule/alpha": 1.0})
    metrics.close()
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run file, ready for `wandb sync`
    first_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert runs[0].name.endswith(f"-{first_id}")

    def run_id_after(resuming: bool) -> str:
        metrics = build_metrics_logger(cfg, total_steps=2, config={"steps": 2}, is_driver=True, resuming=resuming)
        metrics.log(2, {"reward/learner_mean": 0.75})
        metrics.close()
        return metrics.sinks[-1]._run.id

    assert run_id_after(resuming=True) == first_id  # a resumed training run continues its wandb run
    assert run_id_after(resuming=False) != first_id  # a fresh one starts another


def test_compare_runs_step_time_over_the_mixing_phase(tmp_path):
    from tools.compare_runs import comparison_table, mixing_step_time

    def write(name, rows):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    # steps 1-2 mix (G_w > 0); step 2 of each run also evaluated; step 3 is after the mixing phase
    write("s2l", [{"step": 1, "schedule/G_w": 4, "timing/step_s": 1.0, "timing/eval_s": 0.0},
                  {"step": 2, "schedule/G_w": 2, "timing/step_s": 5.0, "timing/eval_s": 3.0},
                  {"step": 3, "schedule/G_w": 0, "timing/step_s": 9.0}])
    write("grpo", [{"step": s, "timing/step_s": t, "timing/eval_s": e} for s, t, e in ((1, 2.0, 0.0),
                                                                                     (2, 6.0, 2.0), (3, 1.0, 0.0))])
    runs = {name: {r["step"]: r for r in read_metrics(tmp_path / name)} for name in ("s2l", "grpo")}
    assert mixing_step_time(runs) == {"s2l": 1.5, "grpo": 3.0}
    table = comparison_table([tmp_path / "s2l", tmp_path / "grpo"])
    assert "| 1.50 s | 0.50x |" in table and "| 3.00 s | 1.00x |" in table


def test_plots_draw_every_held_out_set_and_skip_panels_without_data(tmp_path):
    from tools.plot_run import plot_runs

    for name, extra in (("s2l", {"eval/math500/accuracy": 0.6, "eval/aime25/accuracy": 0.1}),
                        ("grpo", {"groups/unique_answer_ratio": 0.25})):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "eval/accuracy": 0.2 * s, "loss/kl": 1e-3 * s, "memory/host_peak_gib": 1.5, **extra}
                for s in (1, 2)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    written = plot_runs([tmp_path / "s2l", tmp_path / "grpo"], tmp_path / "plots")
    assert {path.name: labels for path, labels in written.items()} == {
        "accuracy.png": ["s2l held-out", "s2l aime25", "s2l math500", "grpo held-out"],
        "kl.png": ["s2l", "grpo"], "memory.png": ["s2l host", "grpo host"],
        "diversity.png": ["grpo rollout groups"]}
    assert all(path.stat().st_size > 1000 for path in written)  # real PNGs


def test_compare_runs_reports_the_final_accuracy_of_every_held_out_set(tmp_path):
    from tools.compare_runs import comparison_table

    for name, math500 in (("s2l", [0.5, 0.625]), ("grpo", [0.5, None])):
        (tmp_path / name).mkdir()
        rows = [{"step": s, "eval/accuracy": 0.1 * s, "eval/math500/accuracy": m} for s, m in zip((1, 2), math500)]
        (tmp_path / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    table = comparison_table([tmp_path / "s2l", tmp_path / "grpo"])
    assert "| run | final eval acc | final eval/math500 acc |" in table
    assert "| s2l | 0.200 | 0.625 |" in table and "| grpo | 0.200 | 0.500 |" in table  # the last value logged
    (tmp_path / "grpo" / "metrics.jsonl").write_text(json.dumps({"step": 1, "eval/accuracy": 0.3}) + "\n")
    assert "final eval/" not in comparison_table([tmp_path / "grpo"])  # eval.path only: no such table
