"""benchmarks/bench_pool_build.py still runs against a real SGLang server and reports what
docs/BENCHMARKS.md quotes (no timing is asserted: speed is the benchmark's business)."""

from __future__ import annotations

import pytest

from tests.utils import run_benchmark


@pytest.mark.sglang
def test_bench_pool_build_reports_both_variants_and_their_ratio():
    report = run_benchmark("bench_pool_build.py", "--prompts", "8", "--samples", "2", "--chunk-size", "2",
                           "--max-new-tokens", "16", "--in-flight", "1", "3")
    one, three = report["in_flight_1"], report["in_flight_3"]
    for variant in (one, three):
        assert variant["tokens_per_s"] > 0 and 8 * 2 <= variant["response_tokens"] <= 8 * 2 * 16
        assert 1 <= variant["median_length"] <= 16
    assert report["throughput_ratio_in_flight_3"] == round(three["tokens_per_s"] / one["tokens_per_s"], 3)


@pytest.mark.sglang
def test_bench_async_reports_both_loops_side_by_side():
    report = run_benchmark("bench_async.py", "--steps", "3", "--prompts", "4", "--group-size", "4",
                           "--max-new-tokens", "16", timeout=1500)
    sync, overlapped = report["sync"], report["async"]
    for variant in (sync, overlapped):
        assert variant["step_s"] > 0 and variant["tokens_per_s"] > 0 and variant["stale_dropped"] == 0
    assert sync["hidden_fraction"] < 0.5  # the synchronous loop waits for every rollout
    assert overlapped["rollout_wait_s"] < overlapped["collect_s"]  # rollouts went on during the update
    assert report["step_time_ratio"] == round(overlapped["step_s"] / sync["step_s"], 3)
