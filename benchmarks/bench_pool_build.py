"""Explorer-pool build from a real SGLang server: one chunk at a time vs several in flight, one run.

A chunk's requests end with its longest response, so with one chunk at a time the server decodes a
shrinking batch through every chunk's tail. The model is an untrained toy Qwen3 (character tokenizer): it
stops at a random EOS, so response lengths follow a long-tailed (geometric) law up to the cap, as RL
responses do. Needs the SGLang venv (tools/sglang_cpu/setup_venv.sh, or a GPU install). Prints one JSON line.

    python benchmarks/bench_pool_build.py --json [--prompts 96 --samples 8 --chunk-size 8 --in-flight 1 4]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import torch
from common import sglang_report  # benchmarks/ is the script's directory; common puts the repo on sys.path


def make_model_and_prompts(out: Path, max_new_tokens: int, num_prompts: int) -> tuple[Path, list]:
    """An untrained toy explorer, and toy addition prompts read by the data module as a run reads them."""
    from transformers import AutoModelForCausalLM, Qwen3Config

    from megatron_s2l import toy
    from megatron_s2l.config import DataConfig
    from megatron_s2l.data import load_prompts

    tokenizer = toy.build_tokenizer(out)
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=len(tokenizer), max_position_embeddings=64 + max_new_tokens,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                         **toy.TOY_SIZES["explorer"])
    AutoModelForCausalLM.from_config(config).save_pretrained(out)
    data = toy.write_dataset(out.parent / "prompts.jsonl", num_prompts, seed=0)
    return out, load_prompts(DataConfig(path=str(data), template="plain"), tokenizer)


def build_once(url: str, prompts, args, model_dir: Path, out: Path, in_flight: int) -> dict:
    from megatron_s2l.rollout.pool import CHUNKS, build_pool
    from megatron_s2l.rollout.sglang import SGLangEngine
    from megatron_s2l.rollout.types import SamplingParams

    engine = SGLangEngine(url, name="explorer")  # its HTTP client belongs to build_pool's event loop
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=1.0, top_p=1.0)
    start = time.perf_counter()
    build_pool(engine, prompts, args.samples, params, out, explorer_model=str(model_dir), tokenizer_dir=model_dir,
               chunk_size=args.chunk_size, chunks_in_flight=in_flight)
    seconds = time.perf_counter() - start
    lengths = [len(ids) for chunk in sorted((out / CHUNKS).glob("*.parquet"))
               for ids in pq.read_table(chunk, columns=["response_ids"]).column(0).to_pylist()]
    lengths.sort()
    return {"seconds": round(seconds, 2), "tokens_per_s": round(sum(lengths) / seconds, 1),
            "response_tokens": sum(lengths), "median_length": lengths[len(lengths) // 2],
            "at_cap": sum(n == args.max_new_tokens for n in lengths)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=96)
    parser.add_argument("--samples", type=int, default=8, help="explorer samples per prompt")
    parser.add_argument("--chunk-size", type=int, default=8, help="prompts per chunk")
    parser.add_argument("--max-new-tokens", type=int, default=192)
    parser.add_argument("--in-flight", type=int, nargs="+", default=[1, 4], help="chunks in flight to compare")
    parser.add_argument("--json", action="store_true", help="(the output is always one JSON line)")
    args = parser.parse_args()

    from megatron_s2l.rollout.sglang_launch import launch_server

    report = sglang_report("pool_build", prompts=args.prompts, samples=args.samples, chunk_size=args.chunk_size,
                           max_new_tokens=args.max_new_tokens)
    if report is None:
        return
    work = Path(tempfile.mkdtemp(prefix="bench_pool_"))
    model_dir, prompts = make_model_and_prompts(work / "model", args.max_new_tokens, args.prompts)
    # room for every sequence of the widest variant at once, so the KV cache is not what limits it
    capacity = max(args.in_flight) * args.chunk_size * args.samples * (64 + args.max_new_tokens)
    with launch_server(model_dir, dtype="float32", log_dir=work, max_total_tokens=capacity) as server:
        build_once(server.url, prompts[:args.chunk_size], args, model_dir, work / "warmup", 1)
        for in_flight in args.in_flight:
            report[f"in_flight_{in_flight}"] = build_once(server.url, prompts, args, model_dir,
                                                          work / f"pool_{in_flight}", in_flight)
    # tokens/s, not seconds: the server samples without a seed, so each build's responses differ in length
    base = report[f"in_flight_{args.in_flight[0]}"]["tokens_per_s"]
    for in_flight in args.in_flight[1:]:
        report[f"throughput_ratio_in_flight_{in_flight}"] = round(
            report[f"in_flight_{in_flight}"]["tokens_per_s"] / base, 3)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
