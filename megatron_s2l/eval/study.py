"""`s2l study`: train arms (S2L-PO, GRPO, ablations) over several seeds and report held-out pass@1 as
mean ± standard error, next to the premise the method rests on (the explorer ahead of the learner at large k).

Each training run is an `s2l train` subprocess, so a crash or a leak stays inside its run. A run is done once
its `study_run.json` exists: a killed study, started again with the same command, skips those and restarts
the others from scratch. The report (study.json, study.md, study.png) is rewritten after every run, so partial
results survive a kill; runs go seed by seed (every arm of seed 0, then of seed 1, ...) so that a partial
study still compares the arms on the same seeds. The paper reports single runs; seeds and SEs are ours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from megatron_s2l.config import ConfigError, RunConfig, load_config
from megatron_s2l.eval.runner import evaluate_prompts, load_eval_prompts, pass_ks
from megatron_s2l.metrics.runs import read_metrics
from megatron_s2l.reward import build_reward
from megatron_s2l.rollout.engines import build_engine, sampling_params
from megatron_s2l.rollout.runtime import RolloutRuntime

ARMS = {  # arm -> config overrides on top of the study's config, given its resolved number of steps
    "s2l": lambda steps: {},
    "grpo": lambda steps: {"explorer.mode": "off"},
    "constant": lambda steps: {"schedule.kind": "constant", "schedule.t_mix": steps},  # fixed alpha
    "per_source": lambda steps: {"algorithm.group_mode": "per_source"},
    "luffy": lambda steps: {"algorithm.ratio": "luffy"},
}
BASELINE = "grpo"


class StudyRunError(RuntimeError):
    """A training run of the study failed; the message names the run and its log."""


# ---------------------------------------------------------------------------------------------
# statistics


def mean(xs: list[float]) -> Optional[float]:
    """Arithmetic mean; None for no values (an arm with no finished run yet)."""
    return sum(xs) / len(xs) if xs else None


def std_err(xs: list[float]) -> Optional[float]:
    """Standard error of the mean, sample std (n - 1) / sqrt(n); None below two values (unknown)."""
    return statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) >= 2 else None


def diff_se(a: list[float], b: list[float]) -> tuple[Optional[float], Optional[float]]:
    """mean(a) - mean(b) and its SE for independent samples, sqrt(SE_a^2 + SE_b^2)."""
    if not a or not b:
        return None, None
    se_a, se_b = std_err(a), std_err(b)
    return mean(a) - mean(b), None if se_a is None or se_b is None else math.hypot(se_a, se_b)


# ---------------------------------------------------------------------------------------------
# running


def arm_overrides(arm: str, steps: int) -> list[str]:
    """The `key=value` overrides that make `arm` out of the study's config."""
    if arm not in ARMS:
        raise ValueError(f"unknown study arm {arm!r}; choose from {', '.join(ARMS)}")
    return [f"{key}={value}" for key, value in ARMS[arm](steps).items()]


def check_setup(config: str, overrides: list[str], arms: list[str]) -> RunConfig:
    """Load the config for every arm, so a bad key fails before hours of runs; returns the base config."""
    cfg = load_config(config, overrides)
    if cfg.eval.every_steps <= 0:
        raise ConfigError(f"eval.every_steps={cfg.eval.every_steps}: the study measures held-out pass@1; "
                          "set eval.every_steps >= 1 (and eval.path)")
    if cfg.checkpoint.dir:
        raise ConfigError(f"checkpoint.dir={cfg.checkpoint.dir!r} would be shared by every run of the study; "
                          "leave it empty (each run then saves under its own run directory)")
    for arm in arms:
        load_config(config, overrides + arm_overrides(arm, cfg.steps))
    return cfg


