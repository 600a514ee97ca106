"""Typed configuration for a run: a tree of small dataclasses, loaded from YAML, overridden by
``key.sub=value`` arguments, validated with errors that name the field, the value and the fix.

Defaults follow the paper's setup (reference/PAPER.md, Appendix C): G=16, T_mix=T/2, lr 1e-6 constant,
AdamW wd 0.01, grad clip 1.0, clip 0.2, dual clip 3, k3 KL 1e-3, token-mean loss.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A user mistake in the configuration; the message names the field and the fix."""


@dataclasses.dataclass
class FP8Config:
    recipe: Literal["delayed", "tensorwise"] = "delayed"
    """Transformer Engine FP8 scaling recipe for the learner's linear layers (H100)."""
    margin: int = 0
    """Scaling margin (delayed recipe)."""
    amax_history: int = 1024
    """Length of the amax history window (delayed recipe)."""


@dataclasses.dataclass
class ModelConfig:
    path: str = ""
    """Learner Hugging Face checkpoint directory (config.json, *.safetensors, tokenizer files)."""
    megatron_checkpoint: str = ""
    """Optional Megatron dist checkpoint made from `path` by `s2l convert hf-to-megatron`."""
    dtype: Literal["float32", "bfloat16"] = "bfloat16"
    """Parameter dtype of the learner (main grads and optimizer state stay fp32)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (padded rows are zero and masked out of log-probs)."""
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    """Layer implementation: TE on CUDA when installed, megatron-core's local modules otherwise."""
    fp8: Optional[FP8Config] = None
    """FP8 training through Transformer Engine, e.g. {recipe: delayed}; null: BF16. Log-probs stay BF16/fp32."""

    def validate(self) -> None:
        _check(self.make_vocab_size_divisible_by >= 1, "model.make_vocab_size_divisible_by",
               self.make_vocab_size_divisible_by, "use a positive integer such as 128")
        if self.fp8 is not None:
            _check(self.dtype == "bfloat16", "model.fp8", self.fp8, "FP8 needs model.dtype=bfloat16")


@dataclasses.dataclass
class ParallelConfig:
    tp: int = 1
    """Tensor-parallel size; must divide the model's attention heads and query groups."""
    pp: int = 1
    """Pipeline-parallel size; must divide the number of layers."""
    micro_batch_size: int = 1
    """Sequences per micro-batch in the learner's forward/backward (unless micro_batch_tokens is set)."""
    micro_batch_tokens: int = 0
    """When > 0, a micro-batch holds as many of the length-sorted sequences as fit in this many padded
    tokens (at least one): short responses share a forward, a long one runs alone, so one setting suits the
    whole long-tailed length distribution (as slime's --max-tokens-per-gpu). Needs length_grouping."""
    length_grouping: bool = True
    """Put sequences of similar length in the same micro-batch, deal them evenly to data-parallel ranks,
    and cut each micro-batch's padding (with PP > 1 activations then carry their shape between stages).
    The loss is the same either way (reduction weights are global); long-tailed response lengths train
    much faster."""
    sequence_parallel: bool = True
    """With tp > 1, split the sequence over the TP ranks wherever the layers are not already TP-split (norms,
    residual stream), as Megatron-LM's --sequence-parallel: those activations take 1/tp of the memory and
    two all-reduces per layer become an all-gather and a reduce-scatter. Same results; no effect at tp=1."""
    use_distributed_optimizer: bool = True
    """Shard optimizer state across data-parallel ranks (megatron-core distributed optimizer)."""
    recompute: Literal["off", "full"] = "off"
    """Activation recomputation, as Megatron-LM's --recompute-granularity full --recompute-method uniform
    --recompute-num-layers 1: keep only each layer's input and rerun the layer in the backward. Activation
    memory falls to one layer's worth plus the inputs (long responses, large micro_batch_tokens) for about
    a third more compute in the update. Same results."""
    distributed_timeout_minutes: float = 10.0
    """A learner collective (NCCL/gloo) that waits longer fails: a hung or lost rank is reported after this
    long (Megatron-LM's --distributed-timeout-minutes)."""
    driver_wait_minutes: float = 240.0
    """How long the other ranks wait for the driver's rollout collection, evaluation or weight sync (a
    process group of its own): more than the slowest of those phases, which for long responses far exceeds
    the collective timeout. A hung server is caught sooner by rollout.request_timeout_s."""

    def validate(self) -> None:
        for name in ("tp", "pp", "micro_batch_size"):
            value = getattr(self, name)
            _check(value >= 1, f"parallel.{name}", value, "use an integer >= 1")
        for name in ("distributed_timeout_minutes", "driver_wait_minutes"):
            value = getattr(self, name)
            _check(value > 0, f"parallel.{name}", value, "use a positive number of minutes")
        _check(self.micro_batch_tokens >= 0, "parallel.micro_batch_tokens", self.micro_batch_tokens,
               "use 0 (micro_batch_size sequences per micro-batch) or a token budget such as 16384")
        _check(self.length_grouping or not self.micro_batch_tokens, "parallel.micro_batch_tokens",
               self.micro_batch_tokens, "it fills micro-batches with length-sorted sequences: set "
               "parallel.length_grouping=true, or parallel.micro_batch_tokens=0")

    @property
    def sequences_multiple(self) -> int:
        """Each data-parallel rank's share of a mini-batch must be a multiple of this many sequences."""
        return 1 if self.micro_batch_tokens else self.micro_batch_size


