"""Bad input fails fast, before anything is built: `s2l train` (and `s2l eval`, `s2l pool build`) on each of a table of bad
inputs exits with code 2 and exactly one error line naming the file, the field and the fix, no traceback,
nothing written, within 3 s. Run folders hold one run each; a pool is checked against the run using it."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from safetensors.numpy import save_file

from megatron_s2l.cli import main
from megatron_s2l.config import load_config, to_yaml
from megatron_s2l.preflight import preflight_train
from megatron_s2l.pool_cli import build_from_config
from megatron_s2l.rollout.types import Generation
from tests.utils import qwen3_tokenizer_dir, run_process

QUESTIONS = [f"What is {i} + {i + 1}?" for i in range(8)]
MALFORMED = '{"question": "1+1"\n'
GSM8K_NO_GOLD = "Five apples.\n####"


def _fake_model(folder: Path, seed: int) -> Path:
    """An HF checkpoint folder as the preflight sees it: config.json, the Qwen3 tokenizer, a safetensors file
    (tiny random weights: no model is ever loaded here)."""
    folder.mkdir(parents=True)
    config = {"model_type": "qwen3", "num_attention_heads": 4, "num_key_value_heads": 2,
              "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": 151936, "max_position_embeddings": 512}
    (folder / "config.json").write_text(json.dumps(config))
    for file in qwen3_tokenizer_dir().iterdir():
        if file.is_file():
            shutil.copy2(file, folder / file.name)
    weights = np.random.default_rng(seed).standard_normal(64 * 1024).astype(np.float32)
    save_file({"w": weights}, str(folder / "model.safetensors"))
    return folder


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


class FixedEngine:
    """Answers every prompt with `length` tokens (the pool build's engine, without a model)."""

    name = "fixed"

    def __init__(self, length: int):
        self.length = length

    async def generate(self, prompts, n, params):
        size = min(self.length, params.max_new_tokens)
        return [[Generation(list(range(100, 100 + size)), [-0.5] * size, "stop", "frozen") for _ in range(n)]
                for _ in prompts]

    async def weight_version(self):
        return "frozen"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("preflight")
    w = {"root": root, "learner": _fake_model(root / "learner", 0),
         "explorer": _fake_model(root / "explorer", 1),
         "train": _jsonl(root / "train.jsonl", [{"question": q, "answer": str(2 * i + 1)}
                                                for i, q in enumerate(QUESTIONS)]),
         "other": _jsonl(root / "other.jsonl", [{"question": f"Name prime {i}.", "answer": "2"}
                                                for i in range(8)]),
         "config": root / "run.yaml"}
    w["config"].write_text(yaml.safe_dump({
        "steps": 2, "model": {"path": str(w["learner"]), "dtype": "float32"},
        "parallel": {"micro_batch_size": 4}, "data": {"path": str(w["train"]), "template": "plain",
                                                      "max_prompt_length": 64},
        "rollout": {"group_size": 4, "prompts_per_step": 4, "max_response_length": 16},
        "explorer": {"mode": "pool", "model_path": str(w["explorer"]), "pool_path": str(root / "pool"),
                     "n_per_prompt": 4, "temperature": 0.7, "top_p": 0.95},
        "schedule": {"t_mix": 2}, "reward": {"num_workers": 0}}))
    # pools built as `s2l pool build` does, from the run's config: one that fits; one at T=1.0 with
    # max_new_tokens=32 and responses of 24 tokens
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))  # every folder here has this one
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(AutoTokenizer, "from_pretrained", lambda *args, **kwargs: tokenizer)
        t1 = ["explorer.temperature=1.0", "rollout.max_response_length=32"]
        for name, length, extra in [("pool", 12, []), ("pool_t1", 24, t1)]:
            w[name] = root / name
            cfg = load_config(w["config"], [f"explorer.pool_path={w[name]}", *extra])
            build_from_config(cfg, lambda length=length: FixedEngine(length), chunk_size=4)
    # a learner whose tokenizer has one more special token (token ids would mean other text)
    w["other_tokenizer"] = root / "other_tokenizer"
    shutil.copytree(w["learner"], w["other_tokenizer"])
    spec = json.loads((w["other_tokenizer"] / "tokenizer.json").read_text())
    spec["added_tokens"].append({**spec["added_tokens"][-1], "id": 151700, "content": "<|extra|>"})
    (w["other_tokenizer"] / "tokenizer.json").write_text(json.dumps(spec))
    return w


def _cfg(world, run_dir, *overrides):
    return load_config(world["config"], [f"logging.run_dir={run_dir}", *overrides])