def launch_run(cmd: list[str], run_dir: Path, timeout_s: float, label: str) -> None:
    """Run one training subprocess, output appended to run_dir/train.log; StudyRunError if it fails."""
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir / "train.log"
    with log.open("a") as out:
        # its own process group, so that a timeout or Ctrl-C also ends the trainer's scoring workers
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            returncode = proc.wait(timeout=timeout_s)
        except BaseException as err:
            with contextlib.suppress(ProcessLookupError):  # it may have ended on its own meanwhile
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            if not isinstance(err, subprocess.TimeoutExpired):
                raise
            returncode = None
    if returncode != 0:
        why = f"timed out after {timeout_s:g} s" if returncode is None else f"exited with {returncode}"
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-20:])
        raise StudyRunError(f"{label} {why}; log {log}, last lines:\n{tail}")


def run_study(config: str, out: Path, arms: list[str], seeds: list[int], overrides: list[str] = (),
              premise_k: int = 64, run_timeout_s: float = 3600) -> dict:
    """The premise, then every arm x seed not done yet; the report is rewritten after each run."""
    overrides = list(overrides)
    cfg = check_setup(config, overrides, arms)
    if not (out / "premise.json").exists():
        premise = measure_premise(cfg, premise_k)
        out.mkdir(parents=True, exist_ok=True)
        (out / "premise.json").write_text(json.dumps(premise, indent=2))
    setup = {"config": str(config), "overrides": overrides, "steps": cfg.steps, "seeds": seeds}

    def report() -> dict:
        study = {**collect_results(out, arms, seeds), "setup": setup}
        write_report(out, study)
        return study

    study = None  # the report as of the last run this call made
    runs = [(arm, seed) for seed in seeds for arm in arms]
    for i, (arm, seed) in enumerate(runs, 1):
        run_dir, prefix = out / "runs" / arm / f"seed{seed}", f"[{i}/{len(runs)}] {arm} seed {seed}"
        if (run_dir / "study_run.json").exists():
            print(f"{prefix}: done earlier, skipped", flush=True)
            continue
        shutil.rmtree(run_dir, ignore_errors=True)  # an unfinished run restarts from scratch
        cmd = [sys.executable, "-m", "megatron_s2l.cli", "train", "--config", str(config), *overrides,
               *arm_overrides(arm, cfg.steps), f"seed={seed}", f"logging.run_dir={run_dir}"]
        start = time.monotonic()
        launch_run(cmd, run_dir, run_timeout_s, f"{arm} seed {seed}")
        wall_s = time.monotonic() - start
        (run_dir / "study_run.json").write_text(json.dumps({"arm": arm, "seed": seed, "wall_s": wall_s,
                                                            "returncode": 0}))
        run = summarize_run(run_dir)
        print(f"{prefix}: pass@1 {run['start_pass1']:.3f} -> {run['final_pass1']:.3f} "
              f"(best {run['best_pass1']:.3f}), {wall_s:.0f} s", flush=True)
        study = report()
    return study or report()  # every run was done earlier: report them all the same


def measure_premise(cfg: RunConfig, k: int) -> dict:
    """pass@1..k of the explorer and of the learner on the held-out set, before any training."""
    if not cfg.explorer.model_path:
        raise ConfigError("explorer.model_path is empty: the study's premise compares the explorer with the "
                          "learner; set it to the explorer's HF checkpoint")
    premise = {"k": pass_ks(k)}
    for who, path in (("explorer", cfg.explorer.model_path), ("learner", cfg.model.path)):
        summary = _evaluate_model(cfg, path, k)
        premise[f"{who}_pass_at_k"] = values = [summary[f"pass@{j}"] for j in premise["k"]]
        print(f"premise: {who} pass@1 {values[0]:.3f}, pass@{k} {values[-1]:.3f}", flush=True)
    return premise