@dataclasses.dataclass
class DataConfig:
    path: str = ""
    """Training prompts: a .jsonl or .parquet file, or a directory saved by HF `datasets`."""
    template: Literal["dapo", "qwen3_nothink", "plain"] = "dapo"
    """Prompt template (DAPO instruction inside the chat template is the paper's)."""
    max_prompt_length: int = 512
    """Prompts longer than this many tokens are dropped (and counted)."""
    on_bad_row: Literal["error", "skip"] = "error"
    """A malformed dataset row stops the run with file:line, or is skipped and counted."""
    shuffle: bool = True
    """Shuffle prompts each epoch (deterministic from `seed`)."""
    max_bad_gold_fraction: float = 0.01
    """Rows whose gold answer is empty (`answer: ""`, GSM8K `####` with nothing after it) or not a value can
    never be solved: up to this fraction of a dataset they are dropped (and counted), above it the run is
    refused before anything is built, naming the first such rows."""

    def validate(self) -> None:
        _check(self.max_prompt_length >= 1, "data.max_prompt_length", self.max_prompt_length,
               "use a positive token count such as 512")
        _check(0 <= self.max_bad_gold_fraction <= 1, "data.max_bad_gold_fraction", self.max_bad_gold_fraction,
               "use a fraction in [0, 1] such as 0.01")