def _train(world, tmp_path, *overrides) -> list[str]:
    return ["train", "--config", str(world["config"]), f"logging.run_dir={tmp_path / 'run'}", *overrides]


def _damaged(world, tmp_path) -> Path:
    """A copy of the learner whose safetensors file was cut short (an interrupted download)."""
    model = tmp_path / "damaged"
    shutil.copytree(world["learner"], model)
    (model / "model.safetensors").write_bytes((model / "model.safetensors").read_bytes()[:40])
    return model


def _golds(tmp_path: Path, answers: list[str]) -> Path:
    rows = [{"question": f"q{i}", "answer": answer} for i, answer in enumerate(answers)]
    return _jsonl(tmp_path / "golds.jsonl", rows)


def _earlier_run(world, tmp_path, *overrides) -> Path:
    """A run folder as a finished run leaves it: config.yaml, metrics.jsonl and a checkpoint."""
    run = tmp_path / "run"
    (run / "checkpoints" / "step_000002").mkdir(parents=True)
    (run / "checkpoints" / "step_000002" / "trainer_state.json").write_text("{}")
    (run / "config.yaml").write_text(to_yaml(_cfg(world, run, *overrides)))
    (run / "metrics.jsonl").write_text('{"step": 1}\n{"step": 2}\n')
    (run / "train.log").write_text("a log that is not a run record\n")
    return run


def _after_a_run(world, tmp_path, *overrides) -> list[str]:
    _earlier_run(world, tmp_path)
    return _train(world, tmp_path, *overrides)


def _pool_build(world, tmp_path, *overrides, url: str = "") -> list[str]:
    return ["pool", "build", "--config", str(world["config"]), *(["--explorer-url", url] if url else []),
            f"explorer.pool_path={tmp_path / 'new_pool'}", *overrides]


def _eval(world, model) -> list[str]:
    return ["eval", "--model", str(model), "--data", str(world["train"]),
            "--out", str(world["root"] / "eval")]


