"""Activation memory of one learner update per TP rank, sequence parallelism off vs on.

Counts the bytes autograd keeps for backward (tensors saved during the forward, parameters excluded) on
TP rank 0 while the learner runs one micro-batch through its real path (megatron-core model, fused
log-prob loss); on CUDA also the peak allocated memory. Each setting runs under its own torchrun (TP
ranks, gloo on CPU, NCCL on GPU). Prints one JSON line.

    python benchmarks/bench_sequence_parallel.py --json               # TP=2 on CPU in ~1 min
    python benchmarks/bench_sequence_parallel.py --json --tp 8 --seq-len 4096 --sequences 4   # GPU node
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import synthetic_batch  # benchmarks/ is the script's directory

SHAPE = dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, head_dim=64, vocab_size=8192, tie_word_embeddings=True)


def worker(args: argparse.Namespace) -> None:
    """One torchrun rank: build the learner, run one update inside a saved-tensor counter."""
    from megatron_s2l import platform
    from megatron_s2l.config import load_config
    from megatron_s2l.train.learner import build_learner

    platform.init_distributed(args.tp, 1)
    on_gpu = torch.cuda.is_available()
    overrides = {"model.dtype": "bfloat16" if on_gpu else "float32", "explorer.mode": "off",
                 "parallel.tp": args.tp, "parallel.sequence_parallel": bool(args.sp),
                 "parallel.micro_batch_size": args.sequences, "rollout.prompts_per_step": args.sequences,
                 "rollout.group_size": 1, "rollout.max_response_length": args.seq_len}
    learner = build_learner(load_config(None, [f"{k}={v}" for k, v in overrides.items()]), args.model_dir)
    plan = learner.plan(synthetic_batch(args.sequences, args.seq_len, SHAPE["vocab_size"]))
    learner.compute_logprobs(plan)
    learner.compute_logprobs(plan, reference=True)

    parameters = {p.untyped_storage().data_ptr() for p in learner.model.parameters()}
    saved: dict[int, int] = {}  # storage -> bytes; all of a forward's saved tensors live until its backward

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor):
        metrics = learner.train_step(plan)
    if torch.distributed.get_rank() == 0:
        Path(args.out).write_text(json.dumps({
            "saved_activation_bytes": sum(saved.values()), "loss": metrics["loss/total"],
            "peak_memory_bytes": torch.cuda.max_memory_allocated() if on_gpu else None}))
    platform.destroy_distributed()


def run_setting(args: argparse.Namespace, model_dir: str, sp: bool, out: Path) -> dict:
    from megatron_s2l.platform import free_port

    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(args.tp),
               "--master-port", str(free_port()), __file__, "--worker", "--model-dir", model_dir,
               "--out", str(out), "--sp", str(int(sp)), "--tp", str(args.tp),
               "--sequences", str(args.sequences), "--seq-len", str(args.seq_len)]
    from tests.utils import subprocess_env

    env = subprocess_env()  # one torch thread, the repository importable ahead of PYTHONPATH
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if done.returncode != 0:
        raise SystemExit(f"sequence_parallel={sp} run failed (rc={done.returncode}):\n{done.stderr[-4000:]}")
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--sequences", type=int, default=2, help="sequences in the one micro-batch")
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--timeout", type=int, default=900, help="seconds per torchrun")
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--sp", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)

    from transformers import AutoModelForCausalLM, Qwen3Config

    work = Path(tempfile.mkdtemp(prefix="bench_sp_"))
    try:
        AutoModelForCausalLM.from_config(Qwen3Config(**SHAPE)).save_pretrained(work / "model")
        results = {name: run_setting(args, str(work / "model"), sp, work / f"{name}.json")
                   for name, sp in (("sp_off", False), ("sp_on", True))}
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratio = results["sp_off"]["saved_activation_bytes"] / results["sp_on"]["saved_activation_bytes"]
    print(json.dumps({"benchmark": "sequence_parallel", "tp": args.tp, "sequences": args.sequences,
                      "seq_len": args.seq_len, "shape": SHAPE,
                      "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
                      **results, "activation_memory_ratio_off_vs_on": round(ratio, 3)}))


if __name__ == "__main__":
    main()
