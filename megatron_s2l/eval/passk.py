"""Unbiased pass@k (Chen et al. 2021): the chance that at least one of k samples drawn without
replacement from n (c of them correct) is correct, averaged over problems as the paper reports."""

from __future__ import annotations

from math import comb


def pass_at_k(n: int, c: int, k: int) -> float:
    """1 - C(n - c, k) / C(n, k); exactly 1 when fewer than k samples are wrong."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)


def mean_pass_at_k(correct_counts: list[int], n: int, ks: list[int]) -> dict[int, float]:
    """pass@k for each k, averaged over problems that each had n samples."""
    if not correct_counts:
        raise ValueError("no problems to average over")
    return {k: sum(pass_at_k(n, c, k) for c in correct_counts) / len(correct_counts) for k in ks}
