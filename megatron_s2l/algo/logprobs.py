"""Per-token log-prob of the sampled token and entropy, vocab-parallel, without [T, V] fp32 logits.

Legend: T tokens (flattened), H hidden size, V vocab per TP rank (this rank's rows of the output layer).

The usual path materialises fp32 logits [T, V], a log-softmax of the same size, and their gradients;
with a 152k vocabulary that is the memory peak of a GRPO step. Here the output-layer matmul, the
log-softmax and the entropy are fused per chunk of tokens: the forward keeps only two fp32 numbers per
token (log Z and E_p[logit]); the backward recomputes each chunk's logits and turns them straight into
gradients for the hidden states and the output weight. Each TP rank reduces its vocab shard to four
numbers per token (max, sum of exp, sum of exp * logit, target logit); two all-reduces over [T]
vectors combine them exactly. On CUDA, Triton kernels (logprobs_triton.py) compute the forward's
statistics without holding any logits and each backward chunk's d loss / d logits in one pass; the
backward's matmuls are the same cuBLAS calls in both paths.

Math, with l = z / temperature the tempered logits of one token and p = softmax(l):
  logprob = l[target] - logZ,   entropy = logZ - sum_j p_j l_j
  d logprob / d l_j = 1[j = target] - p_j,   d entropy / d l_j = -p_j (l_j - sum_k p_k l_k)
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
import torch.distributed as dist

logger = logging.getLogger(__name__)


def _chunk_logits(hidden: torch.Tensor, weight: torch.Tensor, temperature: float,
                  out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Tempered fp32 logits for one chunk: [c, H] x [V, H]^T -> [c, V] (matmul in the model dtype). `out`: an
    fp32 buffer of at least c rows to write them into (fp32 models), reused from chunk to chunk: a fresh
    [c, V] tensor per chunk costs the allocator new pages each time."""
    if out is not None and hidden.dtype == torch.float32:
        logits = torch.matmul(hidden, weight.t(), out=out[:hidden.shape[0]])
    else:
        logits = torch.matmul(hidden, weight.t()).float()
    if temperature != 1.0:
        logits.div_(temperature)
    return logits


def _all_reduce(tensor: torch.Tensor, op, group) -> torch.Tensor:
    if group is not None and dist.get_world_size(group) > 1:
        dist.all_reduce(tensor, op=op, group=group)
    return tensor


def _local_stats_torch(hidden, weight, local_targets, in_shard, temperature, chunk_size):
    """Per-token statistics over this rank's vocab, chunk by chunk: max m, sum exp(l - m),
    sum exp(l - m) * l and the target's logit (0 where another rank owns the target), fp32 [T] each."""
    num_tokens = hidden.shape[0]
    stats = torch.zeros(4, num_tokens, dtype=torch.float32, device=hidden.device)  # [4, T]
    if weight.shape[0] == 0:
        stats[0] = -torch.inf
        return stats.unbind(0)
    logits_buffer, exp_buffer = _chunk_buffers(min(chunk_size, num_tokens), weight)
    for start in range(0, num_tokens, chunk_size):
        rows = slice(start, min(start + chunk_size, num_tokens))
        logits = _chunk_logits(hidden[rows], weight, temperature, out=logits_buffer)  # [c, V]
        shard_max = logits.max(dim=-1).values  # [c]
        picked = logits.gather(-1, local_targets[rows].clamp(min=0).unsqueeze(-1)).squeeze(-1)
        exp = torch.sub(logits, shard_max.unsqueeze(-1), out=exp_buffer[:logits.shape[0]]).exp_()  # [c, V]
        stats[0, rows] = shard_max
        stats[1, rows] = exp.sum(-1)
        stats[2, rows] = torch.bmm(exp.unsqueeze(1), logits.unsqueeze(2)).view(-1)  # sum exp(l - m) l
        stats[3, rows] = torch.where(in_shard[rows], picked, 0.0)
    return stats.unbind(0)


