"""Stopping a launched run: a SIGTERM to the launcher alone (docker stop, kill) or to every process of the job
(Slurm's time limit and scancel signal every process of a step), or Ctrl-C, while a checkpoint is being written,
ends the real torchrun trainer with a checkpoint, and the launcher exits only after it. The rollout side is a
stand-in that answers /health; the trainer samples in-process (rollout.engine=local). A SIGTERM during the
explorer pool build stops the build and the explorer server before the launcher exits."""

from __future__ import annotations

import json
import os
import stat
import signal
import subprocess
import sys
import time

import psutil
import pytest

from tests.utils import (REPO, TINY_CONFIG, free_port, read_rows, sigint_as_from_a_terminal, subprocess_env,
                         toy_overrides)


def _processes_naming(text: str) -> list[psutil.Process]:
    """Live processes with `text` in an argument of their command line."""
    return [proc for proc in psutil.process_iter(["cmdline", "status"])
            if proc.info["status"] != psutil.STATUS_ZOMBIE and any(text in arg for arg in proc.info["cmdline"] or [])]


def _trainer_processes(run_dir) -> list[psutil.Process]:
    """torchrun and its ranks (their command lines name the run directory)."""
    return _processes_naming(f"logging.run_dir={run_dir}")


@pytest.mark.slow
@pytest.mark.dist
@pytest.mark.parametrize("target", ["launcher", "every process", "ctrl-c"])
def test_sigterm_stops_the_launched_trainer_with_a_checkpoint_before_the_launcher_exits(toy_world, tmp_path, target):
    """ctrl-c: SIGINT to every process of the job, as a terminal sends it."""
    side = tmp_path / "rollout_side"
    side.mkdir()
    (side / "health").write_text("ok")
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=side,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "run"
    env = {**subprocess_env(), "ROLE": "train", "ROLLOUT_ADDR": "127.0.0.1", "ROLLOUT_GPUS": "1",
           "REPLICA_PORT": str(port), "ROLLOUT_WAIT_MINUTES": "1", "GPUS_PER_NODE": "1", "TP": "1",
           "MICRO_BATCH_SIZE": "4", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "CONFIG": str(TINY_CONFIG), "LEARNER": toy_world["learner"], "EXPLORER": toy_world["explorer"],
           "DATA": toy_world["train"], "POOL": toy_world["pool"], "RUN_DIR": str(run_dir), "PYTHON": sys.executable,
           "SHUTDOWN_TIMEOUT_S": "300"}
    overrides = [*toy_overrides(toy_world, **{"steps": 50, "eval.every_steps": 0, "checkpoint.every_steps": 1}),
                 "rollout.engine=local", "rollout.weight_sync=memory"]
    log = tmp_path / "launcher.log"  # a file, not a pipe: an orphaned trainer would hold a pipe open
    with open(log, "w") as out_file:
        launcher = subprocess.Popen(["bash", "examples/run_s2l_8b.sh", *overrides], cwd=REPO, env=env,
                                    stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True,
                                    preexec_fn=sigint_as_from_a_terminal)
    try:
        deadline = time.monotonic() + 300
        while not (run_dir / "checkpoints" / ".tmp-step_000002").is_dir():  # stop while step 2 is being saved
            assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()
            time.sleep(0.1)
        if target == "launcher":
            launcher.send_signal(signal.SIGTERM)
        elif target == "ctrl-c":
            os.killpg(launcher.pid, signal.SIGINT)
        else:  # as Slurm does: every process, helpers of the trainer's ranks too (torchrun starts each rank in a
            # session of its own, so a signal to the launcher's process group would not reach them)
            for proc in [psutil.Process(launcher.pid), *psutil.Process(launcher.pid).children(recursive=True)]:
                proc.send_signal(signal.SIGTERM)
        launcher.wait(timeout=300)
        left = _trainer_processes(run_dir)  # the moment the launcher has exited
    finally:
        for proc in _trainer_processes(run_dir):
            proc.kill()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
        server.kill()
        server.wait()
    out = log.read_text()
    assert not left, f"the launcher exited before the trainer: {[p.info['cmdline'][:4] for p in left]}\n{out[-3000:]}"
    assert "launcher: stopping; the trainer finishes or interrupts its step" in out, out[-3000:]
    checkpoints = sorted((run_dir / "checkpoints").glob("step_*"))
    assert checkpoints, out[-5000:]
    state = json.loads((checkpoints[-1] / "trainer_state.json").read_text())
    steps = [row["step"] for row in read_rows(run_dir)]
    assert state["step"] == steps[-1] < 50 and f"latest checkpoint: {checkpoints[-1]}" in out, out[-3000:]
    # torchrun ignored the signal: its ranks stopped cleanly, so it exits 0, and so does the launcher, or after
    # Ctrl-C it ends by SIGINT (a script running it stops too); no traceback
    assert launcher.returncode == (-signal.SIGINT if target == "ctrl-c" else 0), out[-3000:]
    assert "SignalException" not in out and "Traceback" not in out, out[-3000:]


