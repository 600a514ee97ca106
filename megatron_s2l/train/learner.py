"""The learner: a Megatron-Core GPTModel (TP x PP x DP, megatron DDP, distributed optimizer), a frozen
reference copy for the KL term, forward-only log-prob passes and the GRPO update.

Legend: B sequences, S padded length, H hidden, V vocab per TP rank.

One step's batch is cut the same way for every pass: mini-batches (one optimizer update each), then this
data-parallel rank's rows, then micro-batches. Using identical micro-batches for the old-log-prob pass
and the update makes the PPO ratio exactly 1 on the first update. The loss of each micro-batch is a
weighted token sum whose weights are normalised over the whole mini-batch (all micro-batches and all DP
ranks), then multiplied by (micro-batches x DP size) to cancel megatron-core's per-micro-batch division
and DP gradient averaging, so the gradient is that of the global token mean (or seq-mean reductions).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from functools import partial
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
from megatron_s2l.algo.loss import LossInputs, finalize_metrics, policy_loss, reduction_weights
from megatron_s2l.config import RunConfig
from megatron_s2l.metrics import perf
from megatron_s2l.model import checkpoint_io, convert, specs
from megatron_s2l.platform import max_over_ranks
from megatron_s2l.train.batch import TrainBatch, round_up, width_multiple

logger = logging.getLogger(__name__)


@contextlib.contextmanager
def hidden_states_only(model) -> Iterator[None]:
    """Make GPTModel return the final (normed) hidden states instead of logits.

    GPTModel.post_process=False is megatron-core's own switch for "no output layer"; the log-prob path
    applies the output weight itself, chunk by chunk, so the [S, B, V] logits never exist.
    """
    gpt = convert.unwrap(model)
    saved = gpt.post_process
    gpt.post_process = False
    try:
        yield
    finally:
        gpt.post_process = saved


@dataclasses.dataclass
class MicroBatch:
    batch: TrainBatch  # this micro-batch's rows
    logprobs: Optional[torch.Tensor] = None  # output of a forward-only pass, [b, S]


class StepPlan(list):
    """This rank's work of one step: a list of mini-batches (one optimizer update each), each a list of
    micro-batches; plus the whole step's counts that its metrics need once the batch is gone."""

    def __init__(self, minis: list[list[MicroBatch]], *, num_response_tokens: int, flops: float,
                 num_groups_trimmed: int):
        super().__init__(minis)
        self.num_response_tokens, self.flops, self.num_groups_trimmed = num_response_tokens, flops, num_groups_trimmed


