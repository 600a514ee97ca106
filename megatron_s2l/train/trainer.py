"""The S2L-PO training loop (the paper's Algorithm 1); plain GRPO is the same loop with explorer.mode=off.

Every rank of the torchrun job runs `Trainer.run()`. The driver (global rank 0) collects and scores the
step's rollouts and builds the token batch; the batch is broadcast so that all ranks run the learner's
log-prob passes and update together; then the new weights go to the learner replica. Other ranks hold a
`NullRollout` and an empty `Evaluator`, so the loop reads the same on every rank. When to stop, and what to
save first, is `RunControl`'s (train/stopping.py).
"""

from __future__ import annotations

import logging
from typing import Union

import torch.distributed as dist

from megatron_s2l.algo.advantages import advantages_for_groups
from megatron_s2l.config import RunConfig
from megatron_s2l.eval.runner import Evaluator
from megatron_s2l.metrics.logger import MetricsLogger
from megatron_s2l.metrics.profiler import StepProfiler
from megatron_s2l.rollout.collector import NullRollout, RolloutCollector
from megatron_s2l.train.batch import TrainBatch
from megatron_s2l.train.checkpoint import Checkpointer
from megatron_s2l.train.learner import Learner
from megatron_s2l.train.stopping import RunControl
from megatron_s2l.train.weight_sync import WeightSync

logger = logging.getLogger(__name__)


class Trainer:
    # config
    cfg: RunConfig
    # components
    learner: Learner
    rollout: Union[RolloutCollector, NullRollout]
    evaluator: Evaluator
    weight_sync: WeightSync
    checkpointer: Checkpointer
    metrics: MetricsLogger
    profiler: StepProfiler
    control: RunControl  # holds the state: the last finished and the last saved step, and any stop asked for

    def __init__(self, cfg, learner, rollout, evaluator, weight_sync, checkpointer, metrics, control):
        self.cfg, self.learner, self.rollout, self.evaluator = cfg, learner, rollout, evaluator
        self.weight_sync, self.checkpointer, self.metrics, self.control = weight_sync, checkpointer, metrics, control
        self.profiler = StepProfiler(cfg.logging, dist.get_rank() if dist.is_initialized() else 0)

    @property
    def step(self) -> int:
        """The last step the learner finished."""
        return self.control.finished_step

    def run(self) -> None:
        """for i = 1..T: split G -> sample and score -> advantages -> old/ref log-probs -> update -> sync."""
        with self.control.running(save=self.save):
            self.resume()
            if self.step == 0 and self.cfg.eval.before_training and self.cfg.eval.every_steps:
                self.metrics.log(0, self.evaluate(0))  # where RL starts from
            while self.step < self.cfg.steps:
                step = self.step + 1
                with self.profiler.step(step) as timer:
                    with timer("rollout"):
                        batch, metrics = self.rollout_batch(step)
                    with self.rollout.in_background():  # max_staleness >= 1: later steps' rollouts go on
                        with timer("logprob"):
                            plan = self.learner.plan(batch)
                            self.learner.compute_logprobs(plan)
                            if self.learner.ref_model is not None:
                                self.learner.compute_logprobs(plan, reference=True)
                        with timer("train"):
                            metrics |= self.learner.train_step(plan)
                    self.control.finished(step)  # a checkpoint from here on saves this step
                    with self.control.log_on_failure(lambda outcome: self.metrics.log(step, metrics | {outcome: 1.0})):
                        metrics |= self.sync_and_evaluate(step, timer)
                    metrics |= timer.metrics(plan.num_response_tokens, plan.flops, self.learner.device)
                self.metrics.log(step, metrics | {"rollout/num_groups_trimmed": plan.num_groups_trimmed})
                if self.save_if_due(step):
                    break

    def resume(self) -> None:
        """Continue from a checkpoint (checkpoint.resume). Then the learner replica gets the learner's weights,
        checked, whatever it served before: a resume, model.megatron_checkpoint, a server left by another run."""
        path = self.checkpointer.resume_path()
        if path is not None:
            state = self.checkpointer.load(path, self.learner)
            self.control.resumed(state["step"])
            self.metrics.resumed(state["step"])  # rows of the steps that run again
            self.rollout.load_state_dict(state)
        self.weight_sync.sync(self.learner, version=str(self.step), verify=True)

    def rollout_batch(self, step: int) -> tuple[TrainBatch, dict[str, float]]:
        """Driver: prompts -> groups (G_w explorer + G_s learner) -> rewards -> advantages -> batch;
        every rank: the broadcast batch."""
        algorithm = self.cfg.algorithm
        with self.control.phase(f"step {step}: collecting rollouts"):
            groups, metrics = self.rollout.collect(step)
            advantages, adv_metrics = advantages_for_groups(groups, algorithm.group_mode, algorithm.norm_adv_by_std,
                                                            algorithm.adv_eps)
            batch = TrainBatch.from_groups(groups, advantages, pad_id=self.rollout.pad_id, weights_version=step - 1)
        return batch.broadcast(src=0, device=self.learner.device), metrics | adv_metrics  # NCCL on GPU: large

    def sync_and_evaluate(self, step: int, timer) -> dict[str, float]:
        """The new weights to the learner replica, then the held-out sets when due. Skipped when a stop signal
        came during the step (RunControl.stop_before_sync)."""
        if self.control.stop_before_sync():
            return {"step/interrupted": 1.0}
        with timer("sync"):
            metrics = self.weight_sync.sync(self.learner, version=str(step))
        with timer("eval"):
            return metrics | self.evaluate(step)

    def evaluate(self, step: int) -> dict[str, float]:
        with self.control.phase(f"step {step}: evaluation"):  # every rank: the driver may fail in it
            return self.evaluator.evaluate() if self.evaluator.due(step) else {}

    def save_if_due(self, step: int) -> bool:
        """Save at the end, every checkpoint.every_steps and when the run stops; True when it stops."""
        stop = self.control.stop_after(step)
        every = self.cfg.checkpoint.every_steps
        if stop or step == self.cfg.steps or (every and step % every == 0):
            self.save()
        return stop

    def save(self) -> None:
        state = _broadcast_object(self.rollout.state_dict())  # the driver's; every rank writes the checkpoint
        self.checkpointer.save(self.step, self.learner, state)
        self.control.saved(self.step)

    def close(self) -> None:
        self.profiler.close()
        self.metrics.close()
        self.rollout.close()


def _broadcast_object(obj):
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]
