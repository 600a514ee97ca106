"""Process-group timeouts: waiting for the driver is not a hang, a learner collective past its timeout is."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.utils import run_torchrun

WORKER = Path(__file__).parent / "workers" / "wait_worker.py"


@pytest.mark.dist
def test_ranks_outwait_a_driver_slower_than_the_collective_timeout(tmp_path):
    run_torchrun(WORKER, 2, [tmp_path], timeout=180)
    rank1 = json.loads((tmp_path / "rank1.json").read_text())
    # 6 s inside fail_together against a 3 s collective timeout: the driver-wait group (60 s) carries it
    assert rank1["driver_wait"] == "ok"
    # the same 6 s outside it: the collective timeout applies, so this rank reports the hang
    assert rank1["collective"].startswith("failed") and "Timed out" in rank1["collective"], rank1
