"""Where metrics go: a progress line on the console, metrics.jsonl always, wandb and TensorBoard when
enabled. Metrics are one flat dict per step with slash names (`reward/explorer_mean`, `timing/train_s`).
Only the driver rank logs; other ranks get a `NullLogger`, so call sites never branch on rank.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import time
from pathlib import Path
from typing import Protocol

from megatron_s2l.config import LoggingConfig

logger = logging.getLogger(__name__)


class MetricSink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


class JsonlSink:
    """Appends one JSON object per step; resumed runs keep appending to the same file, one row per step."""

    def __init__(self, path: Path):
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = path.open("a")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._file.write(json.dumps({"step": step, "time": time.time(), **metrics}, default=float) + "\n")
        self._file.flush()

    def resumed(self, step: int) -> None:
        """The run goes on from checkpoint `step`: rows of later steps are from an attempt that stopped before
        saving them, and those steps run again. Move the rows to metrics.dropped-after-step-<step>.jsonl."""
        rows = self.path.read_text().splitlines(keepends=True)
        later = [row for row in rows if _step_of(row) > step]
        if not later:
            return
        dropped = self.path.with_name(f"metrics.dropped-after-step-{step}.jsonl")
        with dropped.open("a") as file:  # "a": a second resume from the same step keeps the first one's too
            file.writelines(later)
        rewritten = self.path.with_name(self.path.name + ".tmp")
        rewritten.write_text("".join(row for row in rows if _step_of(row) <= step))
        self._file.close()
        rewritten.replace(self.path)
        self._file = self.path.open("a")
        logger.warning("resumed at step %d: moved %d metrics row(s) of later steps (they run again) to %s",
                       step, len(later), dropped)

    def close(self) -> None:
        self._file.close()


class ConsoleSink:
    """One readable progress line per step."""

    def __init__(self, total_steps: int):
        self.total_steps = total_steps

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if step == 0:  # the evaluation before the first update
            logger.info(f"step 0/{self.total_steps} | before training | eval {_fmt(metrics.get('eval/accuracy'))}")
        else:
            logger.info(format_progress(step, self.total_steps, metrics))

    def close(self) -> None:
        pass


class WandbSink:
    """A resumed training run continues its wandb run (the id is kept in <run_dir>/wandb_run_id); a fresh
    one starts a new wandb run."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict, resuming: bool):
        try:
            import wandb
        except ImportError as err:
            raise ImportError("logging.wandb=true needs wandb: pip install 'megatron-s2l[logging]'") from err
        id_file = run_dir / "wandb_run_id"
        if resuming and id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # wandb ids are short lowercase alphanumerics
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(project=cfg.wandb_project, mode=cfg.wandb_mode, dir=str(run_dir), config=config,
                               name=run_dir.name, id=run_id, resume="allow")

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self._run.log(metrics, step=step)

    def close(self) -> None:
        self._run.finish()


class TensorBoardSink:
    def __init__(self, run_dir: Path):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ImportError("logging.tensorboard=true needs tensorboard: "
                              "pip install 'megatron-s2l[logging]'") from err
        self._writer = SummaryWriter(str(run_dir / "tensorboard"))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if isinstance(value, (int, float)) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class MetricsLogger:
    def __init__(self, sinks: list[MetricSink]):
        self.sinks = sinks

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for sink in self.sinks:
            sink.log(step, metrics)

    def resumed(self, step: int) -> None:
        """The run continues from checkpoint `step`; a sink that can take back rows of later steps does."""
        for sink in self.sinks:
            if isinstance(sink, JsonlSink):  # wandb and TensorBoard keep what they were sent
                sink.resumed(step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


class NullLogger(MetricsLogger):
    def __init__(self):
        super().__init__([])


def build_metrics_logger(cfg: LoggingConfig, total_steps: int, config: dict, is_driver: bool,
                         resuming: bool = False) -> MetricsLogger:
    if not is_driver:
        return NullLogger()
    run_dir = Path(cfg.run_dir)
    sinks: list[MetricSink] = [ConsoleSink(total_steps), JsonlSink(run_dir / "metrics.jsonl")]
    if cfg.wandb:
        sinks.append(WandbSink(cfg, run_dir, config, resuming))
    if cfg.tensorboard:
        sinks.append(TensorBoardSink(run_dir))
    return MetricsLogger(sinks)


def _step_of(row: str) -> float:
    """A metrics row's step; +inf for a row cut short (a kill during its write), so a resume drops it too."""
    try:
        return json.loads(row)["step"]
    except (ValueError, KeyError, TypeError):
        return math.inf


def _fmt(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, spec)


def _mfu(m: dict[str, float]) -> str:
    return f" (MFU {m['perf/mfu']:.0%})" if "perf/mfu" in m else ""


def _peak_memory_gib(m: dict[str, float]) -> float | None:
    return m.get("memory/device_peak_gib", m.get("memory/host_peak_gib"))


def format_progress(step: int, total: int, m: dict[str, float]) -> str:
    """`step 3/16 | alpha 0.71 G_w/G_s 12/4 | reward ... | solved exp 0.42 lrn 0.25 | eval 0.31 | kl ... |
    2210 tok/s 352 TFLOP/s/GPU (MFU 36%) | mem 61.2G | 12.1s (rollout 8.0 ...)`; memory is the device's peak
    on GPU, the host's otherwise."""
    timing = " ".join(f"{k.split('/')[1].removesuffix('_s')} {v:.1f}" for k, v in m.items()
                      if k.startswith("timing/") and k != "timing/step_s")
    return (f"step {step}/{total} | alpha {_fmt(m.get('schedule/alpha'), '.2f')} "
            f"G_w/G_s {int(m.get('schedule/G_w', 0))}/{int(m.get('schedule/G_s', 0))} | "
            f"reward exp {_fmt(m.get('reward/explorer_mean'))} lrn {_fmt(m.get('reward/learner_mean'))} | "
            f"solved exp {_fmt(m.get('success/explorer_rate'))} lrn {_fmt(m.get('success/learner_rate'))} | "
            f"eval {_fmt(m.get('eval/accuracy'))} | "
            f"kl {_fmt(m.get('loss/kl'), '.2e')} clip {_fmt(m.get('loss/clip_frac'))} "
            f"ent {_fmt(m.get('loss/entropy'), '.2f')} | len {_fmt(m.get('response/mean_length'), '.0f')} | "
            f"{_fmt(m.get('throughput/tokens_per_s'), '.0f')} tok/s {_fmt(m.get('perf/tflops_per_gpu'), '.3g')} "
            f"TFLOP/s/GPU{_mfu(m)} | mem {_fmt(_peak_memory_gib(m), '.1f')}G | "
            f"{_fmt(m.get('timing/step_s'), '.1f')}s ({timing})")
