"""Triton kernels for the fused log-prob/entropy (the GPU path behind ``vocab_parallel_logprobs``).

Legend: T tokens, D hidden size, V vocab rows on this TP rank; BT/BV/BD tile sizes.

Unlike the torch path, which still holds a [chunk, V] fp32 tile, these kernels never leave registers:
the forward walks the vocabulary in BV-wide tiles with an online log-sum-exp (running max m, sum of
exp(l - m), sum of exp(l - m) * l and the target's logit); the backward recomputes each tile's logits,
turns them into d loss / d logits and accumulates d hidden (rows owned by the program, no races) and
d weight (fp32 atomics, shared by all token blocks). Cross-rank combination stays in Python, as in the
torch path. Runs on CUDA; tests also run it on CPU under TRITON_INTERPRET=1.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                 BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    """fp32 tile l = (h[rows] @ w[cols].T) * inv_temp, [BT, BV]."""
    acc = tl.zeros((BT, BV), dtype=tl.float32)
    for d0 in range(0, D, BD):
        ds = d0 + tl.arange(0, BD)
        d_ok = ds < D
        h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :], other=0.0)
        acc += tl.dot(h, tl.trans(w), out_dtype=tl.float32)
    return acc * inv_temp


@triton.jit
def _forward_kernel(h_ptr, w_ptr, tgt_ptr, m_ptr, s_ptr, e_ptr, t_ptr, T, V, D, stride_h, stride_w, inv_temp,
                    BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)  # local id, -1 when another rank owns it
    m = tl.full((BT,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BT,), dtype=tl.float32)
    e = tl.zeros((BT,), dtype=tl.float32)
    picked = tl.zeros((BT,), dtype=tl.float32)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < V
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                              BT, BV, BD)
        logits = tl.where(col_ok[None, :], logits, float("-inf"))
        m_new = tl.maximum(m, tl.max(logits, axis=1))
        rescale = tl.exp(m - m_new)
        p = tl.exp(logits - m_new[:, None])
        s = s * rescale + tl.sum(p, axis=1)
        e = e * rescale + tl.sum(p * tl.where(col_ok[None, :], logits, 0.0), axis=1)
        picked += tl.sum(tl.where(cols[None, :] == target[:, None], logits, 0.0), axis=1)
        m = m_new
    tl.store(m_ptr + rows, m, mask=row_ok)
    tl.store(s_ptr + rows, s, mask=row_ok)
    tl.store(e_ptr + rows, e, mask=row_ok)
    tl.store(t_ptr + rows, picked, mask=row_ok)


@triton.jit
def _backward_kernel(h_ptr, w_ptr, tgt_ptr, logz_ptr, mean_ptr, glp_ptr, gent_ptr, dh_ptr, dw_ptr,
                     T, V, D, stride_h, stride_w, inv_temp,
                     BT: tl.constexpr, BV: tl.constexpr, BD: tl.constexpr):
    rows = tl.program_id(0) * BT + tl.arange(0, BT)
    row_ok = rows < T
    target = tl.load(tgt_ptr + rows, mask=row_ok, other=-1)
    log_z = tl.load(logz_ptr + rows, mask=row_ok, other=0.0)
    mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
    g_lp = tl.load(glp_ptr + rows, mask=row_ok, other=0.0)
    g_ent = tl.load(gent_ptr + rows, mask=row_ok, other=0.0)
    for v0 in range(0, V, BV):
        cols = v0 + tl.arange(0, BV)
        col_ok = cols < V
        logits = _logits_tile(h_ptr, w_ptr, rows, cols, row_ok, col_ok, D, stride_h, stride_w, inv_temp,
                              BT, BV, BD)
        p = tl.exp(logits - log_z[:, None])
        onehot = tl.where(cols[None, :] == target[:, None], 1.0, 0.0)
        grad = g_lp[:, None] * (onehot - p) - g_ent[:, None] * p * (logits - mean[:, None])
        grad = tl.where(col_ok[None, :] & row_ok[:, None], grad * inv_temp, 0.0)  # d loss / d (h @ w.T)
        for d0 in range(0, D, BD):
            ds = d0 + tl.arange(0, BD)
            d_ok = ds < D
            w = tl.load(w_ptr + cols[:, None] * stride_w + ds[None, :], mask=col_ok[:, None] & d_ok[None, :],
                        other=0.0)
            h = tl.load(h_ptr + rows[:, None] * stride_h + ds[None, :], mask=row_ok[:, None] & d_ok[None, :],
                        other=0.0)
            dh_tile = dh_ptr + rows[:, None] * D + ds[None, :]
            dh_mask = row_ok[:, None] & d_ok[None, :]
            update = tl.dot(grad.to(w.dtype), w, out_dtype=tl.float32)
            tl.store(dh_tile, tl.load(dh_tile, mask=dh_mask, other=0.0) + update, mask=dh_mask)
            dw = tl.dot(tl.trans(grad.to(h.dtype)), h, out_dtype=tl.float32)
            tl.atomic_add(dw_ptr + cols[:, None] * D + ds[None, :], dw, mask=col_ok[:, None] & d_ok[None, :])


BLOCKS = dict(BT=64, BV=128, BD=64)


def forward_stats(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor, temperature: float
                  ) -> tuple[torch.Tensor, ...]:
    """Per-token (max, sum exp, sum exp * logit, target logit) over this rank's vocab, fp32 [T] each."""
    num_tokens, dim = hidden.shape
    out = [torch.empty(num_tokens, dtype=torch.float32, device=hidden.device) for _ in range(4)]
    grid = (triton.cdiv(num_tokens, BLOCKS["BT"]),)
    _forward_kernel[grid](hidden, weight, local_targets, *out, num_tokens, weight.shape[0], dim,
                          hidden.stride(0), weight.stride(0), 1.0 / temperature, **BLOCKS)
    return tuple(out)


def backward_grads(hidden: torch.Tensor, weight: torch.Tensor, local_targets: torch.Tensor, log_z: torch.Tensor,
                   mean_logit: torch.Tensor, g_logprob: torch.Tensor, g_entropy: torch.Tensor, temperature: float
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 d hidden (this rank's partial sum) and d weight."""
    num_tokens, dim = hidden.shape
    grad_hidden = torch.zeros(num_tokens, dim, dtype=torch.float32, device=hidden.device)
    grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
    grid = (triton.cdiv(num_tokens, BLOCKS["BT"]),)
    _backward_kernel[grid](hidden, weight, local_targets, log_z, mean_logit, g_logprob, g_entropy, grad_hidden,
                           grad_weight, num_tokens, weight.shape[0], dim, hidden.stride(0), weight.stride(0),
                           1.0 / temperature, **BLOCKS)
    return grad_hidden, grad_weight
