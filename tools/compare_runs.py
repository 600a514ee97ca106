#!/usr/bin/env python
"""Compare runs side by side from their metrics.jsonl: held-out accuracy per step, learner success,
the rollout compute each run spent, and the final accuracy on every held-out set (eval.extra). Prints
Markdown tables and writes them to comparison.md next to the first run.

    python tools/compare_runs.py runs/demo/s2l runs/demo/grpo
"""

from __future__ import annotations

import argparse
from fnmatch import fnmatch
from pathlib import Path

from megatron_s2l.metrics.runs import read_metrics


def _cell(row: dict | None, key: str, spec: str = ".3f") -> str:
    value = None if row is None else row.get(key)
    return "-" if value is None else format(value, spec)


def comparison_table(run_dirs: list[Path]) -> str:
    runs = {d.name: {r["step"]: r for r in read_metrics(d)} for d in run_dirs}
    steps = sorted({s for rows in runs.values() for s in rows})
    names = list(runs)
    lines = ["| step | " + " | ".join(f"{n} eval acc | {n} learner solved | {n} G_w/G_s" for n in names) + " |",
             "|---" * (1 + 3 * len(names)) + "|"]
    for step in steps:
        cells = []
        for name in names:
            row = runs[name].get(step)
            scheduled = row is not None and "schedule/G_w" in row  # step 0, the evaluation before RL, is not
            split = f"{int(row['schedule/G_w'])}/{int(row.get('schedule/G_s', 0))}" if scheduled else "-"
            cells += [_cell(row, "eval/accuracy"), _cell(row, "success/learner_rate"), split]
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    step_time = mixing_step_time(runs)
    baseline = next((n for n in names if not any(r.get("schedule/G_w", 0) for r in runs[n].values())), None)
    lines += ["", "| run | final eval acc | best eval acc | learner tokens | explorer tokens | rollout FLOPs "
                  "(online) vs GRPO | mixing-phase step time | vs GRPO |", "|---|---|---|---|---|---|---|---|"]
    for name in names:
        rows = [runs[name][s] for s in sorted(runs[name])]
        evals = [r["eval/accuracy"] for r in rows if r.get("eval/accuracy") is not None]
        last = rows[-1]
        saving = last.get("rollout/flops_saving_online", 0.0)
        ratio = step_time[name] / step_time[baseline] if baseline and step_time[baseline] else None
        lines.append(f"| {name} | {_cell({'v': evals[-1] if evals else None}, 'v')} | "
                     f"{_cell({'v': max(evals) if evals else None}, 'v')} | "
                     f"{int(last.get('rollout/learner_tokens_total', 0))} | "
                     f"{int(last.get('rollout/explorer_tokens_total', 0))} | {1 - saving:.2f}x | "
                     f"{_cell({'v': step_time[name]}, 'v', '.2f')} s | {_cell({'v': ratio}, 'v', '.2f')}x |")
    return "\n".join(lines + _final_accuracy_per_set(runs))


def _final_accuracy_per_set(runs: dict[str, dict[int, dict]]) -> list[str]:
    """Where runs evaluated more held-out sets than eval.path: each set's last accuracy, a row per run."""
    metrics = sorted({k for rows in runs.values() for r in rows.values() for k in r if fnmatch(k, "eval/*/accuracy")})
    if not metrics:
        return []
    metrics = ["eval/accuracy"] + metrics
    lines = ["", "| run | " + " | ".join(f"final {m.removesuffix('accuracy').strip('/') or 'eval'} acc"
                                        for m in metrics) + " |", "|---" * (1 + len(metrics)) + "|"]
    for name, rows in runs.items():
        last = [next((r[m] for _, r in sorted(rows.items(), reverse=True) if r.get(m) is not None), None)
                for m in metrics]
        lines.append(f"| {name} | " + " | ".join(_cell({"v": v}, "v") for v in last) + " |")
    return lines


def mixing_step_time(runs: dict[str, dict[int, dict]]) -> dict[str, float | None]:
    """Per run, the mean step time without evaluation over the steps where any run mixes in explorer
    samples (G_w > 0): the phase in which S2L-PO should be cheaper than GRPO (DESIGN.md §7)."""
    mixing = {s for rows in runs.values() for s, r in rows.items() if r.get("schedule/G_w", 0) > 0}
    out = {}
    for name, rows in runs.items():
        times = [r["timing/step_s"] - r.get("timing/eval_s", 0.0) for s, r in rows.items()
                 if s in mixing and "timing/step_s" in r]
        out[name] = sum(times) / len(times) if times else None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args()
    table = comparison_table(args.run_dirs)
    print(table)
    (args.run_dirs[0].parent / "comparison.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