@dataclasses.dataclass
class RolloutConfig:
    engine: Literal["local", "sglang"] = "local"
    """Learner-replica engine: in-process transformers (`local`) or SGLang servers (`sglang`)."""
    learner_url: str = ""
    """Base URL of the learner replica's SGLang server or router (engine=sglang)."""
    learner_worker_urls: list[str] = dataclasses.field(default_factory=list)
    """The SGLang servers behind a router (weight updates go to each); empty: learner_url is a server."""
    api_key: str = ""
    """Optional API key sent to SGLang servers."""
    group_size: int = 16
    """G: samples per prompt (explorer + learner)."""
    prompts_per_step: int = 1024
    """Prompts per training step (the paper's batch)."""
    max_response_length: int = 4096
    """Maximum generated tokens per sample."""
    temperature: float = 1.0
    """Learner sampling temperature; also applied when the learner recomputes log-probs."""
    top_p: float = 1.0
    """Learner nucleus sampling."""
    top_k: int = -1
    """Learner top-k sampling (-1: off)."""
    weight_sync: Literal["memory", "tensor", "distributed", "disk"] = "memory"
    """How new weights reach the learner replica: in memory (local), SGLang tensor/distributed/disk."""
    weight_sync_bucket_mb: int = 512
    """Bucket size for streamed weight updates."""
    verify_weight_sync: bool = False
    """After each sync, check bit for bit that the engine holds the learner's weights (LocalEngine)."""
    dynamic_sampling: bool = False
    """Drop groups whose rewards are all equal and over-sample to refill the batch (DAPO)."""
    max_oversample_rounds: int = 3
    """Upper bound on extra collection rounds when dynamic sampling drops groups."""
    max_staleness: int = 0
    """k: asynchronous rollouts. With k >= 1 the next k steps' rollouts are generated while the learner trains,
    so learner samples may come from weights up to k versions old (corrected by algorithm.stale_tis); 0: each
    step samples from the newest weights, then trains (the paper's loop)."""
    request_timeout_s: float = 3600.0
    """HTTP timeout for one generate request. All of a step's requests are sent at once and wait in the
    servers' queues, so this must cover the whole rollout phase (tens of minutes for 1024 prompts x 16
    samples x 4k tokens), not one generation."""

    def validate(self) -> None:
        _check(self.group_size >= 1, "rollout.group_size", self.group_size, "use G >= 1 (paper: 16)")
        _check(self.prompts_per_step >= 1, "rollout.prompts_per_step", self.prompts_per_step,
               "use a positive number of prompts")
        _check(self.max_response_length >= 1, "rollout.max_response_length",
               self.max_response_length, "use a positive token count")
        _check_sampling("rollout", self.temperature, self.top_p, self.top_k, "1.0 is the paper's")
        if self.group_size == 1:
            logging.getLogger(__name__).warning(
                "rollout.group_size=1: a group of one sample has advantage 0 (it is its own mean), so "
                "nothing is learned; use G >= 2 (paper: 16)")
        if self.engine == "sglang":
            _check(bool(self.learner_url), "rollout.learner_url", self.learner_url,
                   "set the learner replica's server URL, e.g. http://127.0.0.1:30000")
        _check(self.max_staleness >= 0, "rollout.max_staleness", self.max_staleness,
               "use 0 (synchronous) or k >= 1 steps of rollouts ahead")
        if self.weight_sync == "memory":
            _check(self.engine == "local", "rollout.weight_sync", self.weight_sync,
                   "memory sync is only for engine=local; use tensor, distributed or disk for sglang")


@dataclasses.dataclass
class ExplorerConfig:
    mode: Literal["pool", "online", "off"] = "pool"
    """Explorer samples from an offline pool (paper), a frozen SGLang server, or none (plain GRPO)."""
    model_path: str = ""
    """Explorer HF checkpoint (to build a pool, or for the online server's tokenizer check)."""
    pool_path: str = ""
    """Directory of an explorer pool made by `s2l pool build` (mode=pool)."""
    url: str = ""
    """Explorer SGLang server URL (mode=online); empty: run explorer.model_path in-process."""
    n_per_prompt: int = 32
    """Pool samples stored per prompt (paper code: 32)."""
    temperature: float = 0.7
    """Explorer sampling temperature (paper: 0.7)."""
    top_p: float = 0.95
    """Explorer nucleus sampling (paper: 0.95)."""
    top_k: int = -1
    """Explorer top-k sampling (-1: off)."""
    accept_pool_mismatch: bool = False
    """mode=pool: a pool whose manifest differs from this run (explorer model, temperature, top_p, top_k,
    max_new_tokens vs rollout.max_response_length) is refused; true: used anyway, with a warning listing the
    differences. Responses longer than rollout.max_response_length are refused either way."""

    def validate(self) -> None:
        _check_sampling("explorer", self.temperature, self.top_p, self.top_k, "0.7 is the paper's")
        if self.mode == "pool":
            _check(bool(self.pool_path), "explorer.pool_path", self.pool_path,
                   "build one with `s2l pool build` and set its directory, or use explorer.mode=off")
        if self.mode == "online":
            _check(bool(self.url or self.model_path), "explorer.url", self.url,
                   "set the explorer's SGLang server URL (or explorer.model_path for an in-process explorer)")
        _check(self.n_per_prompt >= 1, "explorer.n_per_prompt", self.n_per_prompt, "use >= 1")