STAND_IN_SERVER = """
import http.server, pathlib, sys, time
port, seen = int(sys.argv[sys.argv.index("--port") + 1]), pathlib.Path(sys.argv[-1])
class Handler(http.server.BaseHTTPRequestHandler):
    def answer(self):
        if self.path == "/health":
            self.send_response(200); self.end_headers(); return
        seen.write_text(self.path)  # a request of the pool build: never answered
        time.sleep(3600)
    do_GET = do_POST = answer
http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler).serve_forever()
"""


@pytest.mark.slow
def test_sigterm_during_the_pool_build_stops_the_build_and_the_explorer_server(toy_world, tmp_path):
    """The launcher stops what it started and waits for it: neither the build nor the server outlives it."""
    seen = tmp_path / "pool_build_asked"
    (tmp_path / "server.py").write_text(STAND_IN_SERVER)
    fake_python = tmp_path / "sglang_python"  # `$SGLANG_PYTHON -m sglang.launch_server ... --port P ...`
    fake_python.write_text(f'#!/bin/bash\nexec {sys.executable} {tmp_path / "server.py"} "$@" {seen}\n')
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IXUSR)
    pool = tmp_path / "pool"
    env = {**subprocess_env(), "GPUS_PER_NODE": "2", "ROLLOUT_GPUS": "1", "EXPLORER_PORT": str(free_port()),
           "CONFIG": str(TINY_CONFIG), "LEARNER": toy_world["learner"], "EXPLORER": toy_world["explorer"],
           "DATA": toy_world["train"], "POOL": str(pool), "RUN_DIR": str(tmp_path / "run"),
           "PYTHON": sys.executable, "SGLANG_PYTHON": str(fake_python), "STARTUP_MINUTES": "2"}
    log = tmp_path / "launcher.log"
    with open(log, "w") as out_file:
        overrides = toy_overrides(toy_world, **{"explorer.pool_path": pool})
        launcher = subprocess.Popen(["bash", "examples/run_s2l_8b.sh", *overrides], cwd=REPO, env=env,
                                    stdout=out_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while not seen.exists():
            assert time.monotonic() < deadline and launcher.poll() is None, log.read_text()
            time.sleep(0.5)
        launcher.send_signal(signal.SIGTERM)
        launcher.wait(timeout=60)
        left = _processes_naming(str(pool)) + _processes_naming(str(seen))  # the build; the explorer server
    finally:
        for proc in _processes_naming(str(tmp_path)):
            proc.kill()
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)
    out = log.read_text()
    assert "pool build" in out and not left, f"left running: {[p.info['cmdline'][:4] for p in left]}\n{out[-3000:]}"
    assert launcher.returncode != 0  # stopped, not finished: no training started
    assert "megatron_s2l.cli train" not in out.split("pool build", 1)[1], out[-3000:]