# (case, argv builder (world, tmp_path) -> argv, what the error line must say; {tmp} is tmp_path)
CASES = [
    ("damaged safetensors", lambda w, t: _train(w, t, f"model.path={_damaged(w, t)}"),
     ["damaged/model.safetensors", "truncated or damaged", "download it again"]),
    ("missing model", lambda w, t: _train(w, t, "model.path=/no/such/model"),
     ["model.path=/no/such/model: no such directory", "fix the path"]),
    ("model without config.json", lambda w, t: _train(w, t, f"model.path={t}"),
     ["model.path={tmp}: no config.json", "point model.path at an HF checkpoint directory"]),
    ("yaml syntax error", lambda w, t: ["train", "--config", str(_text(t / "bad.yaml", "model: {path: x\n"))],
     ["bad.yaml:2:1: not valid YAML", "fix the syntax"]),
    ("missing config file", lambda w, t: ["train", "--config", str(t / "nope.yaml")],
     ["--config", "nope.yaml: no such file"]),
    ("misspelt key", lambda w, t: _train(w, t, "rollout.gruop_size=8"),
     ["rollout.gruop_size (did you mean rollout.group_size?)"]),
    ("wrong type", lambda w, t: _train(w, t, "steps=two"), ["steps='two' must be an integer"]),
    ("top_k 0", lambda w, t: _train(w, t, "rollout.top_k=0"), ["rollout.top_k=0 is invalid", "use -1 (off)"]),
    ("explorer top_p", lambda w, t: _train(w, t, "explorer.top_p=1.5"),
     ["explorer.top_p=1.5", "0 < top_p <= 1"]),
    ("explorer temperature 0", lambda w, t: _train(w, t, "explorer.temperature=0"),
     ["explorer.temperature=0.0", "use a temperature > 0"]),
    ("tp does not divide heads", lambda w, t: _train(w, t, "parallel.tp=3"),
     ["parallel.tp=3 does not divide the model's num_attention_heads=4", "choose parallel.tp from"]),
    ("micro-batch does not fit", lambda w, t: _train(w, t, "parallel.micro_batch_size=3"),
     ["16 sequences (rollout.prompts_per_step=4 x rollout.group_size=4)", "parallel.micro_batch_size=3",
      "parallel.micro_batch_size from [1, 2, 4, 8, 16]"]),
    ("response beyond the context", lambda w, t: _train(w, t, "rollout.max_response_length=500"),
     ["max_position_embeddings=512", "learner", "lower rollout.max_response_length to 448"]),
    ("missing dataset", lambda w, t: _train(w, t, f"data.path={t / 'gone.jsonl'}"),
     ["gone.jsonl does not exist"]),
    ("malformed row", lambda w, t: _train(w, t, f"data.path={_text(t / 'd.jsonl', MALFORMED)}"),
     ["d.jsonl:1: not valid JSON", "data.on_bad_row=skip"]),
    ("empty golds", lambda w, t: _train(w, t, f"data.path={_golds(t, ['', '7', ''])}"),
     ["golds.jsonl: 2 of 3 rows have an empty or unusable gold answer (line 1, 3)",
      "data.max_bad_gold_fraction"]),
    ("gsm8k #### with nothing after",
     lambda w, t: _train(w, t, f"data.path={_golds(t, [GSM8K_NO_GOLD, '3'])}"),
     ["golds.jsonl: 1 of 2 rows", "(line 1)", "fix their answers"]),
    ("pool from another dataset", lambda w, t: _train(w, t, f"data.path={w['other']}"),
     ["explorer.pool_path=", "lacks 8 of the prompts of data.path=", "other.jsonl (line 1, 2, 3, 4, 5, ...)",
      "s2l pool build"]),
    ("pool at another temperature", lambda w, t: _train(w, t, f"explorer.pool_path={w['pool_t1']}",
                                                        "rollout.max_response_length=32"),
     ["pool_t1 does not match this run: temperature: pool 1.0, run explorer.temperature=0.7",
      "explorer.accept_pool_mismatch=true"]),
    ("pool of another explorer", lambda w, t: _train(w, t, f"explorer.model_path={w['learner']}"),
     ["explorer model: pool", "run explorer.model_path=", "learner (weights sha256:"]),
    ("pool with longer responses", lambda w, t: _train(w, t, f"explorer.pool_path={w['pool_t1']}",
                                                       "explorer.temperature=1.0"),
     ["max_new_tokens: pool 32, run rollout.max_response_length=16"]),
    ("pool responses past the cap, accepted", lambda w, t: _train(w, t, f"explorer.pool_path={w['pool_t1']}",
                                                                    "explorer.accept_pool_mismatch=true"),
     ["responses of up to 24 tokens", "longer than rollout.max_response_length=16",
      "raise rollout.max_response_length"]),
    ("pool too small for G", lambda w, t: _train(w, t, "rollout.group_size=8"),
     ["holds 4 samples per prompt", "G_w=8", "explorer.n_per_prompt >= 8"]),
    ("pool of another tokenizer", lambda w, t: _train(w, t, f"model.path={w['other_tokenizer']}"),
     ["the pool's tokenizer", "differs from the learner's", "point explorer.pool_path at a pool built for"]),
    ("online explorer of another tokenizer",
     lambda w, t: _train(w, t, "explorer.mode=online", f"explorer.model_path={w['other_tokenizer']}"),
     ["explorer.model_path=", "other_tokenizer and model.path=", "use different tokenizers",
      "pick an explorer with the learner's tokenizer"]),
    ("no pool", lambda w, t: _train(w, t, f"explorer.pool_path={t}"),
     ["has no manifest.json", "s2l pool build"]),
    ("missing resume checkpoint", lambda w, t: _train(w, t, f"checkpoint.resume={t / 'step_000009'}"),
     ["checkpoint.resume=", "trainer_state.json missing"]),
    ("run folder of another run", _after_a_run,
     ["logging.run_dir=", "holds another run (config.yaml, metrics.jsonl, step_000002)",
      "logging.overwrite=true"]),
    ("resume with another config",
     lambda w, t: _after_a_run(w, t, "checkpoint.resume=auto", "optimizer.lr=1e-5"),
     ["resuming a run with another config (optimizer.lr: 1e-06 -> 1e-05)", "start a new logging.run_dir"]),
    ("pool build: response beyond the explorer's context",
     lambda w, t: _pool_build(w, t, "rollout.max_response_length=500"),
     ["max_position_embeddings=512", "explorer.model_path=", "lower rollout.max_response_length to 448"]),
    ("pool build: damaged explorer", lambda w, t: _pool_build(w, t, f"explorer.model_path={_damaged(w, t)}"),
     ["damaged/model.safetensors", "truncated or damaged"]),
    ("pool build: explorer server, no tokenizer", lambda w, t: _pool_build(w, t, f"explorer.model_path={t}",
                                                                           url="http://127.0.0.1:9"),
     ["explorer.model_path={tmp}: no config.json"]),
    ("pool build: malformed row", lambda w, t: _pool_build(w, t, f"data.path={_text(t / 'd.jsonl', MALFORMED)}"),
     ["d.jsonl:1: not valid JSON", "data.on_bad_row=skip"]),
    ("convert: damaged safetensors",
     lambda w, t: ["convert", "hf-to-megatron", "--hf", str(_damaged(w, t)), "--out", str(t / "megatron")],
     ["damaged/model.safetensors", "truncated or damaged"]),
    ("convert: not a megatron checkpoint",
     lambda w, t: ["convert", "megatron-to-hf", "--ckpt", str(t), "--out", str(t / "hf")],
     ["is not a megatron-s2l checkpoint", "s2l convert hf-to-megatron"]),
    ("eval: missing model", lambda w, t: _eval(w, "/missing"), ["--model=/missing: no such directory"]),
    ("eval: damaged safetensors", lambda w, t: _eval(w, _damaged(w, t)),
     ["model.safetensors", "truncated or damaged"]),
]


