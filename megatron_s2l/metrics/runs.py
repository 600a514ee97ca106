"""Reading a finished (or running) run back: the rows of its metrics.jsonl, one per step."""

from __future__ import annotations

import json
from pathlib import Path


def read_metrics(run_dir: str | Path) -> list[dict]:
    """Rows of <run_dir>/metrics.jsonl by step; a resumed run's repeated steps keep the last row."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {run_dir} a run directory (logging.run_dir)?")
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    latest = {row["step"]: row for row in rows}
    return [latest[s] for s in sorted(latest)]
