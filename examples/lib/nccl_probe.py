"""Prints "nccl VERSION LIBRARY" for the NCCL this python's torch loads (LIBRARY "-" if linked in).

examples/lib/launch.sh asks both the trainer's and the SGLang servers' python, because the weight broadcast
joins them in one NCCL group and NCCL refuses a peer of another version. Needs no GPU.
"""
import torch

version = ".".join(map(str, torch.cuda.nccl.version()))
libraries = [line.split()[-1] for line in open("/proc/self/maps") if "/libnccl" in line]
print("nccl", version, libraries[0] if libraries else "-")
