"""The Triton log-prob kernels against fp64, on CPU under TRITON_INTERPRET=1 (on CUDA: tests/gpu)."""

from __future__ import annotations

import subprocess
import sys

from tests.utils import REPO

SCRIPT = """
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
from megatron_s2l.algo.logprobs import vocab_parallel_logprobs
from tests.unit.test_logprobs import assert_close_relative, make_case, reference
for temperature, tokens in ((1.0, 70), (0.7, 33)):
    # tile-unaligned sizes, vocabulary padding, a temperature
    case = make_case(tokens=tokens, hidden=80, vocab=150, padded=160, temperature=temperature)
    expected = reference(case)
    hidden = case["hidden"].float().requires_grad_()
    weight = case["weight"].float().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs(hidden, weight, case["targets"], temperature=temperature,
                                                vocab_size=case["vocab_size"], impl="triton")
    (logprobs * case["g_logprobs"].float() + entropy * case["g_entropy"].float()).sum().backward()
    for actual, name in ((logprobs, "logprobs"), (entropy, "entropy"), (hidden.grad, "grad_hidden"),
                         (weight.grad, "grad_weight")):
        assert_close_relative(actual, expected[name])
print("ok")
"""


def test_triton_kernels_match_fp64_in_interpreter_mode():
    result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=REPO, capture_output=True, text=True,
                            timeout=600, env={"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
