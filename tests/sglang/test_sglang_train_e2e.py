"""`s2l train` against real SGLang servers on CPU: the learner replica is updated every step through
the distributed (gloo) path and serves the new version; the online explorer is never touched."""

from __future__ import annotations

import json
import sys

import httpx
import pyarrow.parquet as pq
import pytest

from megatron_s2l.rollout import sglang_launch
from tests.utils import TINY_CONFIG, read_rows, run_process, run_s2l, toy_overrides

pytestmark = pytest.mark.sglang


def _version(server) -> str:
    return httpx.get(server.url + "/model_info", timeout=10).json()["weight_version"]


def test_s2l_po_with_sglang_learner_replica_and_online_explorer(toy_world, tmp_path):
    launch = dict(dtype="float32", log_dir=tmp_path, startup_timeout_s=300, max_lifetime_s=1800)
    replica, explorer = (sglang_launch.launch_server(toy_world[name], **launch, wait=False)
                         for name in ("learner", "explorer"))
    with replica, explorer:
        sglang_launch.wait_ready(replica, explorer)
        explorer_version = _version(explorer)
        overrides = toy_overrides(toy_world, **{
            "rollout.engine": "sglang", "rollout.learner_url": replica.url, "rollout.weight_sync": "distributed",
            "explorer.mode": "online", "explorer.url": explorer.url, "steps": 3, "schedule.t_mix": 2,
            "eval.every_steps": 0})
        run_s2l(["train", "--config", str(TINY_CONFIG), *overrides, f"logging.run_dir={tmp_path / 'run'}"],
                timeout=900)
        assert _version(replica) == "3"  # synced after every step, the last one is served
        assert _version(explorer) == explorer_version  # the explorer is frozen
        # the same server builds an offline pool (what examples/lib/launch.sh does at scale), chunks of 8
        # prompts, 4 of them in flight (the default from a server)
        pool = tmp_path / "sglang_pool"
        run_s2l(["pool", "build", "--config", str(TINY_CONFIG), "--explorer-url", explorer.url, "--chunk-size", "8",
                 *toy_overrides(toy_world, **{"explorer.pool_path": pool, "explorer.n_per_prompt": 3})], timeout=900)
    manifest = json.loads((pool / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["n_per_prompt"] == 3 and manifest["num_prompts"] >= 40
    chunks = sorted(pool.glob("chunks/chunk-*.parquet"))
    assert len(chunks) == manifest["num_chunks"] >= 5
    pool_rows = [row for chunk in chunks for row in pq.read_table(chunk).to_pylist()]
    assert len(pool_rows) == 3 * manifest["num_prompts"]  # every prompt once, whichever chunk finished first
    assert len({row["prompt_id"] for row in pool_rows}) == manifest["num_prompts"]
    # the pool came from the explorer server: the client that `--explorer-url` builds is named "explorer" (an
    # in-process LocalEngine would be "local:explorer"), and every sample carries the server's weight version
    # (SGLang's "default"; a LocalEngine's would be "0")
    assert manifest["engine"] == "explorer"
    assert manifest["explorer_weight_version"] == explorer_version == "default"
    assert {row["weight_version"] for row in pool_rows} == {explorer_version}
    rows = read_rows(tmp_path / "run")
    assert [(r["schedule/G_w"], r["schedule/G_s"]) for r in rows] == [(4, 0), (0, 4), (0, 4)]
    # the learner samples of step k come from the weights synced after step k - 1
    assert [r.get("rollout/learner_weight_version") for r in rows[1:]] == [1.0, 2.0]
    assert all(r["sync/gigabytes"] > 0 for r in rows)


def test_one_sglang_step_reads_through_twelve_files(toy_world, tmp_path):
    """tools/trace_step.py on the paper's production shape: explorer samples from the offline pool, learner
    samples from an SGLang replica synced over the distributed path. Every file the step enters is on the
    reading path or a named helper, and the path holds 12 files in Algorithm 1's order."""
    with sglang_launch.launch_server(toy_world["learner"], dtype="float32", log_dir=tmp_path, startup_timeout_s=300,
                                     max_lifetime_s=1800) as replica:
        overrides = toy_overrides(toy_world, **{
            "rollout.engine": "sglang", "rollout.learner_url": replica.url, "rollout.weight_sync": "distributed",
            "steps": 3, "schedule.t_mix": 3, "eval.every_steps": 0})
        result = run_process([sys.executable, "tools/trace_step.py", "--step", "2", "--json", "--", "train",
                              "--config", str(TINY_CONFIG), *overrides, f"logging.run_dir={tmp_path / 'run'}"],
                             "trace_step.py", timeout=900)
    traced = json.loads(result.stdout.strip().splitlines()[-1])
    assert traced["unclassified"] == [], traced["unclassified"]
    assert traced["reading_path"] == ["train/trainer.py", "rollout/collector.py", "rollout/schedule.py",
                                      "rollout/pool.py", "rollout/sampling.py", "reward/scorer.py", "rollout/sglang.py",
                                      "algo/advantages.py", "train/batch.py", "train/learner.py", "algo/loss.py",
                                      "train/weight_sync.py"], traced["reading_path"]
    # the SGLang transport is entered (the helpers behind the engine), and no in-process engine is
    assert {"rollout/sglang_client.py", "rollout/weight_broadcast.py"} <= set(traced["helpers"])
    assert "rollout/local.py" not in traced["files"]
