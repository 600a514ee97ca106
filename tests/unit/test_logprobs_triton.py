"""The Triton log-prob kernels: against fp64 on CPU under TRITON_INTERPRET=1, and compiled ahead of time for
Hopper, Ada and Ampere GPUs (on CUDA: tests/gpu)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tests.utils import REPO

SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
from megatron_s2l.algo import logprobs_triton
from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
from tests.unit.test_logprobs import assert_close_relative, make_case, reference
# tile-unaligned sizes, vocabulary padding, a temperature; the vocabulary in one segment or split in three
# (the last one empty: 150 rows = 2 tiles), the backward in one chunk or in three
original_segments = logprobs_triton._vocab_segments
for temperature, tokens, segments, chunk in ((1.0, 70, 1, 1024), (0.7, 33, 3, 16)):
    logprobs_triton._vocab_segments = lambda *shape, n=segments: n
    case = make_case(tokens=tokens, hidden=80, vocab=150, padded=160, temperature=temperature)
    expected = reference(case)
    hidden = case["hidden"].float().requires_grad_()
    weight = case["weight"].float().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs(hidden, weight, case["targets"], temperature=temperature,
                                                vocab_size=case["vocab_size"], impl="triton", chunk_size=chunk)
    (logprobs * case["g_logprobs"].float() + entropy * case["g_entropy"].float()).sum().backward()
    for actual, name in ((logprobs, "logprobs"), (entropy, "entropy"), (hidden.grad, "grad_hidden"),
                         (weight.grad, "grad_weight")):
        assert_close_relative(actual, expected[name])
logprobs_triton._vocab_segments = original_segments  # a micro-batch that scores no token at all
import torch
hidden, weight = torch.zeros(0, 80, requires_grad=True), torch.randn(160, 80, requires_grad=True)
logprobs, entropy = vocab_parallel_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long), temperature=1.0,
                                            vocab_size=150, impl="triton")
(logprobs.sum() + entropy.sum()).backward()
assert logprobs.shape == entropy.shape == (0,) and not weight.grad.any()
print("ok")
"""


def test_triton_kernels_match_fp64_in_interpreter_mode():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_triton_kernels_compile_for_hopper_ada_and_ampere(dtype):
    """The interpreter accepts code the GPU compiler rejects (and never checks shared memory): compile
    both kernels for sm_90, sm_89 and sm_80 ahead of time, with the ptxas Triton ships."""
    import inspect

    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, compile

    from megatron_s2l.algo import logprobs_triton

    if "constexprs" not in inspect.signature(ASTSource).parameters:
        pytest.skip("this Triton's ahead-of-time API predates ASTSource(constexprs=...)")
    pointer_types = {"h_ptr": f"*{dtype}", "w_ptr": f"*{dtype}", "g_ptr": f"*{dtype}", "tgt_ptr": "*i32"}
    for kernel in (logprobs_triton._forward_kernel, logprobs_triton._grad_logits_kernel):
        signature = {name: "constexpr" if name in ("BT", "BV", "BD", "PRECISION")
                     else pointer_types.get(name, "*fp32") if name.endswith("_ptr")
                     else "fp32" if name == "inv_temp" else "i32" for name in kernel.arg_names}
        constants = dict(logprobs_triton.BLOCKS, PRECISION="ieee" if dtype == "fp32" else "tf32")
        # H100/H200, L20/L40 (the paper's GPUs; the smallest shared memory), A100
        for capability, shared_memory_limit in ((90, 232448), (89, 101376), (80, 166912)):
            compiled = compile(ASTSource(fn=kernel, signature=signature, constexprs=constants),
                               target=GPUTarget("cuda", capability, 32), options={"num_warps": 4, "num_stages": 3})
            assert "ld.global" in compiled.asm["ptx"]
            assert compiled.metadata.shared <= shared_memory_limit, (kernel.__name__, capability)