class Learner:
    """Owns the Megatron model(s) and optimizer; every rank of the torchrun job holds one."""

    # config
    cfg: RunConfig
    args: specs.ModelArgs
    # components
    model: torch.nn.Module  # megatron DDP(GPTModel) chunk of this pipeline stage
    ref_model: Optional[torch.nn.Module]
    optimizer: object  # megatron-core MegatronOptimizer
    scheduler: object  # megatron-core OptimizerParamScheduler
    # state
    num_updates: int
    nonfinite_steps: int  # train steps in a row in which every update was skipped
    fp8_calibrated: set[int]  # id() of the models whose delayed FP8 scales a forward has set

    def __init__(self, cfg, args, model, ref_model, optimizer, scheduler):
        self.cfg, self.args = cfg, args
        self.model, self.ref_model = model, ref_model
        self.optimizer, self.scheduler = optimizer, scheduler
        self.num_updates = 0
        self.nonfinite_steps = 0
        self.fp8_calibrated = set()

    # ------------------------------------------------------------------ parallel layout

    @staticmethod
    def _dp_rank_size() -> tuple[int, int]:
        from megatron.core import parallel_state

        return parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()

    def plan(self, batch: TrainBatch) -> "StepPlan":
        """Mini-batches -> this DP rank's rows -> micro-batches (on the model's device), with global
        reduction weights. Collective over data-parallel ranks with a token budget (same micro-batch counts).

        The layout takes whole groups only: when dynamic sampling kept a number of groups that does not
        split into mini-batches x DP ranks x micro-batches, the last groups are left out (and counted)."""
        parallel = self.cfg.parallel
        num_mini = self.cfg.optimizer.mini_batches_per_step
        dp_rank, dp_size = self._dp_rank_size()
        group_size = self.cfg.rollout.group_size
        unit = num_mini * dp_size * parallel.sequences_multiple
        rows_multiple = unit * group_size // math.gcd(unit, group_size)
        kept_rows = batch.num_sequences - batch.num_sequences % rows_multiple
        if kept_rows == 0:
            parts = f"optimizer.mini_batches_per_step={num_mini} x data-parallel {dp_size}"
            if not parallel.micro_batch_tokens:
                parts += f" x parallel.micro_batch_size={parallel.micro_batch_size}"
            raise ValueError(f"a batch of {batch.num_sequences} sequences (groups of {group_size}) cannot be split "
                             f"into {parts}; make rollout.prompts_per_step x rollout.group_size a multiple of "
                             f"{rows_multiple}, or lower those settings")
        num_groups_trimmed = (batch.num_sequences - kept_rows) // group_size
        if num_groups_trimmed:
            logger.warning("%d of %d groups do not fit the learner's layout (multiples of %d sequences) and are left "
                           "out of this step", num_groups_trimmed, batch.num_sequences // group_size, rows_multiple)
            batch = batch.select(slice(0, kept_rows))
        rows_per_mini = batch.num_sequences // num_mini
        config = convert.unwrap(self.model).config
        multiple = width_multiple(parallel.tp, config.sequence_parallel, bool(config.fp8))
        batch = batch.trimmed(multiple)
        rank_minis, micro_rows = [], []
        for m in range(num_mini):
            mini = batch.select(slice(m * rows_per_mini, (m + 1) * rows_per_mini))
            mini.weights = reduction_weights(
                mini.response_mask, self.cfg.algorithm.reduction, mini.num_sequences,
                mini.num_response_tokens, self.cfg.rollout.max_response_length)
            rank_minis.append(mini.select(self._rows_of_rank(mini, dp_rank, dp_size)))
            micro_rows.append(self._micro_batch_rows(rank_minis[-1], multiple))
        if parallel.micro_batch_tokens and dp_size > 1:  # only a token budget gives ranks different counts
            from megatron.core import parallel_state

            counts = max_over_ranks([len(rows) for rows in micro_rows], parallel_state.get_data_parallel_group_gloo())
            micro_rows = [split_to(rows, int(count)) for rows, count in zip(micro_rows, counts)]
        plan: list[list[MicroBatch]] = []
        for local, rows in zip(rank_minis, micro_rows):
            micro = [local.select(r) for r in rows]
            if parallel.length_grouping:
                micro = [b.trimmed(multiple) for b in micro]
            plan.append([MicroBatch(b.to(self.device)) for b in micro])
        return StepPlan(plan, num_response_tokens=batch.num_response_tokens, flops=self.update_flops(batch),
                        num_groups_trimmed=num_groups_trimmed)

    def _micro_batch_rows(self, local: TrainBatch, multiple: int) -> list[slice]:
        """Consecutive rows per micro-batch: micro_batch_size of them, or as many of the (longest-first)
        rows as fit in micro_batch_tokens padded positions, at least one."""
        budget, num_rows = self.cfg.parallel.micro_batch_tokens, local.num_sequences
        if not budget:
            size = self.cfg.parallel.micro_batch_size
            return [slice(i, i + size) for i in range(0, num_rows, size)]
        widths = [round_up(n, multiple) for n in local.lengths().tolist()]
        slices, start = [], 0
        while start < num_rows:
            count = max(1, budget // widths[start])  # the first row is the micro-batch's longest
            slices.append(slice(start, start + count))
            start += count
        return slices

    def _rows_of_rank(self, mini: TrainBatch, dp_rank: int, dp_size: int) -> torch.Tensor | slice:
        """This data-parallel rank's rows of a mini-batch: longest first, dealt round-robin (so every rank
        gets a similar number of tokens and neighbouring rows have similar lengths), or a contiguous block."""
        if self.cfg.parallel.length_grouping:
            return torch.argsort(mini.lengths(), descending=True, stable=True)[dp_rank::dp_size]
        per_rank = mini.num_sequences // dp_size
        return slice(dp_rank * per_rank, (dp_rank + 1) * per_rank)

    # ------------------------------------------------------------------ forward pieces

    def _token_logprobs(self, model, hidden: torch.Tensor, batch: TrainBatch
                        ) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-probs and entropy [b, S] of the response tokens from hidden states [S, b, H]."""
        from megatron.core import parallel_state
        from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

        gpt = convert.unwrap(model)
        weight = gpt.shared_embedding_or_output_weight() if self.args.tie_embeddings else gpt.output_layer.weight
        sequence_parallel = gpt.config.sequence_parallel
        if sequence_parallel:  # each TP rank holds S / tp positions [S/tp, b, H]; its backward
            # reduce-scatters the TP ranks' partial gradients (each rank scores only its vocab shard)
            hidden = gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=True)
        hidden = hidden.transpose(0, 1)  # [b, S, H]
        targets_mask = batch.response_mask[:, 1:]  # token s is predicted from position s - 1
        selected = hidden[:, :-1][targets_mask]  # [N, H]
        targets = batch.tokens[:, 1:][targets_mask]  # [N]
        tp_rank = parallel_state.get_tensor_model_parallel_rank()
        logprobs, entropy = vocab_parallel_logprobs(
            selected, weight, targets, temperature=self.cfg.rollout.temperature,
            vocab_start=tp_rank * weight.shape[0], vocab_size=self.args.vocab_size,
            tp_group=parallel_state.get_tensor_model_parallel_group(),
            chunk_size=self.cfg.algorithm.logprob_chunk_size, impl=self.cfg.algorithm.logprob_impl,
            reduce_hidden_grad=not sequence_parallel)
        full = torch.zeros(batch.tokens.shape, dtype=torch.float32, device=hidden.device)
        return full.masked_scatter(batch.response_mask, logprobs), full.masked_scatter(batch.response_mask, entropy)

    def _run_schedule(self, model, micro_batches: list[MicroBatch], loss_fn: Callable, forward_only: bool):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        def forward_step(data_iterator, chunk):
            micro = next(data_iterator)
            tokens = micro.batch.tokens
            positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
            with hidden_states_only(chunk):
                output = chunk(tokens, positions, None)  # causal mask; right padding needs nothing else
            return output, partial(loss_fn, chunk, micro)

        seq_len = micro_batches[0].batch.tokens.shape[1]
        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=[model],
            num_microbatches=len(micro_batches), seq_length=seq_len,
            micro_batch_size=micro_batches[0].batch.num_sequences, forward_only=forward_only)

    @property
    def device(self) -> torch.device:
        """Where the model (and so every micro-batch of a plan) lives."""
        return next(convert.unwrap(self.model).parameters()).device

    # ------------------------------------------------------------------ public API

    def update_flops(self, batch: TrainBatch) -> float:
        """Model FLOPs of this step's log-prob passes and update on `batch`, over all ranks."""
        return perf.update_flops(self.args, batch.lengths(), batch.num_response_tokens,
                                 reference=self.ref_model is not None)

    def compute_logprobs(self, plan: list[list[MicroBatch]], reference: bool = False) -> None:
        """Forward-only pass: fill `old_logprobs` (actor) or `ref_logprobs` (reference) of every
        micro-batch in the plan (on the last pipeline stage; other stages only relay activations)."""
        model = self.ref_model if reference else self.model
        field = "ref_logprobs" if reference else "old_logprobs"

        def collect(chunk, micro, hidden):
            logprobs, _ = self._token_logprobs(chunk, hidden, micro.batch)
            setattr(micro.batch, field, logprobs.detach())
            return logprobs.new_zeros(()), {}

        was_training = model.training
        model.eval()
        delayed_fp8 = needs_autograd_for_fp8_scales(convert.unwrap(model).config)
        with torch.set_grad_enabled(delayed_fp8):
            if delayed_fp8 and id(model) not in self.fp8_calibrated:
                # Delayed FP8 scales start at 1.0 (activations past 448 clip) and then follow the amaxes that
                # passes record: a first pass over one micro-batch, discarded, sets them before any counts.
                self._run_schedule(model, plan[0][:1], lambda chunk, micro, hidden: (hidden.new_zeros(()), {}),
                                   forward_only=True)
                self.fp8_calibrated.add(id(model))
            for micro_batches in plan:
                self._run_schedule(model, micro_batches, collect, forward_only=True)
        model.train(was_training)

    def train_step(self, plan: list[list[MicroBatch]]) -> dict[str, float]:
        """One optimizer update per mini-batch; returns averaged metrics (valid on every rank)."""
        _, dp_size = self._dp_rank_size()
        sums: dict[str, float] = {}
        grad_norms, skipped = [], 0
        self.model.train()
        for micro_batches in plan:
            scale = len(micro_batches) * dp_size  # undo megatron's 1/num_microbatches and 1/dp

            def loss_fn(chunk, micro, hidden):
                batch = micro.batch
                logprobs, entropy = self._token_logprobs(chunk, hidden, batch)
                inputs = LossInputs(
                    logprobs=logprobs, old_logprobs=batch.old_logprobs, advantages=batch.advantages,
                    mask=batch.response_mask, weights=batch.weights, source=batch.source,
                    ref_logprobs=batch.ref_logprobs, behaviour_logprobs=batch.behaviour_logprobs, entropy=entropy,
                    age=batch.age)
                loss, metrics = policy_loss(inputs, self.cfg.algorithm)
                metrics["loss/total_sum"] = loss.detach().double()
                return loss * scale, metrics

            self.model.zero_grad_buffer()
            self.optimizer.zero_grad()
            outputs = self._run_schedule(self.model, micro_batches, loss_fn, forward_only=False)
            for metrics in outputs:
                for name, value in metrics.items():
                    sums[name] = max(sums.get(name, 0.0), value.item()) if name.endswith("_max") \
                        else sums.get(name, 0.0) + value.item()
            grad_norm, ok = self._optimizer_step()
            grad_norms.append(grad_norm)
            skipped += not ok
        metrics = finalize_metrics(_reduce_metrics(sums))
        metrics["loss/total"] = metrics.pop("loss/total_sum", 0.0) / len(plan)  # mean over updates
        metrics["train/grad_norm"] = max(grad_norms)
        metrics["train/skipped_updates"] = skipped
        metrics["train/lr"] = self.optimizer.param_groups[0]["lr"]
        self._stop_if_not_finite(all_skipped=skipped == len(plan))
        return metrics

    def _stop_if_not_finite(self, all_skipped: bool) -> None:
        """Skipping a bad update keeps the weights safe; a streak of them means training cannot go on."""
        self.nonfinite_steps = self.nonfinite_steps + 1 if all_skipped else 0
        limit = self.cfg.optimizer.max_nonfinite_steps
        if limit and self.nonfinite_steps >= limit:
            raise FloatingPointError(
                f"{self.nonfinite_steps} training steps in a row had a non-finite gradient in every update "
                f"(optimizer.max_nonfinite_steps={limit}); all were skipped, so the weights and the last "
                "checkpoint are those from before the streak. Look for NaN/inf in the rewards or the data, lower "
                "optimizer.lr, or turn model.fp8 off, then resume from the checkpoint")

    def _optimizer_step(self) -> tuple[float, bool]:
        """Clip and step, or skip the update (and log why) when the gradient is not finite."""
        self.optimizer.prepare_grads()
        grad_norm = float(self.optimizer.get_grad_norm())
        if not math.isfinite(grad_norm):
            logger.warning("non-finite gradient norm (%s): update %d skipped, weights unchanged",
                           grad_norm, self.num_updates + 1)
            self.optimizer.zero_grad()
            return grad_norm, False
        from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

        for inner in getattr(self.optimizer, "chained_optimizers", [self.optimizer]):
            params = inner.get_parameters()
            if params and self.cfg.optimizer.grad_clip > 0:
                clip_grad_by_total_norm_fp32(params, max_norm=self.cfg.optimizer.grad_clip, total_norm=grad_norm)
        self.optimizer.step_with_ready_grads()
        self.scheduler.step(increment=1)
        self.num_updates += 1
        return grad_norm, True


def needs_autograd_for_fp8_scales(config) -> bool:
    """Whether forward-only passes must run with autograd on (nothing is backpropagated): with delayed FP8
    scaling, Transformer Engine updates its scaling factors only when it does, and the frozen reference
    model never trains, so under no_grad its factors would stay at their initial 1.0 for good."""
    return bool(config.fp8) and config.fp8_recipe == "delayed"


def split_to(micro_rows: list[slice], count: int) -> list[slice]:
    """Split the micro-batches with the most rows in two until there are `count` of them, keeping their
    order. Every data-parallel rank must run as many micro-batches as the others: FP8's amax reductions
    span the data-parallel group once per forward."""
    micro_rows = list(micro_rows)
    while len(micro_rows) < count:
        i = max(range(len(micro_rows)), key=lambda j: micro_rows[j].stop - micro_rows[j].start)
        rows = micro_rows[i]
        if rows.stop - rows.start < 2:
            raise ValueError(f"cannot split {micro_rows[-1].stop - micro_rows[0].start} rows into {count} "
                             "micro-batches: data-parallel ranks were given different numbers of rows")
        middle = (rows.start + rows.stop) // 2
        micro_rows[i:i + 1] = [slice(rows.start, middle), slice(middle, rows.stop)]
    return micro_rows


def _reduce_metrics(sums: dict[str, float]) -> dict[str, float]:
    """Sum metric sums over all ranks (only last-stage ranks contribute; TP ranks hold copies)."""
    from megatron.core import parallel_state

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return sums
    names = sorted(sums)
    counted = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    # every rank must join the same collectives: agree on the metric names first
    all_names: list = [None] * dist.get_world_size()
    dist.all_gather_object(all_names, names)
    names = sorted({n for rank_names in all_names for n in rank_names})
    values = torch.tensor([sums.get(n, 0.0) if counted else 0.0 for n in names], dtype=torch.float64)
    is_max = torch.tensor([n.endswith("_max") for n in names])
    total = values.masked_fill(is_max, 0.0)
    maxima = values.masked_fill(~is_max, -math.inf)
    dist.all_reduce(total)
    dist.all_reduce(maxima, op=dist.ReduceOp.MAX)
    return {n: (maxima[i] if is_max[i] else total[i]).item() for i, n in enumerate(names)}


# ---------------------------------------------------------------------------------------------
# building


def build_learner(cfg: RunConfig, hf_dir: str, megatron_checkpoint: str = "") -> Learner:
    """Model (+ DDP), reference model (when KL is on), optimizer and lr schedule, weights loaded from
    the HF checkpoint (or a Megatron dist checkpoint converted from it). Parallel state must exist."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
    from megatron.core.distributed.finalize_model_grads import finalize_model_grads

    hf_config = specs.load_hf_config(hf_dir)
    args = specs.model_args_from_hf(hf_config)

    def load_weights(model) -> None:
        if megatron_checkpoint:
            checkpoint_io.load_megatron_checkpoint(model, megatron_checkpoint, hf_config)
        else:
            convert.load_hf_weights(model, checkpoint_io.HFCheckpoint(hf_dir).get, args)

    model = specs.build_gpt_model(args, cfg.model, cfg.parallel)
    load_weights(model)
    config = model.config
    ddp_config = DistributedDataParallelConfig(
        grad_reduce_in_fp32=True, overlap_grad_reduce=False,
        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer)
    model = DistributedDataParallel(config=config, ddp_config=ddp_config, module=model)
    config.finalize_model_grads_func = finalize_model_grads
    config.no_sync_func = model.no_sync

    ref_model = None
    if cfg.algorithm.kl_coef > 0:
        ref_model = specs.build_gpt_model(args, cfg.model, cfg.parallel)
        load_weights(ref_model)
        ref_model.requires_grad_(False).eval()

    optimizer, scheduler = build_optimizer(cfg, model)
    return Learner(cfg, args, model, ref_model, optimizer, scheduler)


def build_optimizer(cfg: RunConfig, model):
    """megatron-core AdamW (distributed optimizer when configured) and its lr schedule."""
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    opt = cfg.optimizer
    bf16 = cfg.model.dtype == "bfloat16"
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=opt.lr, min_lr=opt.min_lr, weight_decay=opt.weight_decay,
                        adam_beta1=opt.adam_beta1, adam_beta2=opt.adam_beta2, adam_eps=opt.adam_eps,
                        clip_grad=opt.grad_clip, bf16=bf16,
                        params_dtype=torch.bfloat16 if bf16 else torch.float32,
                        use_distributed_optimizer=cfg.parallel.use_distributed_optimizer),
        [model])
    total_updates = max(1, cfg.steps * opt.mini_batches_per_step)
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0 if opt.warmup_steps else opt.lr, max_lr=opt.lr, min_lr=opt.min_lr,
        lr_warmup_steps=opt.warmup_steps, lr_decay_steps=total_updates,
        lr_decay_style="constant" if opt.lr_schedule == "constant" else "cosine",
        start_wd=opt.weight_decay, end_wd=opt.weight_decay, wd_incr_steps=total_updates,
        wd_incr_style="constant")
    return optimizer, scheduler
