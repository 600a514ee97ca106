"""GRPO update throughput of the Megatron-Core learner: tokens/s and MFU, BF16 and FP8 side by side.

A Qwen3-1.7B-shaped learner (random weights) on one GPU runs the real update path (old log-probs,
reference log-probs, forward/backward with the fused log-prob loss, optimizer step) on a synthetic batch.
MFU counts 6 x parameters x tokens plus attention (12 x layers x hidden x seq^2 per sequence) against the
device's dense peak. Each precision runs in its own process. Prints one JSON line.

    python benchmarks/bench_grpo_update.py --json                 # GPU: BF16 and FP8
    python benchmarks/bench_grpo_update.py --json --shape tiny    # a CPU smoke run of the same path
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time

import torch
from common import in_fresh_process  # benchmarks/ is the script's directory

SHAPES = {
    "qwen3-1.7b": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                       num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True),
    "tiny": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=32, vocab_size=1024, tie_word_embeddings=True),
}
PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense BF16


def _peak(name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in name), None)


def run_precision(precision: str, args: argparse.Namespace, model_dir: str) -> dict:
    from megatron_s2l import platform
    from megatron_s2l.config import load_config
    from megatron_s2l.train.batch import TrainBatch
    from megatron_s2l.train.learner import build_learner

    platform.init_distributed(1, 1)
    on_gpu = torch.cuda.is_available()
    overrides = {"model.dtype": "bfloat16" if on_gpu else "float32", "explorer.mode": "off",
                 "parallel.micro_batch_size": args.micro_batch_size, "rollout.prompts_per_step": args.sequences,
                 "rollout.group_size": 1, "rollout.max_response_length": args.seq_len, "optimizer.lr": 1e-6}
    if precision == "fp8":
        overrides |= {"model.fp8.recipe": "delayed", "model.transformer_impl": "transformer_engine"}
    cfg = load_config(None, [f"{k}={v}" for k, v in overrides.items()])
    learner = build_learner(cfg, model_dir)
    gen = torch.Generator().manual_seed(0)
    vocab = SHAPES[args.shape]["vocab_size"]
    mask = torch.zeros(args.sequences, args.seq_len, dtype=torch.bool)
    mask[:, args.seq_len // 4:] = True  # a quarter prompt, three quarters response
    batch = TrainBatch(tokens=torch.randint(0, vocab, (args.sequences, args.seq_len), generator=gen),
                       response_mask=mask, advantages=torch.randn(args.sequences, generator=gen),
                       source=torch.ones(args.sequences, dtype=torch.long),
                       behaviour_logprobs=torch.zeros(args.sequences, args.seq_len))
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
    params = learner.args.num_parameters
    shape = SHAPES[args.shape]
    tokens = args.sequences * args.seq_len
    # forward+backward (6N per token) + two forward-only passes (2N each) + attention
    attention = 12 * shape["num_hidden_layers"] * shape["hidden_size"] * args.seq_len * tokens
    flops = (6 + 2 + 2) * params * tokens + attention * (10 / 6)
    peak = _peak(torch.cuda.get_device_name()) if on_gpu else None
    platform.destroy_distributed()
    return {"precision": precision, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "tflops": round(flops / seconds / 1e12, 2), "mfu": round(flops / seconds / 1e12 / peak, 4) if peak else None,
            "peak_memory_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2) if on_gpu else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="qwen3-1.7b" if torch.cuda.is_available() else "tiny")
    parser.add_argument("--sequences", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    args = parser.parse_args()
    if args.shape == "tiny":
        args.sequences, args.seq_len, args.micro_batch_size = min(args.sequences, 8), min(args.seq_len, 64), 4

    from transformers import AutoModelForCausalLM, Qwen3Config

    model_dir = tempfile.mkdtemp(prefix="bench_update_")
    AutoModelForCausalLM.from_config(Qwen3Config(**SHAPES[args.shape])).to(torch.bfloat16).save_pretrained(model_dir)
    results = {"bf16": in_fresh_process(run_precision, "bf16", args, model_dir)}
    have_te = torch.cuda.is_available() and __import__("importlib").util.find_spec("transformer_engine")
    if have_te:
        results["fp8"] = in_fresh_process(run_precision, "fp8", args, model_dir)
        results["fp8_speedup_vs_bf16"] = round(results["bf16"]["seconds"] / results["fp8"]["seconds"], 3)
    print(json.dumps({"benchmark": "grpo_update", "shape": args.shape, "sequences": args.sequences,
                      "seq_len": args.seq_len, "device": torch.cuda.get_device_name() if torch.cuda.is_available()
                      else "cpu (fp32: the 'bf16' entry is the default precision of this device)", **results}))
    shutil.rmtree(model_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
