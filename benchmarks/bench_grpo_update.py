"""GRPO update throughput of the Megatron-Core learner: tokens/s and MFU, BF16 and FP8 side by side.

A Qwen3-1.7B-shaped learner (random weights) on one GPU runs the real update path (old log-probs,
reference log-probs, forward/backward with the fused log-prob loss, optimizer step) on a synthetic batch.
MFU counts the model FLOPs the trainer logs as perf/mfu (megatron_s2l/metrics/perf.py: 6 x parameters x
real tokens for forward + backward, 2 more per forward-only pass, attention, the output layer over response
tokens only) against the device's dense BF16 peak. Each variant runs in its own process. Prints one JSON
line.

    python benchmarks/bench_grpo_update.py --json                 # GPU: BF16 and FP8
    python benchmarks/bench_grpo_update.py --json --shape tiny    # a CPU smoke run of the same path
    python benchmarks/bench_grpo_update.py --json --lengths longtail   # parallel.length_grouping on vs off
    python benchmarks/bench_grpo_update.py --json --lengths longtail --micro-batch-tokens 16384

`--lengths longtail` draws response lengths as RL on reasoning tends to produce them (most short, a few
at the limit) and compares length-grouped, trimmed micro-batches with batch-order ones at full padding;
with `--micro-batch-tokens` it adds micro-batches filled up to that many tokens (parallel.micro_batch_tokens).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import tempfile
import time

import torch
from common import in_fresh_process, synthetic_batch  # benchmarks/ is the script's directory

SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, tie_word_embeddings=True),
}


def run_variant(precision: str, grouping: bool, micro_batch_tokens: int, args: argparse.Namespace,
                model_dir: str) -> dict:
    from megatron_s2l import platform
    from megatron_s2l.config import load_config
    from megatron_s2l.metrics import perf
    from megatron_s2l.train.learner import build_learner

    platform.init_distributed(1, 1)
    on_gpu = torch.cuda.is_available()
    overrides = {"model.dtype": "bfloat16" if on_gpu else "float32", "explorer.mode": "off",
                 "parallel.micro_batch_size": args.micro_batch_size, "rollout.prompts_per_step": args.sequences,
                 "rollout.group_size": 1, "rollout.max_response_length": args.seq_len, "optimizer.lr": 1e-6,
                 "parallel.length_grouping": grouping, "parallel.micro_batch_tokens": micro_batch_tokens}
    if precision == "fp8":
        overrides |= {"model.fp8.recipe": "delayed", "model.transformer_impl": "transformer_engine"}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    learner = build_learner(cfg, model_dir)
    batch = synthetic_batch(args.sequences, args.seq_len, SHAPES[args.shape]["vocab_size"], args.lengths)
    timings = []
    for _ in range(args.repeats + 1):  # the first is warm-up
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        plan = learner.plan(batch)
        learner.compute_logprobs(plan)
        learner.compute_logprobs(plan, reference=True)
        learner.train_step(plan)
        if on_gpu:
            torch.cuda.synchronize()
        timings.append(time.perf_counter() - start)
    seconds = min(timings[1:])
    tokens = int(batch.lengths().sum())  # real tokens; padding is not useful work
    throughput = perf.throughput_metrics(learner.update_flops(batch), seconds, learner.device)
    platform.destroy_distributed()
    return {"precision": precision, "length_grouping": grouping, "micro_batch_tokens": micro_batch_tokens,
            "micro_batches": sum(len(micro_batches) for micro_batches in plan), "seconds": round(seconds, 3),
            "tokens_per_s": round(tokens / seconds, 1),
            "tflops": round(throughput["perf/tflops_per_gpu"], 2),
            "mfu": round(throughput["perf/mfu"], 4) if "perf/mfu" in throughput else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES),
                        default="qwen3-1.7b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--sequences", type=int, help="default: 32 (tiny: 8)")
    parser.add_argument("--seq-len", type=int, help="default: 2048 (tiny: 64)")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--micro-batch-tokens", type=int, default=0,
                        help="with --lengths longtail: also run micro-batches of up to this many tokens")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--lengths", choices=["full", "longtail"], default="full",
                        help="response lengths: all at the limit, or long-tailed (compares length grouping)")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    args = parser.parse_args()
    tiny = args.shape == "tiny"
    args.sequences = args.sequences or (8 if tiny else 32)
    args.seq_len = args.seq_len or (64 if tiny else 2048)

    from transformers import AutoModelForCausalLM, Qwen3Config

    model_dir = tempfile.mkdtemp(prefix="bench_update_")
    AutoModelForCausalLM.from_config(Qwen3Config(**SHAPES[args.shape])).to(torch.bfloat16).save_pretrained(model_dir)
    results = {}

    def variant(name: str, *settings) -> None:
        """One measurement; a failure (say, out of memory) is recorded and the other variants still run."""
        try:
            results[name] = in_fresh_process(run_variant, *settings, args, model_dir)
        except (RuntimeError, TimeoutError) as error:
            results[name] = {"error": str(error)}

    def ratio(name: str, slower: str, faster: str) -> None:
        if "seconds" in results[slower] and "seconds" in results[faster]:
            results[name] = round(results[slower]["seconds"] / results[faster]["seconds"], 3)

    variant("bf16", "bf16", True, 0)
    if args.lengths == "longtail":
        variant("bf16_batch_order", "bf16", False, 0)
        ratio("length_grouping_speedup", "bf16_batch_order", "bf16")
        if args.micro_batch_tokens:
            variant("bf16_token_budget", "bf16", True, args.micro_batch_tokens)
            ratio("token_budget_speedup", "bf16", "bf16_token_budget")
    if torch.cuda.is_available() and importlib.util.find_spec("transformer_engine"):
        variant("fp8", "fp8", True, 0)
        ratio("fp8_speedup_vs_bf16", "bf16", "fp8")
    else:
        results["fp8"] = "skipped: needs Transformer Engine on CUDA (the NGC container)"
    print(json.dumps({"benchmark": "grpo_update", "shape": args.shape, "sequences": args.sequences,
                      "seq_len": args.seq_len, "lengths": args.lengths,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                      else "cpu (fp32: the 'bf16' entry is the default precision of this device)", **results}))
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