def _evaluate_model(cfg: RunConfig, model_path: str, k: int) -> dict:
    """evaluate_prompts' summary for one model, its own tokenizer rendering the held-out prompts."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    prompts = load_eval_prompts(cfg, cfg.eval.path, tokenizer)
    engine = build_engine(model_path, name=model_path, seed=cfg.seed)
    reward, runtime = build_reward(cfg.reward), RolloutRuntime()
    try:
        return evaluate_prompts(engine, prompts, tokenizer, reward, k, sampling_params(cfg, "eval"), runtime)[1]
    finally:
        runtime.run(engine.close())
        reward.close()
        runtime.close()


# ---------------------------------------------------------------------------------------------
# reading and reporting


def summarize_run(run_dir: Path) -> dict:
    """Start (step 0), final (last step) and best (steps >= 1) held-out pass@1, tokens, wall time, curve."""
    rows = read_metrics(run_dir)
    curve = [[r["step"], r["eval/accuracy"]] for r in rows if r.get("eval/accuracy") is not None]
    if not curve or curve[0][0] != 0:
        raise ValueError(f"{run_dir}/metrics.jsonl has no step-0 eval/accuracy (the evaluation before the "
                         "first update): the trainer is too old, or eval is off")
    if rows[-1].get("eval/accuracy") is None:
        raise ValueError(f"{run_dir}: the last step ({rows[-1]['step']}) has no eval/accuracy")
    return {"start_pass1": curve[0][1], "final_pass1": rows[-1]["eval/accuracy"],
            "best_pass1": max(acc for step, acc in curve if step >= 1),
            "learner_tokens": int(rows[-1].get("rollout/learner_tokens_total", 0)),
            "explorer_tokens": int(rows[-1].get("rollout/explorer_tokens_total", 0)),
            "wall_s": float(json.loads((run_dir / "study_run.json").read_text())["wall_s"]), "curve": curve}


def collect_results(out: Path, arms: list[str], seeds: list[int]) -> dict:
    """study.json's content: per arm the finished seeds' numbers in seed order, their curves; the premise."""
    fields = ("start_pass1", "final_pass1", "best_pass1", "learner_tokens", "explorer_tokens", "wall_s")
    study = {"arms": {}, "curves": {}, "premise": json.loads((out / "premise.json").read_text())}
    for arm in arms:
        done = [s for s in seeds if (out / "runs" / arm / f"seed{s}" / "study_run.json").exists()]
        runs = [summarize_run(out / "runs" / arm / f"seed{s}") for s in done]
        study["arms"][arm] = {"seeds": done, **{f: [run[f] for run in runs] for f in fields}}
        study["curves"][arm] = [run["curve"] for run in runs]
    return study


def baseline(arms: dict) -> str:
    """The arm the others are measured against: grpo, else the first arm."""
    return BASELINE if BASELINE in arms else next(iter(arms))


def threshold(study: dict) -> Optional[float]:
    """Halfway between the baseline arm's mean start and mean final pass@1 (None before it has a run)."""
    base = study["arms"][baseline(study["arms"])]
    return (mean(base["start_pass1"]) + mean(base["final_pass1"])) / 2 if base["seeds"] else None


def steps_to_threshold(curve: list, thr: float) -> Optional[int]:
    """First evaluated step >= 1 whose pass@1 reaches thr; None if the run never did."""
    return next((step for step, acc in curve if step >= 1 and acc >= thr), None)


def regime(premise: dict) -> str:
    """The paper's regime (learner >= explorer at pass@1, explorer ahead at the largest k), a stronger
    explorer (ahead already at pass@1), or neither, where the premise of S2L-PO is not met."""
    exp, lrn = premise["explorer_pass_at_k"], premise["learner_pass_at_k"]
    if lrn[0] >= exp[0] and exp[-1] > lrn[-1]:
        return "paper's regime"
    return "explorer stronger" if exp[0] > lrn[0] else "premise not met"


WHY = {  # regime -> what it means for reading the arms
    "paper's regime": "the learner is at least as good at pass@1, the explorer covers more at large k: "
                      "what S2L-PO assumes",
    "explorer stronger": "the explorer is ahead already at pass@1, so a gain over GRPO may be distillation "
                         "from a stronger model rather than exploration",
    "premise not met": "the explorer is not ahead at large k: it reaches no problems the learner misses",
}


