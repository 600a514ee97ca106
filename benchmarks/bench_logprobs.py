"""Log-prob + entropy + backward: materialised fp32 logits vs the fused path (on CUDA: the Triton
kernels, and the chunked torch path too), side by side.

Each variant runs in its own fresh process so peak memory is comparable: on CPU the peak is the
growth of the process's maximum resident set during the measured step; on CUDA it is
torch.cuda.max_memory_allocated above the inputs. Prints one JSON line.

    python benchmarks/bench_logprobs.py --json                       # CPU default: 4096 x 1024, V=151936/8
    python benchmarks/bench_logprobs.py --json --device cuda --tp 1  # full vocabulary on one GPU
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time

import torch
from common import in_fresh_process  # benchmarks/ is the script's directory


def materialized(hidden, weight, targets, temperature):
    """The common approach: fp32 logits [T, V], log-softmax, gather, entropy from the same tensors."""
    logits = (hidden @ weight.t()).float() / temperature  # [T, V]
    logp = torch.log_softmax(logits, dim=-1)  # [T, V]
    entropy = -(logp.exp() * logp).sum(-1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1), entropy


def fused(hidden, weight, targets, temperature, chunk_size, impl):
    from megatron_s2l.algo.logprobs import vocab_parallel_logprobs

    return vocab_parallel_logprobs(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                   impl=impl)


def _peak_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def run_variant(name: str, args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    dtype = getattr(torch, args.dtype)
    vocab = args.vocab // args.tp
    hidden = (0.05 * torch.randn(args.tokens, args.hidden, device=args.device, dtype=dtype)).requires_grad_()
    weight = (0.05 * torch.randn(vocab, args.hidden, device=args.device, dtype=dtype)).requires_grad_()
    targets = torch.randint(0, vocab, (args.tokens,), device=args.device)
    g_lp, g_ent = torch.randn(args.tokens, device=args.device), torch.randn(args.tokens, device=args.device)

    def step():
        if name == "materialized":
            logprobs, entropy = materialized(hidden, weight, targets, args.temperature)
        else:
            impl = "torch" if name == "fused_torch" else "auto"  # auto: the Triton kernels on CUDA
            logprobs, entropy = fused(hidden, weight, targets, args.temperature, args.chunk_size, impl)
        (logprobs * g_lp + entropy * g_ent).sum().backward()
        hidden.grad = weight.grad = None

    if args.device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = _peak_bytes(args.device)
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        if args.device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return {"seconds": min(times), "peak_bytes": max(_peak_bytes(args.device) - base, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, default=151936, help="full vocabulary (Qwen3: 151936)")
    parser.add_argument("--tp", type=int, default=8, help="the vocabulary per rank is vocab / tp")
    parser.add_argument("--chunk-size", type=int, default=512)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="default: bfloat16 on CUDA, else float32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="the fastest of this many steps counts")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    args = parser.parse_args()
    args.dtype = args.dtype or ("bfloat16" if args.device == "cuda" else "float32")

    theirs, ours = in_fresh_process(run_variant, "materialized", args), in_fresh_process(run_variant, "fused", args)
    report = {
        "benchmark": "logprobs_entropy_fwd_bwd",
        "shape": {"tokens": args.tokens, "hidden": args.hidden, "vocab_per_rank": args.vocab // args.tp,
                  "tp": args.tp, "chunk_size": args.chunk_size, "dtype": args.dtype},
        "device": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu",
        "threads": args.threads,
        "materialized": theirs,
        "fused": ours,
        "peak_memory_ratio_vs_materialized": round(theirs["peak_bytes"] / ours["peak_bytes"], 2),
        "time_ratio_vs_materialized": round(ours["seconds"] / theirs["seconds"], 3),
    }
    if args.device == "cuda":  # "fused" ran the Triton kernels; the chunked torch path beside them
        chunked = report["fused_torch"] = in_fresh_process(run_variant, "fused_torch", args)
        report["triton_time_ratio_vs_torch_chunked"] = round(ours["seconds"] / chunked["seconds"], 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