def _snapshot(*roots: Path) -> dict:
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns)
            for root in roots for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("case,argv,expected", CASES, ids=[c[0] for c in CASES])
def test_bad_input_fails_fast_with_one_named_error(world, tmp_path, caplog, capsys, case, argv, expected):
    args = argv(world, tmp_path)
    before = _snapshot(world["root"], tmp_path)
    caplog.set_level(logging.INFO)
    start, cpu_start = time.perf_counter(), time.process_time()
    code = main(args)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    out = capsys.readouterr()
    assert code == 2, (case, caplog.text)
    assert len(errors) == 1 and errors[0].exc_info is None, caplog.text
    message = errors[0].getMessage()
    assert "\n" not in message and "Traceback" not in out.err + out.out
    for part in expected:
        assert part.replace("{tmp}", str(tmp_path)) in message, message
    assert _snapshot(world["root"], tmp_path) == before  # nothing written, nothing deleted
    # the CPU time: a loaded CI machine stretches the wall time (under 1 s per case on an idle one)
    assert cpu_seconds <= 3.0, f"{case}: {cpu_seconds:.2f} s CPU, {seconds:.2f} s wall"


def test_the_config_and_its_pool_pass(world, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    start = time.process_time()
    preflight_train(_cfg(world, tmp_path / "run"))
    assert time.process_time() - start < 3.0 and "preflight checks passed" in caplog.text
    assert not (tmp_path / "run").exists()


def test_a_pool_at_another_temperature_is_accepted_with_the_override(world, tmp_path, caplog):
    t1 = [f"explorer.pool_path={world['pool_t1']}", "rollout.max_response_length=32"]
    preflight_train(_cfg(world, tmp_path, *t1, "explorer.accept_pool_mismatch=true"))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("temperature: pool 1.0, run explorer.temperature=0.7" in w and "accept_pool_mismatch" in w
               for w in warnings), warnings
    preflight_train(_cfg(world, tmp_path, *t1, "explorer.temperature=1.0"))  # the pool's own: no override


def test_a_pool_without_a_data_index_is_checked_by_rendering_the_prompts(world, tmp_path):
    """Pools built before data indexes existed: the exact check renders every prompt (slower, same
    verdict)."""
    pool = tmp_path / "old_pool"
    shutil.copytree(world["pool"], pool)
    (pool / "data_index.json").unlink()
    preflight_train(_cfg(world, tmp_path / "run", f"explorer.pool_path={pool}"))
    with pytest.raises(ValueError, match=r"lacks 8 of the prompts .* \(line 1, 2, 3, 4, 5, \.\.\.\)"):
        preflight_train(_cfg(world, tmp_path / "run", f"explorer.pool_path={pool}",
                             f"data.path={world['other']}"))


def test_a_few_bad_golds_are_dropped_with_a_warning(world, tmp_path, caplog):
    data = _golds(tmp_path, ["", *map(str, range(9))])  # 1 of 10
    preflight_train(_cfg(world, tmp_path / "run", f"data.path={data}", "explorer.mode=off",
                         "data.max_bad_gold_fraction=0.1"))
    assert "dropping 1 of 10 rows with an empty or unusable gold answer (line 1)" in caplog.text


def test_resume_of_the_same_run_is_allowed(world, tmp_path):
    run = _earlier_run(world, tmp_path)
    # steps, checkpoint and logging settings and the layout may change on resume
    preflight_train(_cfg(world, run, "checkpoint.resume=auto", "steps=4", "checkpoint.every_steps=1",
                         "parallel.micro_batch_size=2"))
    assert (run / "metrics.jsonl").read_text() == '{"step": 1}\n{"step": 2}\n'  # kept, to be continued


def test_overwrite_deletes_the_earlier_runs_records_only(world, tmp_path, caplog):
    run = _earlier_run(world, tmp_path, "optimizer.lr=1e-5")
    preflight_train(_cfg(world, run, "logging.overwrite=true"))
    assert sorted(p.name for p in run.rglob("*")) == ["checkpoints", "train.log"]
    assert "logging.overwrite=true: deleted the earlier run's records" in caplog.text


def test_a_resumed_run_keeps_its_folder_even_with_overwrite(world, tmp_path):
    """A resubmitted job (resume=auto) that also says overwrite must not delete its own checkpoints."""
    run = _earlier_run(world, tmp_path)
    preflight_train(_cfg(world, run, "checkpoint.resume=auto", "logging.overwrite=true"))
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "step_000002").is_dir()