def _num(x: Optional[float], spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def _stat(xs: list[float], spec: str = ".3f") -> str:
    """mean ± SE, '-' for what is unknown."""
    return f"{mean(xs):{spec}} ± {_num(std_err(xs), spec.lstrip('+'))}" if xs else "-"


def _diff(a: list[float], b: list[float]) -> str:
    """Mean difference ± its SE and in units of SE, sign kept: a loss shows as one."""
    d, se = diff_se(a, b)
    if d is None:
        return "-"
    return f"{d:+.3f} ± {_num(se, '.3f')}" + (f" ({d / se:+.1f} SE)" if se else "")


def _premise_lines(premise: dict) -> list[str]:
    exp, lrn, ks = premise["explorer_pass_at_k"], premise["learner_pass_at_k"], premise["k"]
    return ["## Premise (before training)", "", "| k | explorer pass@k | learner pass@k |", "|---|---|---|",
            *(f"| {k} | {e:.3f} | {lr:.3f} |" for k, e, lr in zip(ks, exp, lrn)), "",
            f"Regime: **{regime(premise)}**: {WHY[regime(premise)]} (pass@1: explorer {exp[0]:.3f}, learner "
            f"{lrn[0]:.3f}; pass@{ks[-1]}: explorer {exp[-1]:.3f}, learner {lrn[-1]:.3f}).", ""]


def _arm_lines(study: dict, thr: Optional[float]) -> list[str]:
    lines = ["## Arms (mean ± SE over seeds)", "",
             f"Threshold: pass@1 {_num(thr, '.3f')}, halfway from {baseline(study['arms'])}'s mean start "
             "to its mean final; steps to threshold: the first evaluated step >= 1 at or above it.", "",
             "| arm | n | start pass@1 | final pass@1 | best pass@1 | gain (final − start) "
             "| steps to threshold | learner tokens | explorer tokens | wall |", "|---" * 10 + "|"]
    for name, arm in study["arms"].items():
        n = len(arm["seeds"])
        gains = [f - s for f, s in zip(arm["final_pass1"], arm["start_pass1"])]
        hits = [steps_to_threshold(c, thr) for c in study["curves"][name]] if thr is not None else []
        reached = [h for h in hits if h is not None]
        cells = [name, str(n), *(_stat(arm[key]) for key in ("start_pass1", "final_pass1", "best_pass1")),
                 _stat(gains), f"{_stat(reached, '.1f')} (reached by {len(reached)}/{n})",
                 _num(mean(arm["learner_tokens"])), _num(mean(arm["explorer_tokens"])),
                 f"{_num(mean(arm['wall_s']))} s"]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def _paired(a: list[float], b: list[float]) -> str:
    """Mean of the per-seed differences ± their SE: arms run on one seed share its prompt order and its
    evaluation samples, so pairing removes what the seed does to both."""
    return _stat([x - y for x, y in zip(a, b)], "+.3f")


def _diff_lines(arms: dict) -> list[str]:
    if BASELINE not in arms or len(arms) < 2:
        return []
    lines = [f"## Differences from {BASELINE}", "",
             "Independent samples: SE = sqrt(SE_a² + SE_b²). Paired by seed (where both arms ran the same seeds): "
             "mean ± SE of the per-seed differences.", ""]
    for name in (n for n in arms if n != BASELINE):
        paired = arms[name]["seeds"] == arms[BASELINE]["seeds"]
        cells = [f"{what} pass@1 {_diff(arms[name][key], arms[BASELINE][key])}"
                 + (f", paired {_paired(arms[name][key], arms[BASELINE][key])}" if paired else "")
                 for what, key in (("final", "final_pass1"), ("best", "best_pass1"))]
        lines.append(f"- {name} − {BASELINE}: " + "; ".join(cells))
    return lines + [""]


def render_markdown(study: dict) -> str:
    """study.md: setup, premise and its regime, per-arm table, threshold, differences from grpo, the plot."""
    setup = study.get("setup", {})
    head = ["# Study", "", f"Config `{setup.get('config', '?')}`, overrides "
                           f"`{' '.join(setup.get('overrides', []))}`, {setup.get('steps', '?')} steps, "
                           f"seeds {setup.get('seeds', '?')}.", ""]
    tail = ["![held-out pass@1 per arm and the premise](study.png)", ""]
    return "\n".join(head + _premise_lines(study["premise"]) + _arm_lines(study, threshold(study))
                     + _diff_lines(study["arms"]) + tail)


def plot_study(study: dict, path: Path) -> None:
    """Left: mean held-out pass@1 per step per arm with a ±1 SE band; right: the premise's pass@k curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, curves in study["curves"].items():
        if not curves:
            continue
        by_step = [dict((step, acc) for step, acc in c) for c in curves]
        steps = sorted(set.intersection(*(set(c) for c in by_step)))  # evaluated by every seed
        means = [mean([c[s] for c in by_step]) for s in steps]
        ses = [std_err([c[s] for c in by_step]) or 0.0 for s in steps]
        (line,) = left.plot(steps, means, marker="o", label=f"{name} (n={len(curves)})")
        left.fill_between(steps, [m - e for m, e in zip(means, ses)], [m + e for m, e in zip(means, ses)],
                          color=line.get_color(), alpha=0.2)
    left.set(title="held-out pass@1 (mean ± SE over seeds)", xlabel="step", ylabel="pass@1")
    premise = study["premise"]
    for who in ("explorer", "learner"):
        right.plot(premise["k"], premise[f"{who}_pass_at_k"], marker="o", label=who)
    right.set_xscale("log", base=2)
    right.set_xticks(premise["k"], [str(k) for k in premise["k"]])
    right.set(title=f"premise before training: {regime(premise)}", xlabel="k", ylabel="pass@k")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(out: Path, study: dict) -> None:
    """study.json (with the threshold), study.md and study.png under out."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "study.json").write_text(json.dumps({**study, "threshold": threshold(study)}, indent=2))
    (out / "study.md").write_text(render_markdown(study))
    plot_study(study, out / "study.png")


# ---------------------------------------------------------------------------------------------
# command line


def add_study_arguments(subparsers) -> None:
    st = subparsers.add_parser(
        "study", help="train arms (s2l, grpo, ablations) over several seeds; report mean ± SE",
        description="e.g. `s2l study --config examples/configs/tiny_cpu.yaml --arms s2l,grpo --seeds 5 "
                    "--out runs/study`. The same command again skips the runs already done.")
    st.add_argument("--config", required=True, help="YAML run config shared by every arm")
    st.add_argument("--arms", default="s2l,grpo", help=f"comma-separated, from {', '.join(ARMS)}")
    st.add_argument("--seeds", type=int, default=5, help="runs per arm (default 5)")
    st.add_argument("--seed-offset", type=int, default=0, help="first seed (default 0)")
    st.add_argument("--out", required=True, help="study directory (runs/, premise.json, study.json/md/png)")
    st.add_argument("--premise-k", type=int, default=64, help="samples per problem for the premise")
    st.add_argument("--run-timeout", type=float, default=3600, help="seconds one training run may take")
    st.add_argument("overrides", nargs="*", help="key.sub=value overrides of the YAML, for every arm")
    st.set_defaults(handler=run_study_command)


def run_study_command(args: argparse.Namespace) -> int:
    arms = list(dict.fromkeys(a.strip() for a in args.arms.split(",") if a.strip()))
    if not arms or args.seeds < 1 or args.premise_k < 1:
        raise ValueError("give at least one arm (--arms), --seeds >= 1 and --premise-k >= 1")
    out = Path(args.out)
    seeds = list(range(args.seed_offset, args.seed_offset + args.seeds))
    # a SIGTERM (scheduler, kill) becomes an exception, so that launch_run ends the running trainer too
    previous = signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))
    try:
        run_study(args.config, out, arms, seeds, args.overrides, args.premise_k, args.run_timeout)
    except StudyRunError as err:  # a failed run, not bad input: its log has the reason
        print(f"study stopped: {err}", file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
    print(f"done: {out / 'study.md'}, {out / 'study.json'}, {out / 'study.png'}")
    return 0