@dataclasses.dataclass
class ScheduleConfig:
    kind: Literal["linear", "step", "cosine", "constant", "adaptive"] = "linear"
    """How the explorer share alpha falls from 1 to 0 (paper: linear)."""
    t_mix: Optional[int] = None
    """T_mix: first step with alpha = 0; default: half the training steps, at least 2 (1 would not mix)."""
    constant_alpha: float = 0.5
    """alpha held until T_mix by kind=constant."""
    adaptive_window: int = 2
    """kind=adaptive: steps of success rates averaged when comparing learner to explorer."""

    def validate(self) -> None:
        _check(0.0 <= self.constant_alpha <= 1.0, "schedule.constant_alpha", self.constant_alpha,
               "use a value in [0, 1]")
        if self.t_mix is not None:
            _check(self.t_mix >= 1, "schedule.t_mix", self.t_mix, "use T_mix >= 1")


@dataclasses.dataclass
class AlgorithmConfig:
    group_mode: Literal["mixed", "per_source"] = "mixed"
    """Advantages over the combined group (paper) or within each source's sub-group."""
    norm_adv_by_std: bool = True
    """Divide advantages by the group std (off: Dr.GRPO)."""
    adv_eps: float = 1e-6
    """eps in (r - mean) / (std + eps)."""
    ratio: Literal["learner_old", "tis", "luffy"] = "learner_old"
    """Importance ratio for explorer tokens (see DESIGN.md §4)."""
    eps_low: float = 0.2
    """Lower clip range: ratio >= 1 - eps_low."""
    eps_high: float = 0.2
    """Upper clip range: ratio <= 1 + eps_high (clip-higher when > eps_low)."""
    dual_clip: Optional[float] = 3.0
    """Dual-clip constant c for negative advantages (null: off)."""
    tis_clamp: float = 2.0
    """Clamp of the token-level pi_old / pi_behaviour weight (ratio=tis, stale_tis)."""
    stale_tis: bool = True
    """Asynchronous rollouts: weight learner tokens sampled by older weights by min(pi_old / pi_behaviour,
    tis_clamp) (truncated importance sampling); off: train on them as if fresh."""
    luffy_gamma: float = 0.1
    """ratio=luffy: shaping p / (p + gamma) for explorer tokens."""
    kl_type: Literal["k1", "k3", "low_var_kl"] = "low_var_kl"
    """KL estimator to the reference (initial) model."""
    kl_coef: float = 1e-3
    """KL loss coefficient (0 disables the reference model)."""
    entropy_coef: float = 0.0
    """Entropy bonus coefficient."""
    reduction: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = "token_mean"
    """Loss reduction; token_mean is over all valid tokens of the global batch."""
    logprob_chunk_size: int = 1024
    """Tokens per chunk in the fused log-prob path (bounds the [chunk, V/TP] logits buffer)."""
    logprob_impl: Literal["auto", "torch", "triton"] = "auto"
    """Fused log-prob implementation: Triton kernels on CUDA (auto), or the chunked torch path."""

    def validate(self) -> None:
        _check(self.eps_low >= 0 and self.eps_high >= 0, "algorithm.eps_low/eps_high",
               (self.eps_low, self.eps_high), "use non-negative clip ranges such as 0.2")
        if self.dual_clip is not None:
            _check(self.dual_clip > 1.0, "algorithm.dual_clip", self.dual_clip,
                   "dual clip needs c > 1 (paper: 3), or null to turn it off")
        _check(self.kl_coef >= 0, "algorithm.kl_coef", self.kl_coef, "use a coefficient >= 0")
        _check(self.logprob_chunk_size >= 1, "algorithm.logprob_chunk_size",
               self.logprob_chunk_size, "use a positive token count")


