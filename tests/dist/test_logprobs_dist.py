"""Fused log-probs with the vocabulary split over TP=2 (torchrun + gloo) against fp64."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.unit.test_logprobs import assert_close_relative, make_case, reference
from tests.utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "logprobs_worker.py"


@pytest.mark.dist
def test_logprobs_tp2_match_fp64(tmp_path):
    case = make_case(vocab=101, padded=104, temperature=0.8)  # the padding sits in rank 1's shard
    expected = reference(case)
    torch.save({k: v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v
                for k, v in case.items()}, tmp_path / "in.pt")
    run_torchrun(WORKER, 2, [tmp_path / "in.pt", tmp_path / "out.pt"], timeout=300)
    actual = torch.load(tmp_path / "out.pt")
    for name in ("logprobs", "entropy", "grad_hidden", "grad_weight"):
        assert_close_relative(actual[name], expected[name])
