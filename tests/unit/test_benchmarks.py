"""The benchmark scripts still run (tiny shapes on CPU) and print the JSON that docs/BENCHMARKS.md quotes,
so a GPU session spends its minutes measuring, not debugging. No timing is asserted here."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.utils import REPO, run_benchmark


def test_bench_logprobs_reports_both_variants_and_ratios():
    report = run_benchmark("bench_logprobs.py", "--device", "cpu", "--tokens", "256", "--hidden", "64",
                           "--vocab", "4096", "--tp", "2", "--chunk-size", "64", "--repeats", "1",
                           "--threads", "1")
    assert report["shape"]["vocab_per_rank"] == 2048
    for variant in ("materialized", "fused"):
        assert report[variant]["seconds"] > 0 and report[variant]["peak_bytes"] >= 1
    assert report["peak_memory_ratio_vs_materialized"] > 0 and report["time_ratio_vs_materialized"] > 0


def test_bench_grpo_update_runs_the_learner_update_with_and_without_length_grouping():
    report = run_benchmark("bench_grpo_update.py", "--shape", "tiny", "--repeats", "1", "--lengths",
                           "longtail", "--micro-batch-tokens", "128")
    assert report["shape"] == "tiny" and report["sequences"] * report["seq_len"] == 8 * 64
    grouped, batch_order = report["bf16"], report["bf16_batch_order"]
    assert grouped["length_grouping"] and not batch_order["length_grouping"]
    assert grouped["tokens_per_s"] > 0 and grouped["mfu"] is None  # no MFU without a GPU peak
    assert report["length_grouping_speedup"] == round(batch_order["seconds"] / grouped["seconds"], 3)
    budget = report["bf16_token_budget"]
    assert budget["micro_batch_tokens"] == 128 and budget["micro_batches"] != grouped["micro_batches"]
    assert report["token_budget_speedup"] == round(grouped["seconds"] / budget["seconds"], 3)
    assert report["fp8"].startswith("skipped")  # FP8 needs Transformer Engine on CUDA


def test_bench_activation_memory_keeps_the_loss_and_saves_fewer_activations():
    report = run_benchmark("bench_activation_memory.py", "--tp", "2", "--sequences", "2", "--seq-len", "64")
    off, on, recompute = report["sp_off"], report["sp_on"], report["sp_on_recompute"]
    assert on["loss"] == pytest.approx(off["loss"], rel=1e-5) == recompute["loss"]
    assert on["saved_activation_bytes"] > 4 * recompute["saved_activation_bytes"]  # only layer inputs kept
    # Sequence parallelism shards what plain TP keeps whole on every rank (Korthikanti et al. 2022): at least
    # each layer's two norm inputs and the two TP linears' inputs they feed, [tokens, hidden] in fp32 on CPU.
    # The TP-split tensors stay as they are, so the saving is a factor below TP.
    tp, layers = report["tp"], report["shape"]["num_hidden_layers"]
    residual_bytes = report["sequences"] * report["seq_len"] * report["shape"]["hidden_size"] * 4
    saved = off["saved_activation_bytes"] - on["saved_activation_bytes"]
    assert saved >= 4 * layers * residual_bytes * (1 - 1 / tp)
    ratio = off["saved_activation_bytes"] / on["saved_activation_bytes"]
    assert 1 < ratio < tp
    assert report["sequence_parallel_memory_ratio"] == pytest.approx(ratio, abs=1e-3)


def test_gpu_suite_refuses_to_run_without_cuda(tmp_path):
    done = subprocess.run(["bash", "benchmarks/run_gpu_suite.sh", str(tmp_path / "out")], cwd=REPO,
                          timeout=120, capture_output=True, text=True,
                          env={"PATH": "/usr/bin:/bin", "PYTHON": sys.executable})
    assert done.returncode == 1 and "no CUDA device" in done.stderr
    assert not (tmp_path / "out" / "gpu_tests.xml").exists()


def test_a_measurement_process_that_dies_is_reported_at_once(monkeypatch):
    """An out-of-memory kill must not cost a GPU session the whole hour the result would be waited for."""
    import importlib
    import os
    import time

    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))  # as when a benchmark script runs
    common = importlib.import_module("common")
    start = time.monotonic()
    with pytest.raises(RuntimeError, match="exit code 3"):
        common.in_fresh_process(os._exit, 3, timeout_s=600)
    assert time.monotonic() - start < 60
    assert common.in_fresh_process(divmod, 7, 2) == (3, 1)