# "module:callable", each part a dotted Python name
_FUNCTION_NAME = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


@dataclasses.dataclass
class RewardConfig:
    kind: Literal["math", "function"] = "math"
    """math: the response's final answer checked against the gold with math-verify; function: your own Python
    reward, named by reward.function (README, "Your own reward")."""
    function: str = ""
    """kind=function: "module:callable", called once per response as fn(completion: str, gold: str) -> float.
    The scoring workers import it by this name, so its module must be importable (PYTHONPATH)."""
    scale: Literal["binary", "signed"] = "binary"
    """kind=math only: binary: {0, 1}; signed: {-1, 1} (the paper's learner reward). The same for both sources.
    A reward function's return value is the reward as it is."""
    timeout_s: int = 5
    """math-verify's budget per step (parse gold, parse answer, compare); a worker is killed after 3x + 2 s.
    The same deadline holds for a reward function's call: killed, scored 0 and counted as a timeout."""
    num_workers: int = 2
    """Scoring processes (0: score in the calling process, where no deadline can kill a call: debugging only,
    a hung reward function hangs the run)."""

    def validate(self) -> None:
        _check(self.timeout_s >= 1, "reward.timeout_s", self.timeout_s, "use a positive number of seconds")
        _check(self.num_workers >= 0, "reward.num_workers", self.num_workers, "use >= 0")
        if self.kind == "function":
            _check(_FUNCTION_NAME.fullmatch(self.function) is not None, "reward.function", self.function,
                   'with reward.kind=function name your reward "module:callable", e.g. my_rewards:exact_match')
            _check(self.scale == "binary", "reward.scale", self.scale,
                   "the scale applies to reward.kind=math only; a reward function returns the reward itself, "
                   "so leave reward.scale at binary")
        else:
            _check(not self.function, "reward.function", self.function,
                   "it is used only with reward.kind=function: set reward.kind=function, or drop reward.function")


@dataclasses.dataclass
class EvalConfig:
    path: str = ""
    """Held-out prompts scored with the learner replica during training (same formats as data.path);
    logged as eval/accuracy."""
    extra: dict[str, str] = dataclasses.field(default_factory=dict)
    """More held-out sets, name -> path, each logged as eval/<name>/accuracy, e.g.
    `{math500: /data/math500.jsonl, aime25: /data/aime25.jsonl}` (the paper reports four benchmarks)."""
    every_steps: int = 0
    """Evaluate every N steps and after the last one (0: never)."""
    before_training: bool = True
    """With every_steps > 0, also evaluate the initial model before the first update (logged as step 0), so
    that every curve starts from where RL started."""
    max_prompts: int = 200
    """Use at most this many prompts of each held-out set."""
    samples_per_prompt: int = 1
    """k samples per problem; eval/accuracy is their mean pass@1 (paper: 16, so AIME's 30 problems give a
    steadier number). k > 1 also logs eval/pass@k, eval/unique_answer_ratio and eval/self_bleu."""
    temperature: float = 0.7
    """Evaluation sampling (paper: Qwen3 nothink, T 0.7, top_p 0.8, top_k 20, presence penalty 1.5)."""
    top_p: float = 0.8
    top_k: int = 20
    presence_penalty: float = 1.5

    def validate(self) -> None:
        _check(self.every_steps >= 0, "eval.every_steps", self.every_steps, "use >= 0 (0: off)")
        _check(self.samples_per_prompt >= 1, "eval.samples_per_prompt", self.samples_per_prompt, "use >= 1")
        _check_sampling("eval", self.temperature, self.top_p, self.top_k, "0: greedy", greedy=True)
        if self.every_steps:
            _check(bool(self.path), "eval.path", self.path, "set held-out prompts or eval.every_steps=0")
        for name, path in self.extra.items():
            _check(re.fullmatch(r"[A-Za-z0-9_\-]+", name) is not None and name not in ("accuracy", "mean_length"),
                   "eval.extra", name, "name each set with letters, digits, _ or - (it becomes eval/<name>/accuracy)")
            _check(bool(path), f"eval.extra.{name}", path, "give the set's path")


