"""Checkpoints you can trust: a damaged checkpoint is found by its manifest (sizes and CRC-32s), `resume=auto`
falls back to the newest one that verifies and an explicit resume names the damage; a full disk or an
unwritable directory during a save is a named error that removes the partial save and keeps the last one."""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import zlib
from pathlib import Path

import pytest

from megatron_s2l.config import CheckpointConfig
from megatron_s2l.model import specs
from megatron_s2l.train.checkpoint import Checkpointer, CheckpointError
from megatron_s2l.train.learner import build_learner
from megatron_s2l.train.manifest import MANIFEST_FILE
from tests.learner_fixtures import fixed_batch, learner_config
from tests.utils import make_tiny_model


@pytest.fixture(scope="module")
def saved(mcore_world1, tmp_path_factory):
    """A learner and its checkpoints of steps 1 and 2 (both with Adam state), in a small model."""
    root = tmp_path_factory.mktemp("integrity")
    hf_dir = make_tiny_model(root / "model", num_hidden_layers=1, vocab_size=1024, seed=3)
    learner = build_learner(learner_config(**{"algorithm.kl_coef": 0.0}), str(hf_dir))  # no reference model
    checkpointer = Checkpointer(CheckpointConfig(keep_last=3), root / "checkpoints",
                                specs.load_hf_config(hf_dir), hf_dir)
    for step in (1, 2):
        plan = learner.plan(fixed_batch(seed=step))
        learner.compute_logprobs(plan)
        learner.train_step(plan)
        checkpointer.save(step, learner, {"cursor": step})
    return learner, checkpointer


def _copy(checkpointer: Checkpointer, to: Path, resume: str = "auto") -> Checkpointer:
    """The checkpoints as hard links (instant); `_own` a file before changing it."""
    shutil.copytree(checkpointer.directory, to, copy_function=os.link)
    return Checkpointer(CheckpointConfig(resume=resume, keep_last=3), to, checkpointer.hf_config,
                        checkpointer.hf_dir)


def _own(path: Path) -> bytes:
    data = path.read_bytes()
    path.unlink()
    path.write_bytes(data)
    return data


