"""examples/slurm_s2l_8b.sbatch's control flow under stand-ins for Slurm's commands (Slurm, pyxis and the
container cannot run here). The stand-ins do what Slurm's documentation says: `scancel --signal=TERM <job>`
signals every process of every step but not the batch script; preemption signals every process. Each step is
a stand-in task: a rollout node serves until stopped; a training node trains, and on SIGTERM saves for two
seconds and exits 0. What must hold: the script never ends the job while a trainer is still saving."""

from __future__ import annotations

import os
import signal
import subprocess

import pytest

from tests.utils import REPO, wait_for

SRUN = r"""#!/usr/bin/env bash
# srun + the launcher task on one node
for arg; do case $arg in --nodelist=*) node=${arg#*=} ;; ROLE=*) role=${arg#*=} ;; esac; done
echo "$$ $node $role" >> "$FAKE_SLURM/steps"
log() { echo "$node $role $*" >> "$FAKE_SLURM/events"; }
if [ "$role" = train ]; then
  trap 'kill $sleeper; log sigterm; sleep 2; log saved; exit 0' TERM
  sleep "$TRAIN_S" & sleeper=$!; wait $sleeper; log finished; exit 0
fi
trap 'kill $sleeper; log sigterm; exit 143' TERM
sleep "$ROLLOUT_S" & sleeper=$!; wait $sleeper; log died; exit 1
"""
SCANCEL = r"""#!/usr/bin/env bash
echo "$*" >> "$FAKE_SLURM/scancel"
[ "$*" = "--signal=TERM $SLURM_JOB_ID" ] || exit 1
while read -r pid node role; do kill -TERM "$pid" 2>/dev/null || true; done < "$FAKE_SLURM/steps"
"""
SCONTROL = r"""#!/usr/bin/env bash
[ "$1 $2" = "show hostnames" ] && tr , '\n' <<< "$3"
"""


# what the job's log of step events must hold when it ends: both trainers stopped, then saved
TRAINERS_SAVED = ["n1 train saved", "n1 train sigterm", "n2 train saved", "n2 train sigterm"]


def _lines(path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


@pytest.fixture
def job(tmp_path):
    """Submit the script to the stand-ins on three nodes: one rollout node and two training nodes."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("srun", SRUN), ("scancel", SCANCEL), ("scontrol", SCONTROL)):
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    started = []

    def submit(train_s: int = 600, rollout_s: int = 600) -> subprocess.Popen:
        env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_SLURM": str(tmp_path),
               "SLURM_JOB_NODELIST": "n0,n1,n2", "SLURM_JOB_ID": "42", "TRAIN_S": str(train_s),
               "ROLLOUT_S": str(rollout_s)}
        with open(tmp_path / "job.out", "w") as out:  # a file: steps left running would hold a pipe open
            batch = subprocess.Popen(["bash", "examples/slurm_s2l_8b.sbatch"], cwd=REPO, env=env, stdout=out,
                                     stderr=subprocess.STDOUT)
        started.append(batch)
        assert wait_for(lambda: len(_lines(tmp_path / "steps")) == 3, 30), (tmp_path / "job.out").read_text()
        return batch

    yield submit, tmp_path
    for batch in started:
        batch.kill()
    for line in _lines(tmp_path / "steps"):  # a real job's end kills its steps
        try:
            os.kill(int(line.split()[0]), signal.SIGKILL)
        except ProcessLookupError:
            pass


def _finish(batch: subprocess.Popen, tmp_path) -> tuple[str, list[str]]:
    batch.wait(timeout=60)
    return (tmp_path / "job.out").read_text(), _lines(tmp_path / "events")  # as the job ended


def test_the_time_limit_warning_stops_every_step_once_and_the_job_waits_for_the_trainers_to_save(job):
    submit, tmp_path = job
    batch = submit()
    assert sorted(line.split(maxsplit=1)[1] for line in _lines(tmp_path / "steps")) == [
        "n0 rollout", "n1 train", "n2 train"]
    batch.send_signal(signal.SIGUSR1)  # --signal=B:USR1@900
    out, events = _finish(batch, tmp_path)
    assert batch.returncode == 0, out
    assert _lines(tmp_path / "scancel") == ["--signal=TERM 42"]
    assert sorted(events) == ["n0 rollout sigterm", *TRAINERS_SAVED]


def test_a_rollout_node_that_dies_stops_the_trainers_with_a_checkpoint(job):
    submit, tmp_path = job
    batch = submit(rollout_s=1)
    out, events = _finish(batch, tmp_path)
    assert batch.returncode == 0 and "stopping: SIGTERM to every step" in out, out
    assert events[0] == "n0 rollout died" and sorted(events[1:]) == TRAINERS_SAVED


def test_preemption_signals_nobody_twice_and_the_job_waits_for_the_trainers(job):
    submit, tmp_path = job
    batch = submit()
    batch.send_signal(signal.SIGTERM)  # Slurm preempts: every process of the job gets a SIGTERM
    for line in _lines(tmp_path / "steps"):
        os.kill(int(line.split()[0]), signal.SIGTERM)
    out, events = _finish(batch, tmp_path)
    assert batch.returncode == 0 and not (tmp_path / "scancel").exists(), out  # each had its SIGTERM already
    assert sorted(events) == ["n0 rollout sigterm", *TRAINERS_SAVED]


def test_a_finished_training_ends_the_job_without_stopping_anything(job):
    submit, tmp_path = job
    batch = submit(train_s=1)
    out, events = _finish(batch, tmp_path)
    assert batch.returncode == 0, out
    assert sorted(events) == ["n1 train finished", "n2 train finished"]
    assert not (tmp_path / "scancel").exists()