def _chunk_buffers(rows: int, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two fp32 [rows, V] buffers that every chunk reuses (logits, and exp / probs)."""
    return (torch.empty(rows, weight.shape[0], dtype=torch.float32, device=weight.device),
            torch.empty(rows, weight.shape[0], dtype=torch.float32, device=weight.device))


def _rescaled(part_max, sum_exp, sum_exp_l, overall_max):
    """One part of the vocabulary's sums of exp(l - part_max), re-expressed against the overall max
    (0 for a part with no vocabulary, whose max is -inf)."""
    rescale = torch.where(sum_exp > 0, (part_max - overall_max).exp(), 0.0)
    return sum_exp * rescale, sum_exp_l * rescale


def _merge_segments(part_max, sum_exp, sum_exp_l, picked):
    """The Triton forward's statistics per vocabulary segment, [segments, T] each -> this rank's, [T] each."""
    overall_max = part_max.max(dim=0).values
    sum_exp, sum_exp_l = _rescaled(part_max, sum_exp, sum_exp_l, overall_max)
    return overall_max, sum_exp.sum(0), sum_exp_l.sum(0), picked.sum(0)


def _combine_ranks(shard_max, sum_exp, sum_exp_l, picked, tp_group):
    """Exact log Z, E_p[l] and the target logit over the whole vocabulary: two all-reduces."""
    global_max = _all_reduce(shard_max.clone(), dist.ReduceOp.MAX, tp_group)  # [T]
    sums = torch.stack([*_rescaled(shard_max, sum_exp, sum_exp_l, global_max), picked])  # [3, T]
    _all_reduce(sums, dist.ReduceOp.SUM, tp_group)
    log_z = global_max + sums[0].log()
    return log_z, sums[1] / sums[0], sums[2]


_NO_GRADS = (None,) * 8  # for the forward's inputs after hidden and weight (targets, settings)
_TRITON_UNUSABLE: Optional[str] = None  # why the kernels failed to compile here; `auto` then stays on torch


def _run_triton(kernel_call, may_fall_back: bool):
    """The kernel call's result; None when it cannot compile on this GPU (too little shared memory, an
    unsupported architecture) and `auto` chose Triton: the caller then takes the torch path, from now on."""
    from megatron_s2l.algo import logprobs_triton  # lazy: triton (only on some machines)

    global _TRITON_UNUSABLE
    try:
        return kernel_call()
    except logprobs_triton.COMPILE_ERRORS as error:
        if not may_fall_back:
            raise
        _TRITON_UNUSABLE = f"{type(error).__name__}: {error}"
        logger.warning("the Triton log-prob kernels cannot run on this GPU (%s); using the chunked torch "
                       "path (set algorithm.logprob_impl=torch to skip the attempt)", _TRITON_UNUSABLE)
        return None


class _FusedLogProbs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, vocab_start, tp_group, chunk_size, use_triton,
                may_fall_back, reduce_hidden_grad):
        # hidden [T, H], weight [V, H] (valid rows only), targets [T] global ids
        local_targets = targets - vocab_start  # [T]
        in_shard = (local_targets >= 0) & (local_targets < weight.shape[0])  # [T]
        local_targets = torch.where(in_shard, local_targets, -1)
        stats = None
        if use_triton:
            from megatron_s2l.algo import logprobs_triton  # lazy: triton (only on some machines)

            segments = _run_triton(lambda: logprobs_triton.forward_segments(hidden, weight, local_targets.int(),
                                                                            temperature), may_fall_back)
            stats = None if segments is None else _merge_segments(*segments)
        if stats is None:
            use_triton = False
            stats = _local_stats_torch(hidden, weight, local_targets, in_shard, temperature, chunk_size)
        log_z, mean_logit, target_logit = _combine_ranks(*stats, tp_group)
        ctx.save_for_backward(hidden, weight, local_targets, in_shard, log_z, mean_logit)
        ctx.temperature, ctx.chunk_size, ctx.use_triton = temperature, chunk_size, use_triton
        ctx.may_fall_back = may_fall_back
        ctx.hidden_grad_group = tp_group if reduce_hidden_grad else None
        ctx.set_materialize_grads(False)
        return target_logit - log_z, log_z - mean_logit

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, local_targets, in_shard, log_z, mean_logit = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_hidden = torch.zeros_like(hidden) if need_hidden else None
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_weight else None
        num_tokens, use_triton = hidden.shape[0], ctx.use_triton
        buffers = None if use_triton else _chunk_buffers(min(ctx.chunk_size, num_tokens), weight)
        for start in range(0, num_tokens, ctx.chunk_size):
            rows = slice(start, min(start + ctx.chunk_size, num_tokens))
            g_logprob = None if grad_logprobs is None else grad_logprobs[rows].float()
            g_entropy = None if grad_entropy is None else grad_entropy[rows].float()
            grad_logits = None  # d loss / d (hidden @ weight.T), [c, V] in the weight's dtype
            if use_triton:  # one kernel; it recomputes the logits tile by tile
                from megatron_s2l.algo import logprobs_triton  # lazy: triton (only on some machines)

                zeros = torch.zeros_like(log_z[rows])
                grad_logits = _run_triton(lambda: logprobs_triton.grad_logits(
                    hidden[rows], weight, local_targets[rows].int(), log_z[rows], mean_logit[rows],
                    zeros if g_logprob is None else g_logprob.contiguous(),
                    zeros if g_entropy is None else g_entropy.contiguous(), ctx.temperature), ctx.may_fall_back)
                use_triton = grad_logits is not None  # after a compile failure: torch for the rest
            if grad_logits is None:
                buffers = buffers or _chunk_buffers(min(ctx.chunk_size, num_tokens), weight)
                logits = _chunk_logits(hidden[rows], weight, ctx.temperature, out=buffers[0])
                grad_logits = _chunk_grad_logits(logits, log_z[rows], mean_logit[rows], g_logprob, g_entropy,
                                                 local_targets[rows].clamp(min=0), in_shard[rows],
                                                 out=buffers[1][:logits.shape[0]])  # [c, V]
                if ctx.temperature != 1.0:
                    grad_logits.div_(ctx.temperature)  # l = z / temperature
                grad_logits = grad_logits.to(weight.dtype)
            if need_hidden:
                torch.matmul(grad_logits, weight, out=grad_hidden[rows])
            if need_weight:  # accumulated in place: no [V, H] temporary per chunk
                if grad_logits.dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.t(), hidden[rows])
                else:
                    grad_weight.add_(torch.matmul(grad_logits.t(), hidden[rows]).float())
        if need_hidden:  # every TP rank holds part of the vocab: sum the partial input gradients
            _all_reduce(grad_hidden, dist.ReduceOp.SUM, ctx.hidden_grad_group)
        if need_weight:
            grad_weight = grad_weight.to(weight.dtype)
        return (grad_hidden, grad_weight, *_NO_GRADS)


def _chunk_grad_logits(logits, log_z, mean_logit, g_logprob, g_entropy, targets, in_shard, out=None):
    """d loss / d l for one chunk, in place over two [c, V] buffers (`logits` and `out`, a fresh one if None):
    p * -(g_lp + g_ent (l - E[l])), plus g_lp at the target."""
    probs = torch.sub(logits, log_z.unsqueeze(-1), out=out).exp_()  # [c, V]
    if g_entropy is not None:
        coefficient = logits.sub_(mean_logit.unsqueeze(-1)).mul_(-g_entropy.unsqueeze(-1))  # -g_ent (l - E)
        if g_logprob is not None:
            coefficient.sub_(g_logprob.unsqueeze(-1))
        grad = probs.mul_(coefficient)
    elif g_logprob is not None:
        grad = probs.mul_(-g_logprob.unsqueeze(-1))
    else:
        grad = probs.zero_()
    if g_logprob is not None:
        rows = in_shard.nonzero().squeeze(-1)
        grad[rows, targets[rows]] += g_logprob[rows]
    return grad


def vocab_parallel_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    vocab_start: int = 0,
    vocab_size: Optional[int] = None,
    tp_group=None,
    chunk_size: int = 1024,
    impl: str = "auto",
    reduce_hidden_grad: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-prob of `targets` and entropy under softmax(hidden @ weight.T / temperature).

    hidden [T, H] is replicated across TP ranks; weight [V, H] is this rank's vocab shard starting at
    global id `vocab_start`; rows at global ids >= `vocab_size` (vocab padding) are left out of the
    softmax. Returns fp32 (logprobs [T], entropy [T]); both are differentiable with respect to hidden
    and weight (the entropy term costs nothing when its gradient is not needed).
    `impl`: "torch" (chunked), "triton" (fused kernels, logprobs_triton.py) or "auto" (triton on CUDA,
    torch where the kernels do not compile).
    `reduce_hidden_grad`: all-reduce hidden's gradient over `tp_group` (each rank's is partial); False when
    the caller reduces it (sequence parallelism: the gather of hidden reduce-scatters it in backward).
    """
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"expected hidden [T, H] and targets [T], got {tuple(hidden.shape)} and "
                         f"{tuple(targets.shape)}")
    if vocab_size is not None:
        valid_rows = max(0, min(weight.shape[0], vocab_size - vocab_start))
        weight = weight[:valid_rows]
    if impl not in ("auto", "torch", "triton"):
        raise ValueError(f"algorithm.logprob_impl={impl!r}: use auto, torch or triton")
    use_triton = impl == "triton" or (impl == "auto" and _auto_picks_triton(hidden))
    return _FusedLogProbs.apply(hidden.contiguous(), weight.contiguous(), targets, float(temperature),
                                int(vocab_start), tp_group, int(chunk_size), use_triton, impl == "auto",
                                reduce_hidden_grad)


def _auto_picks_triton(hidden: torch.Tensor) -> bool:
    return hidden.is_cuda and _TRITON_UNUSABLE is None and _have_triton()


def _have_triton() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
