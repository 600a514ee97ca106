"""Fused vocab-parallel log-probs and entropy against a plain fp64 computation (TP=1 here; TP=2 in
tests/dist/test_logprobs_dist.py)."""

from __future__ import annotations

import pytest
import torch

from megatron_s2l.algo.logprobs import vocab_parallel_logprobs


def make_case(tokens=29, hidden=24, vocab=101, padded=104, temperature=0.7, seed=0) -> dict:
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(padded, hidden, generator=gen, dtype=torch.float64) * 0.5
    weight[vocab:] = 0.0  # vocab padding rows
    return {"hidden": torch.randn(tokens, hidden, generator=gen, dtype=torch.float64),
            "weight": weight, "targets": torch.randint(0, vocab, (tokens,), generator=gen),
            "g_logprobs": torch.randn(tokens, generator=gen, dtype=torch.float64),
            "g_entropy": torch.randn(tokens, generator=gen, dtype=torch.float64),
            "temperature": temperature, "vocab_size": vocab}


def reference(case: dict) -> dict:
    """Plain fp64: full logits, log-softmax over the real vocabulary, autograd gradients."""
    hidden = case["hidden"].clone().requires_grad_()
    weight = case["weight"].clone().requires_grad_()
    logits = (hidden @ weight[: case["vocab_size"]].t()) / case["temperature"]
    logp = torch.log_softmax(logits, dim=-1)
    logprobs = logp.gather(-1, case["targets"].unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1)
    (logprobs * case["g_logprobs"] + entropy * case["g_entropy"]).sum().backward()
    return {"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad_hidden": hidden.grad,
            "grad_weight": weight.grad}


def assert_close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float = 1e-5) -> None:
    error = (actual.double() - expected).abs().max().item()
    scale = expected.abs().max().item()
    assert error <= rel * scale, f"max error {error:.3g} > {rel} x {scale:.3g}"


@pytest.mark.parametrize("temperature,chunk", [(1.0, 7), (0.7, 5), (1.3, 1024)])
def test_logprobs_entropy_and_grads_match_fp64(temperature, chunk):
    case = make_case(temperature=temperature)
    expected = reference(case)
    hidden = case["hidden"].float().requires_grad_()
    weight = case["weight"].float().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs(hidden, weight, case["targets"], temperature=temperature,
                                                vocab_size=case["vocab_size"], chunk_size=chunk)
    assert logprobs.dtype == entropy.dtype == torch.float32
    (logprobs * case["g_logprobs"].float() + entropy * case["g_entropy"].float()).sum().backward()
    assert_close_relative(logprobs, expected["logprobs"])
    assert_close_relative(entropy, expected["entropy"])
    assert_close_relative(hidden.grad, expected["grad_hidden"])
    assert_close_relative(weight.grad, expected["grad_weight"])
    assert weight.grad[case["vocab_size"]:].abs().max() == 0  # padding rows get no gradient


def test_entropy_gradient_is_optional():
    case = make_case()
    hidden = case["hidden"].float().requires_grad_()
    weight = case["weight"].float().requires_grad_()
    logprobs, _ = vocab_parallel_logprobs(hidden, weight, case["targets"], temperature=0.7,
                                          vocab_size=case["vocab_size"])
    (logprobs * case["g_logprobs"].float()).sum().backward()
    expected = reference(dict(case, g_entropy=torch.zeros_like(case["g_entropy"])))
    assert_close_relative(hidden.grad, expected["grad_hidden"])
    assert_close_relative(weight.grad, expected["grad_weight"])


def test_bfloat16_inputs_give_fp32_outputs_close_to_reference():
    case = make_case(temperature=1.0)
    expected = reference(case)
    logprobs, entropy = vocab_parallel_logprobs(case["hidden"].bfloat16(), case["weight"].bfloat16(),
                                                case["targets"], vocab_size=case["vocab_size"])
    assert logprobs.dtype == torch.float32
    assert (logprobs.double() - expected["logprobs"]).abs().max() < 0.1  # bf16 matmul rounding


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"expected hidden \[T, H\]"):
        vocab_parallel_logprobs(torch.zeros(2, 3, 4), torch.zeros(5, 4), torch.zeros(2, dtype=torch.long))


def test_auto_falls_back_to_torch_where_the_triton_kernels_do_not_compile(monkeypatch, caplog):
    """A GPU with too little shared memory (say) must not stop training under `auto`; asking for
    `triton` explicitly still fails loudly."""
    from triton.runtime.errors import OutOfResources

    from megatron_s2l.algo import logprobs, logprobs_triton

    attempts = []

    def no_room(*args, **kwargs):
        attempts.append(1)
        raise OutOfResources(required=300000, limit=232448, name="shared memory")

    monkeypatch.setattr(logprobs_triton, "forward_segments", no_room)
    monkeypatch.setattr(logprobs, "_TRITON_UNUSABLE", None)
    monkeypatch.setattr(logprobs, "_auto_picks_triton", lambda hidden: logprobs._TRITON_UNUSABLE is None)
    case = make_case()
    expected = reference(case)
    for _ in range(2):
        hidden = case["hidden"].float().requires_grad_()
        logprobs_out, _ = vocab_parallel_logprobs(hidden, case["weight"].float(), case["targets"], temperature=0.7,
                                                  vocab_size=case["vocab_size"], impl="auto")
        assert_close_relative(logprobs_out, expected["logprobs"])
    assert attempts == [1]  # tried once, then remembered
    assert "cannot run on this GPU" in caplog.text and "shared memory" in caplog.text
    with pytest.raises(OutOfResources):
        vocab_parallel_logprobs(case["hidden"].float(), case["weight"].float(), case["targets"], temperature=0.7,
                                vocab_size=case["vocab_size"], impl="triton")
