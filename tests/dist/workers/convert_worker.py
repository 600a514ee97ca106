"""torchrun worker: HF -> Megatron at TP x PP; logits, resharded load, export and save.

argv: HF_DIR TP1_CKPT OUT_DIR TP PP
Writes (from the last pipeline stage, TP rank 0): OUT_DIR/logits_direct.pt, OUT_DIR/logits_resharded.pt;
(rank 0): OUT_DIR/export/ (HF safetensors streamed from the sharded model);
(collective): OUT_DIR/mcore/ (a dist checkpoint saved at this TP x PP).
"""

import sys
from functools import partial
from pathlib import Path

import torch


def forward_logits(model, ids: torch.Tensor, vocab_size: int):
    """Full-vocabulary logits through megatron-core's pipeline schedule (None off the last stage).
    Right padding to a multiple of TP (sequence parallelism splits the sequence) changes no earlier logit."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region

    seq_len, tp = ids.shape[1], parallel_state.get_tensor_model_parallel_world_size()
    ids = torch.nn.functional.pad(ids, (0, -seq_len % tp))

    def step(data_iterator, model):
        batch = next(data_iterator)
        positions = torch.arange(batch.shape[1]).expand_as(batch)
        output = model(batch, positions, None)
        return output, lambda out: (out.sum() * 0, {"logits": out.detach()})

    outputs = get_forward_backward_func()(
        forward_step_func=step, data_iterator=iter([ids[:1], ids[1:]]), model=[model],
        num_microbatches=2, seq_length=ids.shape[1], micro_batch_size=1, forward_only=True)
    if not parallel_state.is_pipeline_last_stage():
        return None
    logits = torch.cat([o["logits"] for o in outputs], dim=0)
    return gather_from_tensor_model_parallel_region(logits)[:, :seq_len, :vocab_size]


def main():
    hf_dir, tp1_ckpt, out_dir = map(Path, sys.argv[1:4])
    tp, pp = int(sys.argv[4]), int(sys.argv[5])
    from megatron.core import parallel_state

    from megatron_s2l import platform
    from megatron_s2l.config import ModelConfig, ParallelConfig
    from megatron_s2l.model import checkpoint_io, convert, specs

    platform.init_distributed(tp, pp)
    model_cfg, parallel = ModelConfig(dtype="float32"), ParallelConfig(tp=tp, pp=pp)
    ids = torch.load(out_dir / "ids.pt")
    hf = checkpoint_io.HFCheckpoint(hf_dir)
    args = specs.model_args_from_hf(hf.hf_config)

    direct = specs.build_gpt_model(args, model_cfg, parallel).eval()
    convert.load_hf_weights(direct, hf.get, args)
    resharded = specs.build_gpt_model(args, model_cfg, parallel).eval()
    checkpoint_io.load_megatron_checkpoint(resharded, tp1_ckpt, hf.hf_config)
    writer = parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0
    for tag, model in (("direct", direct), ("resharded", resharded)):
        logits = forward_logits(model, ids, args.vocab_size)
        if writer:
            torch.save(logits, out_dir / f"logits_{tag}.pt")

    tensors = convert.iter_hf_tensors(direct, args)
    if torch.distributed.get_rank() == 0:
        checkpoint_io.save_hf_checkpoint(tensors, out_dir / "export", hf.hf_config)
    else:
        for _ in tensors:
            pass
    checkpoint_io.save_megatron_checkpoint(direct, out_dir / "mcore", hf.hf_config, hf_assets_from=hf_dir)
    platform.destroy_distributed()


if __name__ == "__main__":
    main()
