"""torchrun worker: the fused log-prob/entropy with the vocabulary split across TP ranks.

argv: IN_FILE OUT_FILE. IN_FILE holds hidden, full weight, targets, upstream grads, temperature,
vocab_size; rank 0 writes logprobs, entropy and the input/weight gradients (weight grads gathered).
"""

import sys

import torch
import torch.distributed as dist


def main():
    from megatron_s2l.algo.logprobs import vocab_parallel_logprobs

    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    rank, world = dist.get_rank(), dist.get_world_size()
    data = torch.load(sys.argv[1])
    shard_rows = data["weight"].shape[0] // world
    hidden = data["hidden"].clone().requires_grad_()
    weight = data["weight"][rank * shard_rows:(rank + 1) * shard_rows].clone().requires_grad_()
    logprobs, entropy = vocab_parallel_logprobs(
        hidden, weight, data["targets"], temperature=data["temperature"], vocab_start=rank * shard_rows,
        vocab_size=data["vocab_size"], tp_group=dist.group.WORLD, chunk_size=5)
    (logprobs * data["g_logprobs"] + entropy * data["g_entropy"]).sum().backward()
    grads = [torch.empty_like(weight.grad) for _ in range(world)]
    dist.all_gather(grads, weight.grad)
    if rank == 0:
        torch.save({"logprobs": logprobs.detach(), "entropy": entropy.detach(), "grad_hidden": hidden.grad,
                    "grad_weight": torch.cat(grads)}, sys.argv[2])
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
