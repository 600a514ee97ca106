"""Triton kernels for the fused log-prob/entropy (the GPU path behind ``vocab_parallel_logprobs``).

Legend: T tokens, D hidden size, V vocab rows on this TP rank; BT/BV/BD tile sizes.

Forward: logits never leave registers. Each program takes BT tokens and one segment of the vocabulary,
walks it in BV-wide tiles with an online log-sum-exp (running max m, sum of exp(l - m), sum of
exp(l - m) * l, the target's logit) and writes these four numbers; logprobs.py combines the segments
exactly, as it combines the TP ranks. Splitting the vocabulary keeps every SM busy for short batches too.

Backward, per chunk of c tokens: one kernel recomputes each [BT, BV] logits tile and writes
d loss / d logits in the model dtype ([c, V], the only buffer of that size, as in the torch path); the
two big matmuls (d hidden = G W, d weight += G^T h) run in cuBLAS, not as atomics in the kernel.

Logits accumulate in fp32; fp32 inputs multiply in IEEE fp32 (Triton's default would be TF32).
Offsets are int64, so T x D and V x D may exceed 2^31. Runs on CUDA; tests also run it on CPU under
TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.compiler.errors import CompilationError
from triton.runtime.errors import OutOfResources

COMPILE_ERRORS = (CompilationError, OutOfResources)  # the kernels cannot run on this GPU


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                 BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """fp32 tile l = (h[rows] @ w[cols].T) * inv_temp, [BT, BV]."""
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_h
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_w
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        h = tl.load(h_rows + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_rows + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(h, tl.trans(w), input_precision=PRECISION, out_dtype=tl.float32)
    return acc * inv_temp


@triton.jit
def _forward_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, e_ptr, t_ptr, T, V, D, stride_h, stride_w, inv_temp,
                    segment, BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    first, last = tl.program_id(1) * segment, tl.minimum((tl.program_id(1) + 1) * segment, V)
    target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)  # local id, -1 when another rank owns it
    m = tl.full((BT,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BT,), dtype=tl.float32)
    e = tl.zeros((BT,), dtype=tl.float32)
    picked = tl.zeros((BT,), dtype=tl.float32)
    for v0 in range(first, last, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < last
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                              BT, BV, BD, PRECISION)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        s = s * rescale + tl.sum(p, axis=1)
        e = e * rescale + tl.sum(p * tl.where(col_ok[None, :], logits, 0.0), axis=1)
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
        m = m_new
    out = tl.program_id(1) * T + rows  # [segment, T] outputs
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(e_ptr + out, e, mask=row_ok)
    tl.store(t_ptr + out, picked, mask=row_ok)


@triton.jit
def _grad_logits_kernel(h_ptr, w_ptr, tgt_ptr, logz_ptr, mean_ptr, glp_ptr, gent_ptr, g_ptr,
                        T, V, D, stride_h, stride_w, inv_temp,
                        BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr, PRECISION: tl.constexpr):
    """G[rows, cols] = d loss / d (h @ w.T) = inv_temp * (g_lp (1[target] - p) - g_ent p (l - E[l]))."""
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    cols = tl.program_id(1) * BV + tl.arange(0, BV)
    row_ok, col_ok = rows < T, cols < V
    target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    log_z = tl.load(logz_ptr + rows, mask=row_ok, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                          BT, BV, BD, PRECISION)
    p = tl.exp(logits - log_z[:, None])
    onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
    grad = (g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (logits - mean[:, None])) * inv_temp
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(g_ptr + rows.to(tl.int64)[:, None] * V + cols[None, :], grad.to(g_ptr.dtype.element_ty), mask=ok)


BLOCKS = dict(BT=64, BV=128, BD=64)


def _precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # the latter is unused for bf16/fp16 inputs


def _vocab_segments(num_tokens: int, vocab: int, device: torch.device) -> int:
    """How many vocabulary segments the forward splits into: enough programs for ~4 per SM."""
    token_blocks = max(1, triton.cdiv(num_tokens, BLOCKS["BT"]))  # a micro-batch may score no token
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
    return max(1, min(triton.cdiv(vocab, BLOCKS["BV"]), triton.cdiv(4 * sms, token_blocks)))


def forward_segments(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor, temperature: float
                     ) -> torch.Tensor:
    """Per vocabulary segment and token: (max, sum exp, sum exp * logit, target logit), fp32 [4, segments, T]
    (logprobs.py merges the segments as it merges TP ranks)."""
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    segments = _vocab_segments(num_tokens, vocab, hidden.device)
    segment = triton.cdiv(triton.cdiv(max(vocab, 1), segments), BLOCKS["BV"]) * BLOCKS["BV"]
    parts = torch.empty(4, segments, num_tokens, dtype=torch.float32, device=hidden.device)
    grid = (triton.cdiv(num_tokens, BLOCKS["BT"]), segments)
    _forward_kernel[grid](hidden, weight, local_targets, *parts, num_tokens, vocab, dim, hidden.stride(0),
                          weight.stride(0), 1.0 / temperature, segment, **BLOCKS,
                          PRECISION=_precision(hidden.dtype))
    return parts


def grad_logits(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor, log_z: torch.Tensor,
                mean_logit: torch.Tensor, g_logprob: torch.Tensor, g_entropy: torch.Tensor, temperature: float
                ) -> torch.Tensor:
    """d loss / d (hidden @ weight.T) for one chunk of tokens, [c, V] in the weight's dtype."""
    num_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    out = torch.empty(num_tokens, vocab, dtype=weight.dtype, device=hidden.device)
    grid = (triton.cdiv(num_tokens, BLOCKS["BT"]), triton.cdiv(vocab, BLOCKS["BV"]))
    _grad_logits_kernel[grid](hidden, weight, local_targets, log_z, mean_logit, g_logprob, g_entropy, out,
                              num_tokens, vocab, dim, hidden.stride(0), weight.stride(0), 1.0 / temperature,
                              **BLOCKS, PRECISION=_precision(hidden.dtype))
    return out
