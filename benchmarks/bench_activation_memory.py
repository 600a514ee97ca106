"""Activation memory of one learner update per TP rank: plain TP, + sequence parallelism, + full recompute.

Counts the bytes the model's forward keeps for backward (tensors saved for autograd, parameters excluded)
on TP rank 0 while the learner runs one micro-batch through its real update (megatron-core model, fused
log-prob loss), the update's seconds, and on CUDA the peak allocated memory. Each setting runs under its
own torchrun (TP ranks, gloo on CPU, NCCL on GPU). Prints one JSON line.

    python benchmarks/bench_activation_memory.py --json               # TP=2 on CPU in ~2 min
    python benchmarks/bench_activation_memory.py --json --tp 8 --seq-len 4096 --sequences 4   # GPU node
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import synthetic_batch  # benchmarks/ is the script's directory

SETTINGS = {"sp_off": dict(sp=False, recompute="off"), "sp_on": dict(sp=True, recompute="off"),
            "sp_on_recompute": dict(sp=True, recompute="full")}
SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, head_dim=64, vocab_size=8192, tie_word_embeddings=True)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: build the learner, run one update inside a saved-tensor counter."""
    from megatron_s2l import platform
    from megatron_s2l.config import load_config
    from megatron_s2l.model.convert import unwrap
    from megatron_s2l.train.learner import build_learner
    from tests.utils import forward_saved_bytes

    platform.init_distributed(args.tp, 1)
    on_gpu = torch.cuda.is_available()
    overrides = {"model.dtype": "bfloat16" if on_gpu else "float32", "explorer.mode": "off",
                 "parallel.tp": args.tp, "parallel.sequence_parallel": SETTINGS[args.setting]["sp"],
                 "parallel.recompute": SETTINGS[args.setting]["recompute"],
                 "parallel.micro_batch_size": args.sequences, "rollout.prompts_per_step": args.sequences,
                 "rollout.group_size": 1, "rollout.max_response_length": args.seq_len}
    learner = build_learner(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), args.model_dir)
    plan = learner.plan(synthetic_batch(args.sequences, args.seq_len, SHAPE["vocab_size"]))
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)

    if on_gpu:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    with forward_saved_bytes(unwrap(learner.model)) as saved:
        metrics = learner.train_step(plan)
    seconds = time.perf_counter() - start  # train_step ends on host values: the device is done
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "saved_activation_bytes": sum(saved.values()), "loss": metrics["loss/total"],
            "update_seconds": round(seconds, 3),
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None}))
    platform.destroy_distributed()


def run_setting(args: argparse.Namespace, model_dir: str, setting: str, out: Path) -> dict:
    from megatron_s2l.platform import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.tp),
               "--master-port", str(free_port()), __file__, "--worker", "--model-dir", model_dir,
               "--out", str(out), "--setting", setting, "--tp", str(args.tp),
               "--sequences", str(args.sequences), "--seq-len", str(args.seq_len)]
    from tests.utils import subprocess_env

    env = subprocess_env()  # one torch thread, the repository importable ahead of PYTHONPATH
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"{setting} run failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=2, help="sequences in the one micro-batch")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per torchrun")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--setting", choices=sorted(SETTINGS), help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from transformers import AutoModelForCausalLM, Qwen3Config

    work = Path(tempfile.mkdtemp(prefix="bench_activations_"))
    try:
        AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE)).save_pretrained(work / "model")
        results = {name: run_setting(args, str(work / "model"), name, work / f"{name}.json") for name in SETTINGS}
    finally:
        shutil.rmtree(work, ignore_errors=True)

    def ratio(numerator: str, denominator: str, key: str) -> float:
        return round(results[numerator][key] / results[denominator][key], 3)

    print(json.dumps({"benchmark": "activation_memory", "tp": args.tp, "sequences": args.sequences,
                      "seq_len": args.seq_len, "shape": SHAPE,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", **results,
                      "sequence_parallel_memory_ratio": ratio("sp_off", "sp_on", "saved_activation_bytes"),
                      "recompute_memory_ratio": ratio("sp_on", "sp_on_recompute", "saved_activation_bytes"),
                      "recompute_time_ratio": ratio("sp_on_recompute", "sp_on", "update_seconds")}))


if __name__ == "__main__":
    main()