def test_an_overwrite_that_fails_a_check_deletes_nothing(world, tmp_path):
    run = _earlier_run(world, tmp_path)
    with pytest.raises(ValueError, match="lacks 8 of the prompts"):
        preflight_train(_cfg(world, run, "logging.overwrite=true", f"data.path={world['other']}"))
    assert (run / "metrics.jsonl").is_file() and (run / "checkpoints" / "step_000002").is_dir()


def test_other_ranks_leave_the_driver_its_checks(world, tmp_path):
    """Rank 1 checks the model and the layout only; the run folder, data and pool are the driver's."""
    run = _earlier_run(world, tmp_path)
    preflight_train(_cfg(world, run), world_size=2, rank=1)
    with pytest.raises(ValueError, match="holds another run"):
        preflight_train(_cfg(world, run), world_size=2, rank=0)


def test_data_parallel_ranks_count_in_the_layout(world, tmp_path):
    cfg = _cfg(world, tmp_path, "parallel.micro_batch_size=16")
    preflight_train(cfg, world_size=1, rank=1)
    with pytest.raises(ValueError, match=r"data-parallel 2 x parallel.micro_batch_size=16; use "
                                         r"parallel.micro_batch_size from \[1, 2, 4, 8\] or "
                                         r"rollout.prompts_per_step a multiple of 8"):
        preflight_train(cfg, world_size=2, rank=1)


def test_group_size_one_warns(caplog):
    load_config(None, ["rollout.group_size=1", "explorer.mode=off"])
    assert "rollout.group_size=1: a group of one sample has advantage 0" in caplog.text


def test_drawn_responses_past_the_runs_cap_are_refused(world):
    from megatron_s2l.rollout.pool import ExplorerPool

    tokenizer = json.loads((world["pool_t1"] / "manifest.json").read_text())["tokenizer_hash"]
    pool = ExplorerPool.open(world["pool_t1"], tokenizer, max_response_length=16)
    prompt_id = next(iter(pool.prompt_stats()))
    with pytest.raises(ValueError, match="has 24 tokens, more than rollout.max_response_length=16"):
        pool.draw(prompt_id, 2, step=1)
    pool = ExplorerPool.open(world["pool_t1"], tokenizer, max_response_length=24)
    assert len(pool.draw(prompt_id, 2, step=1)) == 2


def test_convert_names_a_damaged_checkpoint(world, tmp_path):
    """`s2l convert hf-to-megatron` reads the HF weights through HFCheckpoint: a named error, exit code 2."""
    from megatron_s2l.model.checkpoint_io import HFCheckpoint

    with pytest.raises(ValueError, match=r"damaged/model.safetensors: its header claims \d+ bytes but the "
                                         r"file holds 40; the file is truncated or damaged"):
        HFCheckpoint(_damaged(world, tmp_path))


@pytest.mark.parametrize("command", ["train", "eval"])
def test_a_real_process_prints_one_line_and_no_traceback(world, tmp_path, command):
    """Through the console entry point: exit code 2, one ERROR line, no traceback; the time includes the
    interpreter's start and the CLI's imports."""
    damaged = _damaged(world, tmp_path)
    args = _train(world, tmp_path, f"model.path={damaged}") if command == "train" else _eval(world, damaged)
    start = time.perf_counter()
    done = run_process([sys.executable, "-m", "megatron_s2l.cli", *args], f"s2l {command}", timeout=120,
                       check=False)
    seconds = time.perf_counter() - start
    lines = [line for line in done.stdout.splitlines() if " ERROR " in line]
    assert done.returncode == 2 and "Traceback" not in done.stdout, done.stdout[-3000:]
    assert len(lines) == 1 and "damaged/model.safetensors" in lines[0] and "truncated or damaged" in lines[0]
    assert seconds < 15.0, f"{seconds:.1f} s: {done.stdout}"  # ~1.5 s on an idle 2-core machine