@dataclasses.dataclass
class OptimizerConfig:
    lr: float = 1e-6
    """Peak learning rate (paper: 1e-6 constant)."""
    min_lr: float = 0.0
    """Final learning rate of the cosine schedule."""
    lr_schedule: Literal["constant", "warmup_cosine"] = "constant"
    """Learning-rate schedule over optimizer updates."""
    warmup_steps: int = 0
    """Linear warmup length in optimizer updates."""
    weight_decay: float = 0.01
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Global gradient-norm clip."""
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    mini_batches_per_step: int = 1
    """Optimizer updates per training step (the batch is split into this many mini-batches)."""
    max_nonfinite_steps: int = 3
    """Stop with an error after this many steps in a row in which every update had a non-finite gradient
    (each such update is skipped, so the weights are those before the streak); 0: never stop."""

    def validate(self) -> None:
        _check(self.lr > 0, "optimizer.lr", self.lr, "use a positive learning rate such as 1e-6")
        _check(self.max_nonfinite_steps >= 0, "optimizer.max_nonfinite_steps", self.max_nonfinite_steps,
               "use >= 0 (0: never stop on non-finite gradients)")
        _check(self.grad_clip >= 0, "optimizer.grad_clip", self.grad_clip, "use >= 0 (0: off)")
        _check(self.mini_batches_per_step >= 1, "optimizer.mini_batches_per_step",
               self.mini_batches_per_step, "use >= 1")


@dataclasses.dataclass
class CheckpointConfig:
    dir: str = ""
    """Where checkpoints go (default: <run_dir>/checkpoints)."""
    every_steps: int = 0
    """Save every N training steps (0: only at the end, and on SIGTERM or Ctrl-C)."""
    keep_last: int = 2
    """How many checkpoints to keep."""
    resume: str = "none"
    """`none`, `auto` (latest in `dir`) or a checkpoint directory."""
    exit_interval: int = 0
    """Save and exit after this many steps of this process (time-boxed cluster jobs); 0: run to the end."""

    def validate(self) -> None:
        _check(self.every_steps >= 0, "checkpoint.every_steps", self.every_steps, "use >= 0")
        _check(self.exit_interval >= 0, "checkpoint.exit_interval", self.exit_interval, "use >= 0 (0: off)")
        _check(self.keep_last >= 1, "checkpoint.keep_last", self.keep_last, "keep at least 1")


@dataclasses.dataclass
class LoggingConfig:
    run_dir: str = "runs/s2l"
    """Run directory: metrics.jsonl, plots, checkpoints."""
    wandb: bool = False
    """Log to Weights & Biases (offline unless `wandb_mode` is online)."""
    wandb_project: str = "megatron-s2l"
    wandb_mode: Literal["offline", "online"] = "offline"
    tensorboard: bool = False
    """Write TensorBoard event files under <run_dir>/tensorboard."""
    profile_steps: list[int] = dataclasses.field(default_factory=list)
    """[first, last]: record these steps with torch.profiler; traces go to <run_dir>/profile ([] = off)."""
    profile_ranks: list[int] = dataclasses.field(default_factory=lambda: [0])
    """Global ranks that record the profile (each writes its own trace)."""
    save_rollouts: bool = False
    """Write each step's samples (prompt id, source, weight version, reward, answer, text) to
    <run_dir>/rollouts/step_NNNNNN.jsonl."""
    overwrite: bool = False
    """A run_dir that holds another run's config.yaml, metrics.jsonl or checkpoints is refused, unless this
    run resumes it (checkpoint.resume, same config but for the fields a resume may change) or this is true:
    then that run's records (config.yaml, metrics.jsonl, checkpoints, TensorBoard/wandb/profile files) are
    deleted before training starts. A run resuming its own folder keeps it either way."""

    def validate(self) -> None:
        steps = self.profile_steps
        _check(steps == [] or (len(steps) == 2 and 1 <= steps[0] <= steps[1]), "logging.profile_steps", steps,
               "give [first, last] with 1 <= first <= last (e.g. [3, 4]: skip warm-up steps), or [] for none")


@dataclasses.dataclass
class RunConfig:
    steps: int = 16
    """T: training steps (paper: 16 steps of 1024 prompts)."""
    seed: int = 1234
    """Seed for data order, pool draws, sampling and initialisation."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    rollout: RolloutConfig = dataclasses.field(default_factory=RolloutConfig)
    explorer: ExplorerConfig = dataclasses.field(default_factory=ExplorerConfig)
    schedule: ScheduleConfig = dataclasses.field(default_factory=ScheduleConfig)
    algorithm: AlgorithmConfig = dataclasses.field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = dataclasses.field(default_factory=OptimizerConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = dataclasses.field(default_factory=CheckpointConfig)
    logging: LoggingConfig = dataclasses.field(default_factory=LoggingConfig)

    @property
    def t_mix(self) -> int:
        """T_mix with its default filled in: half the steps, and at least 2 (T_mix = 1 would not mix at all)."""
        if self.schedule.t_mix is not None:
            return self.schedule.t_mix
        return max(min(2, self.steps), self.steps // 2)

    def validate(self) -> "RunConfig":
        _check(self.steps >= 1, "steps", self.steps, "use a positive number of training steps")
        for section in dataclasses.fields(self):
            sub = getattr(self, section.name)
            if hasattr(sub, "validate"):
                sub.validate()
        if self.explorer.mode != "off":
            _check(self.t_mix <= self.steps, "schedule.t_mix", self.t_mix,
                   f"T_mix must be <= steps ({self.steps}); lower schedule.t_mix or raise steps")
            if self.t_mix == 1:
                logging.getLogger(__name__).warning(
                    "schedule.t_mix=1: the explorer's share is 0 from step 1, so this run does not mix (plain GRPO "
                    "with explorer.mode=%s); use schedule.t_mix >= 2 (and steps >= 2) to mix", self.explorer.mode)
        if self.logging.profile_steps:
            _check(self.logging.profile_steps[1] <= self.steps, "logging.profile_steps", self.logging.profile_steps,
                   f"the window must end by the last step ({self.steps})")
        mini = self.optimizer.mini_batches_per_step
        _check(self.rollout.prompts_per_step % mini == 0, "optimizer.mini_batches_per_step", mini,
               f"it must divide rollout.prompts_per_step ({self.rollout.prompts_per_step})")
        return self


def check_parallel_fits_model(parallel: ParallelConfig, num_attention_heads: int,
                              num_query_groups: int, num_layers: int) -> None:
    """TP must divide heads and query groups; PP must divide the layers."""
    for what, count in (("num_attention_heads", num_attention_heads),
                        ("num_key_value_heads", num_query_groups)):
        if count % parallel.tp:
            fits = [d for d in range(1, count + 1) if count % d == 0]
            raise ConfigError(f"parallel.tp={parallel.tp} does not divide the model's {what}="
                              f"{count}; choose parallel.tp from {fits}")
    if num_layers % parallel.pp:
        fits = [d for d in range(1, num_layers + 1) if num_layers % d == 0]
        raise ConfigError(f"parallel.pp={parallel.pp} does not divide the model's "
                          f"num_hidden_layers={num_layers}; choose parallel.pp from {fits}")


# ---------------------------------------------------------------------------------------------
# loading


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> RunConfig:
    """Read YAML (optional), apply ``a.b=value`` overrides, type-check and validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"--config {path}: no such file; give the run's YAML "
                                    "(see examples/configs)")
        raw = _load_yaml(Path(path).read_text(), str(path)) or {}
        if not isinstance(raw, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    return from_dict(RunConfig, raw).validate()


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set ``a.b.c=value`` in a nested dict; the value is parsed as YAML (so 3, 1e-6, true, null work)."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value, e.g. rollout.group_size=8")
    key, _, text = item.partition("=")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
    node[parts[-1]] = _load_yaml(text, f"override {item!r}") if text.strip() else ""


def _load_yaml(text: str, where: str) -> Any:
    """YAML -> Python; a syntax error is a ConfigError naming the file (or override), line and column."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f":{mark.line + 1}:{mark.column + 1}" if mark is not None else ""
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise ConfigError(f"{where}{line}: not valid YAML ({problem}); fix the syntax there (indentation, a "
                          "':' after each key, quotes around values holding ':' or '#')") from None


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types by name."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - names)
    if unknown:
        import difflib

        hints_text = []
        for key in unknown:
            close = difflib.get_close_matches(key, names, n=1)
            hints_text.append(f"{prefix}{key}" + (f" (did you mean {prefix}{close[0]}?)" if close else ""))
        raise ConfigError(f"unknown config key(s): {', '.join(hints_text)}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    values = {name: _coerce(hints[name], raw[name], prefix + name) for name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, field: str) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, field + ".")
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(option, value, field)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{field}: {value!r} matches none of {options}")
    if origin is Literal:
        choices = typing.get_args(hint)
        if isinstance(value, bool) and ("off" in choices or "on" in choices):
            value = "on" if value else "off"  # YAML 1.1 reads a bare `off` as false
        if value not in choices:
            raise ConfigError(f"{field}={value!r} is not one of {list(choices)}")
        return value
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{field}={value!r} must be a mapping, e.g. {{name: value}}")
        key_hint, value_hint = typing.get_args(hint)
        return {_coerce(key_hint, k, f"{field} key"): _coerce(value_hint, v, f"{field}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{field}={value!r} must be a list, e.g. [a, b]")
        (item_hint,) = typing.get_args(hint)
        return [_coerce(item_hint, item, f"{field}[{i}]") for i, item in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{field}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{field}={value!r} must be an integer")
        return value
    if hint is float:
        if isinstance(value, str):
            try:
                value = float(value)  # YAML 1.1 reads "1e-6" as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{field}={value!r} must be a finite number")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{field}={value!r} must be a string (quote it in YAML)")
        return value
    raise TypeError(f"config field {field} has an unsupported type {hint}")  # programmer error


def _check_sampling(section: str, temperature: float, top_p: float, top_k: int, example: str,
                    greedy: bool = False) -> None:
    """Ranges every sampler accepts (temperature 0, greedy, where `greedy`): a bad value fails here, not in
    step 1's generate call."""
    if greedy:
        _check(temperature >= 0, f"{section}.temperature", temperature, f"use >= 0 ({example})")
    else:
        _check(temperature > 0, f"{section}.temperature", temperature, f"use a temperature > 0 ({example})")
    _check(0 < top_p <= 1, f"{section}.top_p", top_p, "use 0 < top_p <= 1 (1: off)")
    _check(top_k == -1 or top_k >= 1, f"{section}.top_k", top_k, "use -1 (off) or k >= 1")


def _check(ok: bool, field: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{field}={value!r} is invalid: {fix}")


def to_dict(config: Any) -> dict[str, Any]:
    """Plain nested dict (for run directories and checkpoints)."""
    return dataclasses.asdict(config)


def to_yaml(config: RunConfig) -> str:
    """The whole config, every default filled in, in field order: loads back with load_config."""
    return yaml.safe_dump(to_dict(config), sort_keys=False)
