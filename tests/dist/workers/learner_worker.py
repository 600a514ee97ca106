"""torchrun worker: two learner updates on a fixed batch at a given layout.

argv: HF_DIR OUT_DIR TP PP MICRO_BATCH_SIZE DISTRIBUTED_OPTIMIZER(0|1) MINI_BATCHES_PER_STEP
      SEQUENCE_PARALLEL(0|1) MICRO_BATCH_TOKENS FULL_RECOMPUTE(0|1)
Rank 0 writes OUT_DIR/metrics.json (per update), OUT_DIR/layout.json (what megatron-core ran, every rank's micro-batches) and
OUT_DIR/params.safetensors (HF names, after).
Adam with a huge eps and lr makes each update ~ -gradient, so the parameters compare gradients.
"""

import dataclasses
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist


def main():
    from safetensors.torch import save_file

    from megatron_s2l import platform
    from megatron_s2l.model import convert
    from megatron_s2l.train.learner import build_learner
    from megatron_s2l.train.memory_budget import learner_memory_budget
    from tests.learner_fixtures import fixed_batch, learner_config, measured_learner_bytes

    hf_dir, out_dir = sys.argv[1], Path(sys.argv[2])
    tp, pp, mbs, distopt, mini, sp, tokens, recompute = map(int, sys.argv[3:11])
    platform.init_distributed(tp, pp)
    cfg = learner_config(**{"parallel.tp": tp, "parallel.pp": pp, "parallel.micro_batch_size": mbs,
                            "parallel.use_distributed_optimizer": bool(distopt),
                            "parallel.sequence_parallel": bool(sp), "parallel.micro_batch_tokens": tokens,
                            "parallel.recompute": "full" if recompute else "off",
                            "optimizer.lr": 1e3,
                            "optimizer.mini_batches_per_step": mini, "rollout.prompts_per_step": 16,
                            "optimizer.adam_eps": 1e3, "optimizer.weight_decay": 0.0, "optimizer.grad_clip": 0.0,
                            "algorithm.entropy_coef": 0.01, "algorithm.kl_coef": 0.05})
    learner = build_learner(cfg, hf_dir)
    batch = fixed_batch(num_sequences=16, seq_len=26)  # at 26 the data-parallel ranks' token budgets differ
    history = []
    for _ in range(2):
        plan = learner.plan(batch)
        learner.compute_logprobs(plan)
        learner.compute_logprobs(plan, reference=True)
        history.append(learner.train_step(plan))
    params = dict(convert.iter_hf_tensors(learner.model, learner.args))
    budget = dataclasses.asdict(learner_memory_budget(learner))
    micro_batches_by_rank = [None] * dist.get_world_size()
    dist.all_gather_object(micro_batches_by_rank, [len(micro_batches) for micro_batches in plan])
    if dist.get_rank() == 0:
        (out_dir / "metrics.json").write_text(json.dumps(history))
        ran = {"sequence_parallel": learner.model.config.sequence_parallel,
               "recompute": learner.model.config.recompute_granularity,
               "micro_batches_by_rank": micro_batches_by_rank,
               "memory_budget": budget, "memory_measured": measured_learner_bytes(learner)}
        (out_dir / "layout.json").write_text(json.dumps(ran))
        save_file({k: v.contiguous() for k, v in params.items()}, str(out_dir / "params.safetensors"))
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
