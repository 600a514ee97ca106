"""Reading prompt rows (question + gold answer) from local JSONL, Parquet or HF `datasets` directories.

Schemas, recognised per row:
  plain        {"question": ..., "answer": ...}          (MATH-500, AIME; "problem" is accepted too)
  gsm8k        {"question": ..., "answer": "... #### N"}  (gold = the number after ####)
  dapo / verl  {"prompt": [{"role": "user", "content": ...}], "reward_model": {"ground_truth": ...}}
A malformed row stops the load with its file and line (`on_bad_row=error`) or is skipped and counted.
A row whose gold answer is empty (or a list/mapping, not a value) parses, with gold "": `drop_bad_golds`
drops such rows up to data.max_bad_gold_fraction of a file and refuses the file above it.
Nothing is downloaded: paths must exist locally.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
from pathlib import Path
from typing import Any, Iterator

logger = logging.getLogger(__name__)

_GSM8K_ANSWER = re.compile(r"####[ \t]*([^\n]*)")


@dataclasses.dataclass
class RawRow:
    question: str
    gold: str
    where: str  # "file:line" for messages


class BadRowError(ValueError):
    """A dataset row that cannot be used; the message names the file, the line and the fix."""


def _rows_from_jsonl(path: Path) -> Iterator[tuple[str, Any]]:
    with path.open() as file:
        for number, line in enumerate(file, start=1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as err:
                yield where, BadRowError(f"{where}: not valid JSON ({err.msg})")


def _rows_from_table(path: Path) -> Iterator[tuple[str, Any]]:
    if path.is_dir():
        from datasets import load_from_disk

        dataset = load_from_disk(str(path))
        if hasattr(dataset, "keys"):  # a DatasetDict: take its "train" split
            dataset = dataset["train"] if "train" in dataset else dataset[next(iter(dataset.keys()))]
        rows = iter(dataset)
    else:
        import pyarrow.parquet as pq

        rows = iter(pq.read_table(path).to_pylist())
    for number, row in enumerate(rows, start=1):
        yield f"{path}:row {number}", row


def gsm8k_gold(solution: str) -> str:
    """GSM8K's gold answer: the number after `####` in the worked solution."""
    match = _GSM8K_ANSWER.search(solution)
    if match is None:
        raise ValueError(f"GSM8K answer without '#### N': {solution[-80:]!r}")
    return match.group(1).strip().replace(",", "")


def parse_row(row: Any, where: str) -> RawRow:
    """One row in any supported schema -> (question, gold); BadRowError names what is missing."""
    if isinstance(row, Exception):
        raise row
    if not isinstance(row, dict):
        raise BadRowError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "prompt" in row and "reward_model" in row:  # DAPO / verl
        messages = row["prompt"]
        if isinstance(messages, str):
            question = messages
        elif isinstance(messages, list) and messages and all(isinstance(m, dict) for m in messages):
            question = next((m.get("content") for m in reversed(messages) if m.get("role") == "user"), None)
        else:
            question = None
        gold = (row.get("reward_model") or {}).get("ground_truth")
        if not isinstance(question, str) or gold is None:
            raise BadRowError(f"{where}: a DAPO/verl row needs prompt=[{{role: user, content: ...}}] and "
                              "reward_model.ground_truth")
        return RawRow(question, _gold_text(gold), where)
    question = row.get("question", row.get("problem"))
    answer = row.get("answer", row.get("solution"))
    if not isinstance(question, str) or not question.strip() or answer is None:
        raise BadRowError(f"{where}: expected 'question' and 'answer' (or DAPO 'prompt' + "
                          f"'reward_model.ground_truth'); found keys {sorted(row)}")
    answer = _gold_text(answer)
    if "####" in answer:  # GSM8K's worked solution
        answer = gsm8k_gold(answer)
    return RawRow(question, answer, where)


def _gold_text(value: Any) -> str:
    """A gold answer as text; "" when it is empty or not a single value (such a row can never be solved)."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        return ""
    return str(value).strip()


def drop_bad_golds(rows: list[RawRow], path: str | Path, max_fraction: float) -> list[RawRow]:
    """The rows with a usable gold answer. Rows without one are dropped (and counted) while they are at most
    `max_fraction` of the file; above that the file is refused, naming the first of them."""
    bad = [row for row in rows if not row.gold]
    if not bad:
        return rows
    lines = ", ".join(row.where.removeprefix(f"{path}:") for row in bad[:5])
    lines += ", ..." if len(bad) > 5 else ""
    if len(bad) > max_fraction * len(rows):
        raise BadRowError(f"{path}: {len(bad)} of {len(rows)} rows have an empty or unusable gold answer "
                          f"(line {lines}), more than data.max_bad_gold_fraction={max_fraction:g}; such rows "
                          "can never be solved: fix their answers, or raise data.max_bad_gold_fraction to "
                          "drop them")
    logger.warning("%s: dropping %d of %d rows with an empty or unusable gold answer (line %s)", path,
                   len(bad), len(rows), lines)
    return [row for row in rows if row.gold]


def question_key(question: str) -> str:
    """A short content key of a question: the explorer pool records the keys of the rows it was built from,
    so a run can check that the pool covers its dataset without rendering any prompt."""
    return hashlib.sha1(question.encode()).hexdigest()[:16]


def read_rows(path: str | Path, on_bad_row: str = "error") -> tuple[list[RawRow], int]:
    """All usable rows of a file or dataset directory, and how many malformed rows were skipped."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"data path {path} does not exist (datasets must be local files: .jsonl, "
                                ".parquet or a directory saved with datasets.save_to_disk)")
    if path.suffix == ".jsonl" or path.suffix == ".json":
        source = _rows_from_jsonl(path)
    elif path.suffix == ".parquet" or path.is_dir():
        source = _rows_from_table(path)
    else:
        raise ValueError(f"{path}: unknown dataset format {path.suffix!r}; use .jsonl, .parquet or a "
                         "datasets directory")
    rows, skipped = [], 0
    for where, row in source:
        try:
            rows.append(parse_row(row, where))
        except BadRowError as err:
            if on_bad_row == "error":
                raise BadRowError(f"{err} (set data.on_bad_row=skip to skip and count such rows)") from None
            skipped += 1
            logger.warning("skipping %s", err)
    return rows, skipped
