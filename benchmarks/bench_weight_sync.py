"""Weight sync from a Megatron-Core learner to rollout engines: seconds and GB/s per path, one run.

Paths: memory (LocalEngine in this process), disk (HF safetensors + reload), and, when the SGLang venv
exists (tools/sglang_cpu/setup_venv.sh, or a GPU install), SGLang tensor and distributed updates into a
real server. Every path includes streaming the HF-named tensors out of the Megatron model. Prints one
JSON line.

    python benchmarks/bench_weight_sync.py --json [--hidden 1024 --layers 8]
"""

from __future__ import annotations

import argparse
import json
import platform as host
import tempfile
from pathlib import Path
from types import SimpleNamespace

import torch
from common import REPO  # noqa: F401  benchmarks/ is the script's directory; common puts the repo on sys.path


def make_model_dir(out: Path, hidden: int, layers: int, vocab: int) -> Path:
    from transformers import AutoModelForCausalLM, Qwen3Config

    config = Qwen3Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=layers,
                         num_attention_heads=hidden // 128, num_key_value_heads=max(1, hidden // 512), head_dim=128,
                         max_position_embeddings=2048, tie_word_embeddings=False)
    AutoModelForCausalLM.from_config(config).float().save_pretrained(out)
    from tests.utils import qwen3_tokenizer_dir  # the real Qwen3 tokenizer (vocab 151936)

    for file in qwen3_tokenizer_dir().iterdir():
        (out / file.name).write_bytes(file.read_bytes())
    return out


def measure(sync, learner, version: str) -> dict:
    sync.sync(learner, version)  # warm-up (first-touch allocations, connections)
    metrics = sync.sync(learner, version + "b")
    return {"seconds": round(metrics["sync/seconds"], 3), "gigabytes": round(metrics["sync/gigabytes"], 3),
            "gb_per_s": round(metrics["sync/gb_per_s"], 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--json", action="store_true", help="print one JSON line (the default output)")
    args = parser.parse_args()

    from megatron_s2l import platform
    from megatron_s2l.config import ModelConfig, ParallelConfig
    from megatron_s2l.model import convert, specs
    from megatron_s2l.model.checkpoint_io import HFCheckpoint
    from megatron_s2l.rollout.local import build_local_engine
    from megatron_s2l.rollout.sglang_launch import sglang_python
    from megatron_s2l.rollout.runtime import RolloutRuntime
    from megatron_s2l.train.weight_sync import WeightSync

    work = Path(tempfile.mkdtemp(prefix="bench_sync_"))
    model_dir = make_model_dir(work / "model", args.hidden, args.layers, args.vocab)
    platform.init_distributed(1, 1)
    model_args = specs.model_args_from_hf(specs.load_hf_config(model_dir))
    gpt = specs.build_gpt_model(model_args, ModelConfig(dtype="float32"), ParallelConfig())
    convert.load_hf_weights(gpt, HFCheckpoint(model_dir).get, model_args)
    learner = SimpleNamespace(model=gpt, args=model_args)
    runtime = RolloutRuntime()
    results = {}

    local = build_local_engine(model_dir)
    for mode in ("memory", "disk"):
        results[mode] = measure(WeightSync(local, mode, runtime, torch.float32, work / "staging", model_dir),
                                learner, f"{mode}-1")
    if sglang_python() is not None:
        from megatron_s2l.rollout.sglang import SGLangEngine
        from megatron_s2l.rollout.sglang_launch import launch_server

        modes = ["tensor", "distributed"]
        if torch.cuda.is_available() and torch.cuda.device_count() == 1:
            modes.remove("distributed")
            results["sglang_distributed"] = "skipped: NCCL needs the learner and the server on different GPUs"
        on_gpu = {"mem_fraction_static": 0.3} if torch.cuda.is_available() else {}  # the learner shares it
        with launch_server(model_dir, dtype="float32", log_dir=work, **on_gpu) as server:
            for mode in modes:
                engine = SGLangEngine(server.url, update_mode=mode)
                results[f"sglang_{mode}"] = measure(WeightSync(engine, mode, runtime, torch.float32, work, model_dir),
                                                    learner, f"{mode}-1")
                runtime.run(engine.close())
    else:
        results["sglang"] = "skipped: no SGLang venv (run tools/sglang_cpu/setup_venv.sh)"
    print(json.dumps({"benchmark": "weight_sync", "device": "cuda" if torch.cuda.is_available() else "cpu",
                      "machine": host.machine(), "parameters": model_args.num_parameters,
                      "shape": {"hidden": args.hidden, "layers": args.layers, "vocab": args.vocab}, **results}))
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
