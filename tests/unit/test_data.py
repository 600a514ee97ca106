"""Prompt datasets: every schema and format, templates, filters, bad rows, resumable order."""

from __future__ import annotations

import json

import pytest
from transformers import AutoTokenizer

from megatron_s2l.config import DataConfig
from megatron_s2l.data import (BadRowError, PromptDataset, gsm8k_gold, load_prompts,
                               read_rows)
from tests.utils import qwen3_tokenizer_dir, shared_dir


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(str(qwen3_tokenizer_dir()))


def _write_jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_real_datasets_load_with_gold_answers():
    gsm8k, _ = read_rows(shared_dir() / "data/gsm8k/test.jsonl")
    assert len(gsm8k) == 1319 and gsm8k[0].gold.isdigit() and "####" not in gsm8k[0].gold
    math500, _ = read_rows(shared_dir() / "data/math500/test.jsonl")
    assert len(math500) == 500
    aime, _ = read_rows(shared_dir() / "data/aime24/test.jsonl")
    assert len(aime) == 30 and all(r.gold.strip().isdigit() for r in aime)


def test_gsm8k_gold_takes_the_number_after_hashes():
    assert gsm8k_gold("Natalia sold 48/2 = 24 clips.\n#### 1,072") == "1072"
    with pytest.raises(ValueError, match="####"):
        gsm8k_gold("no marker here")


def test_dapo_verl_schema_jsonl_and_parquet(tmp_path):
    rows = [{"data_source": "math_dapo", "prompt": [{"role": "user", "content": f"What is {i}+{i}?"}],
             "reward_model": {"ground_truth": str(2 * i), "style": "rule"}} for i in range(5)]
    jsonl = _write_jsonl(tmp_path / "dapo.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "dapo.parquet")
    for path in (jsonl, tmp_path / "dapo.parquet"):
        parsed, skipped = read_rows(path)
        assert [(r.question, r.gold) for r in parsed] == [(f"What is {i}+{i}?", str(2 * i)) for i in range(5)]
        assert skipped == 0


def test_hf_datasets_directory(tmp_path):
    from datasets import Dataset

    Dataset.from_list([{"question": "1+1?", "answer": "2"}]).save_to_disk(str(tmp_path / "ds"))
    parsed, _ = read_rows(tmp_path / "ds")
    assert (parsed[0].question, parsed[0].gold) == ("1+1?", "2")


def test_bad_rows_name_file_and_line_or_are_skipped(tmp_path):
    path = _write_jsonl(tmp_path / "bad.jsonl", [{"question": "ok?", "answer": "1"}, "{not json",
                                                 {"question": "no answer"}, [1, 2]])
    with pytest.raises(BadRowError, match=r"bad.jsonl:2: not valid JSON.*data.on_bad_row=skip"):
        read_rows(path)
    rows, skipped = read_rows(path, on_bad_row="skip")
    assert len(rows) == 1 and skipped == 3
    with pytest.raises(FileNotFoundError, match="must be local files"):
        read_rows(tmp_path / "missing.jsonl")


def test_templates(tokenizer):
    from megatron_s2l.data import render

    dapo = render("What is 2+2?", "dapo", tokenizer)
    assert "What is 2+2?" in dapo and 'Answer:' in dapo and dapo.startswith("<|im_start|>user")
    assert dapo.rstrip().endswith("<|im_start|>assistant")
    assert "/no_think" in render("Q", "qwen3_nothink", tokenizer)
    assert render("Q", "plain", tokenizer) == "Q"


def test_filters_dedup_and_counts(tmp_path, tokenizer, caplog):
    rows = [{"question": "short?", "answer": "1"}, {"question": "short?", "answer": "1"},
            {"question": "long " * 200, "answer": "2"}, {"question": "other?", "answer": "3"}]
    path = _write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level("INFO", logger="megatron_s2l.data.dataset"):
        prompts = load_prompts(DataConfig(path=str(path), template="plain", max_prompt_length=50), tokenizer)
    assert [p.gold for p in prompts] == ["1", "3"]
    assert "2 prompts (1 duplicates, 1 over 50 tokens, 0 malformed rows skipped)" in caplog.text
    assert prompts[0].prompt_ids == tokenizer("short?", add_special_tokens=False)["input_ids"]
    again = load_prompts(DataConfig(path=str(path), template="plain", max_prompt_length=50), tokenizer)
    assert [p.prompt_id for p in again] == [p.prompt_id for p in prompts]  # stable ids across loads


def test_order_is_seeded_and_the_cursor_resumes(tmp_path, tokenizer):
    path = _write_jsonl(tmp_path / "rows.jsonl", [{"question": f"q{i}?", "answer": str(i)} for i in range(7)])
    prompts = load_prompts(DataConfig(path=str(path), template="plain"), tokenizer)
    straight = PromptDataset(prompts, seed=3)
    expected = [p.gold for p in straight.next_batch(5) + straight.next_batch(5) + straight.next_batch(5)]
    assert sorted(expected[:7]) == sorted(str(i) for i in range(7))  # one epoch covers every prompt once
    first = PromptDataset(prompts, seed=3)
    head = first.next_batch(5) + first.next_batch(5)
    resumed = PromptDataset(prompts, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert [p.gold for p in head + resumed.next_batch(5)] == expected
    assert [p.gold for p in PromptDataset(prompts, seed=4).next_batch(7)] != expected[:7]
    with pytest.raises(ValueError, match="same data.path"):
        PromptDataset(prompts[:3], seed=3).load_state_dict(first.state_dict())