def _truncate(path: Path) -> None:
    path.write_bytes(_own(path)[: path.stat().st_size // 2])


def _zero_4kib(path: Path) -> None:
    data = bytearray(_own(path))
    middle = len(data) // 2
    data[middle: middle + 4096] = bytes(4096)
    path.write_bytes(bytes(data))


# damage -> (file, what it does to it, what the error says)
DAMAGE = {
    "truncated model shard": ("model/__0_0.distcp", _truncate, "model/__0_0.distcp is truncated"),
    "4 KiB zeroed in an optimizer shard": ("optimizer/__0_1.distcp", _zero_4kib,
                                           "optimizer/__0_1.distcp has changed since the save"),
    "truncated trainer state": ("trainer_state.json", _truncate, "trainer_state.json is truncated"),
    "missing trainer state": ("trainer_state.json", Path.unlink, "trainer_state.json is missing"),
    "missing .metadata": ("optimizer/.metadata", Path.unlink, "optimizer/.metadata is missing"),
    "truncated manifest": (MANIFEST_FILE, _truncate, "manifest.json is unreadable (JSONDecodeError"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_resume_auto_falls_back_past_a_damaged_checkpoint_and_an_explicit_resume_names_it(saved, tmp_path,
                                                                                           caplog, damage):
    file, harm, says = DAMAGE[damage]
    copy = _copy(saved[1], tmp_path / "checkpoints")
    latest, fallback = copy.directory / "step_000002", copy.directory / "step_000001"
    harm(latest / file)
    with caplog.at_level(logging.INFO):
        assert copy.resume_path() == fallback
    assert f"skipping {latest}: {says}" in caplog.text
    assert f"resuming from {fallback}, the newest checkpoint that verifies" in caplog.text
    named = re.escape(f"checkpoint.resume={latest}: damaged checkpoint: {says}")
    with pytest.raises(CheckpointError, match=named):
        _copy(saved[1], tmp_path / "again", resume=str(latest)).resume_path()


def test_a_checkpoint_without_a_manifest_counts_when_complete(saved, tmp_path, caplog):
    """Checkpoints saved before manifests: complete (state and metadata files there) is enough, and warned."""
    copy = _copy(saved[1], tmp_path / "checkpoints")
    latest = copy.directory / "step_000002"
    (latest / MANIFEST_FILE).unlink()
    assert copy.resume_path() == latest
    assert f"{latest} has no manifest.json" in caplog.text
    (latest / "optimizer" / ".metadata").unlink()
    again = Checkpointer(CheckpointConfig(resume="auto"), copy.directory, copy.hf_config, copy.hf_dir)
    assert again.resume_path() == copy.directory / "step_000001"
    assert f"skipping {latest}: optimizer/.metadata is missing" in caplog.text


def test_no_checkpoint_that_verifies_is_an_error(saved, tmp_path):
    copy = _copy(saved[1], tmp_path / "checkpoints")
    for step in (1, 2):
        (copy.directory / f"step_00000{step}" / "model" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match="no checkpoint in .* verifies .*step_000001: model/.metadata"):
        copy.resume_path()


def _fail_a_shard_write(monkeypatch, error: Exception) -> None:
    """megatron-core writes the shards in forked processes, which inherit this patch."""
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    def write_item(*args, **kwargs):
        raise error

    monkeypatch.setattr(filesystem_async, "_write_item", write_item)


def _no_space_says_nothing(monkeypatch, tmp_path):
    """What a full disk really gives: torch's zip writer complains, no errno; and the disk has no room."""
    _fail_a_shard_write(monkeypatch, RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos"))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=4096))


def _read_only(monkeypatch, tmp_path):
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if ".tmp-step" in str(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)


WRITE_FAILURES = {
    "ENOSPC in a shard": (
        lambda mp, tmp: _fail_a_shard_write(mp, OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))),
        (r"does not fit in .*: no space left on the device \(.* free, a checkpoint takes about "
         r"\d+\.\d MB; the writer said: .*No space left on device\)\. .* Free space there, lower "
         r"checkpoint.keep_last, or set checkpoint.dir")),
    "full disk, no errno": (
        _no_space_says_nothing,
        r"no space left on the device \(0.0 MB free, .*the writer said: Worker failure: \[enforce fail"),
    "read-only directory": (
        _read_only,
        (r"cannot write checkpoint step 3: .*\.tmp-step_000003/model: Read-only file system. Make .* "
         r"writable or set checkpoint.dir")),
}


@pytest.mark.parametrize("failure", WRITE_FAILURES)
def test_a_save_that_cannot_write_is_a_named_error_and_keeps_the_last_checkpoint(saved, tmp_path, monkeypatch,
                                                                                 failure):
    learner, original = saved
    copy = _copy(original, tmp_path / "checkpoints")
    before = {path: path.stat().st_mtime_ns for path in copy.directory.rglob("*")}
    make_it_fail, says = WRITE_FAILURES[failure]
    make_it_fail(monkeypatch, tmp_path)
    with pytest.raises(CheckpointError, match=says) as error:
        copy.save(3, learner, {})
    monkeypatch.undo()
    assert f"the last checkpoint, {copy.directory / 'step_000002'}, is untouched" in str(error.value)
    assert "\n" not in str(error.value)  # one line from the CLI
    assert sorted(p.name for p in copy.directory.iterdir()) == ["step_000001", "step_000002"]  # no partial
    assert {path: path.stat().st_mtime_ns for path in copy.directory.rglob("*")} == before
    again = Checkpointer(CheckpointConfig(resume="auto"), copy.directory, copy.hf_config, copy.hf_dir)
    assert again.resume_path() == copy.directory / "step_000002"  # verifies


def test_the_manifest_lists_every_file_of_a_save_with_its_size_and_crc32(saved):
    latest = saved[1].directory / "step_000002"
    listed = json.loads((latest / MANIFEST_FILE).read_text())["files"]
    on_disk = {p.relative_to(latest).as_posix(): p for p in latest.rglob("*") if p.is_file()}
    assert set(listed) == set(on_disk) - {MANIFEST_FILE}
    assert {"trainer_state.json", "optimizer/__0_0.distcp", "model/.metadata", "s2l_model.json"} <= set(listed)
    for name, entry in listed.items():
        data = on_disk[name].read_bytes()
        assert entry == {"bytes": len(data), "crc32": f"{zlib.crc32(data):08x}"}, name
