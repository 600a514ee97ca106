"""`run_eval` with a real LocalEngine: files, pass@k consistent with the per-problem counts, CLI help."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from megatron_s2l.config import DataConfig, RewardConfig
from megatron_s2l.data import load_prompts
from megatron_s2l.eval.passk import pass_at_k
from megatron_s2l.eval.runner import pass_ks, run_eval
from megatron_s2l.reward import MathScorer, extract_answer
from megatron_s2l.rollout.local import build_local_engine
from megatron_s2l.rollout.runtime import RolloutRuntime
from megatron_s2l.rollout.types import SamplingParams
from tests.utils import make_tiny_model, shared_dir


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("eval_model"), num_hidden_layers=1, seed=11)


def test_run_eval_writes_consistent_results(model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    prompts = load_prompts(DataConfig(path=str(shared_dir() / "data/aime24/test.jsonl"), template="qwen3_nothink",
                                      max_prompt_length=4096), tokenizer)[:3]
    engine = build_local_engine(model_dir, seed=0)
    runtime, reward = RolloutRuntime(), MathScorer(RewardConfig(num_workers=0))
    params = SamplingParams(max_new_tokens=8, temperature=0.7, top_p=0.8, top_k=20, presence_penalty=1.5, seed=1)
    try:
        summary = run_eval(engine, prompts, tokenizer, reward, 4, tmp_path, "aime24", params, runtime)
    finally:
        runtime.close()
    records = [json.loads(line) for line in (tmp_path / "aime24.jsonl").read_text().splitlines()]
    assert len(records) == 3 and summary == {k: v for k, v in
                                             json.loads((tmp_path / "aime24.summary.json").read_text()).items()
                                             if k != "benchmark"}
    assert pass_ks(4) == [1, 2, 4] and pass_ks(16) == [1, 2, 4, 8, 16] and pass_ks(6) == [1, 2, 4, 6]
    for record in records:
        assert len(record["answers"]) == 4 and record["n"] == 4
        assert record["pass@2"] == pass_at_k(4, record["correct"], 2)
    assert summary["pass@1"] == sum(r["correct"] for r in records) / 12
    assert sum(summary["finish_reasons"].values()) == 12
    assert 0.0 <= summary["unique_answer_ratio"] <= 1.0


def test_save_responses_writes_the_prompts_and_response_texts(model_dir, tmp_path):
    """`s2l eval --save-responses`: what the model wrote, so that an `answers: [null]` can be read."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    data = DataConfig(path=str(shared_dir() / "data/gsm8k/test.jsonl"), template="qwen3_nothink",
                      max_prompt_length=4096)
    prompts = load_prompts(data, tokenizer)[:2]
    engine = build_local_engine(model_dir, seed=0)
    runtime, reward = RolloutRuntime(), MathScorer(RewardConfig(num_workers=0))
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=1)
    try:
        run_eval(engine, prompts, tokenizer, reward, 3, tmp_path / "plain", "gsm8k", params, runtime)
        run_eval(engine, prompts, tokenizer, reward, 3, tmp_path / "texts", "gsm8k", params, runtime,
                 save_responses=True)
    finally:
        runtime.close()
    plain, texts = ([json.loads(line) for line in (tmp_path / name / "gsm8k.jsonl").read_text().splitlines()]
                    for name in ("plain", "texts"))
    assert "responses" not in plain[0] and "prompt" not in plain[0]  # the default file stays small
    for prompt, record in zip(prompts, texts):
        assert record["prompt"] == prompt.text
        assert len(record["responses"]) == 3 and all(isinstance(text, str) for text in record["responses"])
        assert any(record["responses"])
        assert record["answers"] == [extract_answer(text) for text in record["responses"]]


def test_cli_subcommands_show_help(capsys):
    from megatron_s2l.cli import build_parser

    parser = build_parser()
    for command in (["train"], ["pool", "build"], ["pool", "inspect"], ["eval"], ["convert", "hf-to-megatron"],
                    ["convert", "megatron-to-hf"], ["convert", "gguf-to-hf"]):
        with pytest.raises(SystemExit) as exit_info:
            parser.parse_args([*command, "--help"])
        assert exit_info.value.code == 0
        assert "usage: s2l" in capsys.readouterr().out


def test_every_lazy_import_of_the_cli_resolves():
    """Subcommands import their modules only when run, so a missing one shows only then (`s2l demo` named a
    module that never existed): import every `from megatron_s2l... import name` the package defers."""
    import ast
    import importlib
    from pathlib import Path

    import megatron_s2l

    package = Path(megatron_s2l.__file__).parent
    checked = 0
    for path in package.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.col_offset > 0 and (node.module or "").startswith(
                    "megatron_s2l"):  # indented: inside a function
                try:
                    module = importlib.import_module(node.module)
                except ImportError as error:
                    pytest.fail(f"{path.relative_to(package)}:{node.lineno}: {error}")
                for alias in node.names:
                    assert hasattr(module, alias.name) or importlib.util.find_spec(
                        f"{node.module}.{alias.name}"), f"{path.name}: from {node.module} import {alias.name}"
                checked += 1
    assert checked > 10
