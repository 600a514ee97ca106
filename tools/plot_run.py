#!/usr/bin/env python
"""Plot a run's curves from metrics.jsonl: reward per source, alpha, accuracy (every held-out set), KL,
entropy, length, learner throughput and peak memory.

    python tools/plot_run.py runs/demo/s2l [runs/demo/grpo ...] [--out DIR]

Several run directories are drawn on the same axes (e.g. S2L-PO against its GRPO baseline).
"""

from __future__ import annotations

import argparse
from fnmatch import fnmatch
from pathlib import Path
from typing import Iterator

from megatron_s2l.metrics.runs import read_metrics

PANELS = [  # (file name, title, [(metric, label suffix)]); a * in a metric stands for every matching name
    ("reward.png", "reward per source", [("reward/explorer_mean", "explorer"), ("reward/learner_mean", "learner")]),
    ("alpha.png", "explorer share alpha", [("schedule/alpha", "")]),
    ("accuracy.png", "accuracy", [("success/learner_rate", "learner samples solved"), ("eval/accuracy", "held-out"),
                                  ("eval/*/accuracy", "{}")]),
    ("kl.png", "KL to reference", [("loss/kl", "")]),
    ("entropy.png", "entropy", [("loss/entropy", "")]),
    ("diversity.png", "distinct answers per group", [("groups/unique_answer_ratio", "rollout groups"),
                                                     ("eval/unique_answer_ratio", "held-out")]),
    ("length.png", "response length", [("response/mean_length", "")]),
    ("throughput.png", "learner TFLOP/s per GPU", [("perf/tflops_per_gpu", "")]),
    ("memory.png", "peak memory per rank (GiB)", [("memory/device_peak_gib", "device"),
                                                  ("memory/host_peak_gib", "host")]),
]


def _expand(series: list[tuple[str, str]], rows: list[dict]) -> Iterator[tuple[str, str]]:
    """The panel's series for one run; `eval/*/accuracy` becomes one series per held-out set it logged."""
    names = sorted({name for row in rows for name in row})
    for metric, label in series:
        if "*" not in metric:
            yield metric, label
            continue
        for name in names:
            if fnmatch(name, metric):
                yield name, label.format(name.split("/")[1])


def plot_runs(run_dirs: list[Path], out_dir: Path) -> dict[Path, list[str]]:
    """One PNG per panel with data, all runs on the same axes; returns each file's series labels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    runs = {d.name: read_metrics(d) for d in run_dirs}
    written = {}
    for file_name, title, series in PANELS:
        fig, ax = plt.subplots(figsize=(6, 4))
        labels = []
        for run_name, rows in runs.items():
            for metric, label in _expand(series, rows):
                points = [(r["step"], r[metric]) for r in rows if r.get(metric) is not None]
                if points:
                    steps, values = zip(*points)
                    labels.append(f"{run_name} {label}".strip())
                    ax.plot(steps, values, marker="o", label=labels[-1])
        if not labels:
            plt.close(fig)
            continue
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out_dir / file_name, dpi=100)
        plt.close(fig)
        written[out_dir / file_name] = labels
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dirs", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, help="where PNGs go (default: <first run>/plots)")
    args = parser.parse_args()
    written = plot_runs(args.run_dirs, args.out or args.run_dirs[0] / "plots")
    for path in written:
        print(path)


if __name__ == "__main__":
    main()
