"""Start SGLang 0.5.23 servers and an sglang-router as subprocesses, for tests, demos and one-node runs.

Each process gets a free port on 127.0.0.1 (unless told otherwise), its own session (so stopping it
also stops the scheduler and detokenizer processes SGLang forks), a log file, a startup timeout, an
optional hard lifetime (coreutils ``timeout``, so even a SIGKILLed parent cannot leak a server), and an
atexit hook. Clusters launch servers themselves (tools/launch_sglang.sh) and only use the client.

SGLang runs from its own virtual environment (tools/sglang_cpu/setup_venv.sh, found through
$S2L_SGLANG_VENV or ~/.cache/megatron-s2l/sglang-0.5.23). Without CUDA the launcher adds what SGLang
needs on a CPU: our placeholder ``sgl_kernel`` first on PYTHONPATH, SGLANG_USE_CPU_ENGINE=1, torch_native
attention, no overlap scheduler, one torch thread, and a small KV pool (SGLang would otherwise size it
from free RAM: ~15 GB and 40 s of allocation for a tiny model). On every device servers get
``--sleep-on-idle``: an idle SGLang scheduler otherwise keeps a CPU core busy polling, and the learner
replica idles through every update. ``wait=False`` plus ``wait_ready`` start several side by side.
"""

from __future__ import annotations

import atexit
import dataclasses
import os
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import httpx
import torch

from megatron_s2l.config import RolloutConfig
from megatron_s2l.platform import free_port

VENV_ENV = "S2L_SGLANG_VENV"
DEFAULT_VENV = Path.home() / ".cache" / "megatron-s2l" / "sglang-0.5.23"
SGL_KERNEL_STUB = Path(__file__).resolve().parents[2] / "tools" / "sglang_cpu" / "sgl_kernel_stub"
_live: set["ServerHandle"] = set()


def sglang_venv() -> Path:
    return Path(os.environ.get(VENV_ENV) or DEFAULT_VENV)


def sglang_python() -> Optional[Path]:
    """The SGLang venv's python if setup_venv.sh has completed there, else None."""
    venv = sglang_venv()
    python = venv / "bin" / "python"
    return python if python.exists() and any(venv.glob(".s2l-sglang-ready-*")) else None


def _require_python(python: Optional[str | Path]) -> str:
    found = python or sglang_python()
    if found is None:
        raise FileNotFoundError(f"no SGLang venv at {sglang_venv()}: run "
                                f"`bash tools/sglang_cpu/setup_venv.sh` (or set {VENV_ENV} to a venv with "
                                "sglang==0.5.23)")
    return str(found)


@dataclasses.dataclass(eq=False)
class ServerHandle:
    """A running SGLang server or router; ``stop()`` (or leaving a ``with`` block) ends it."""

    url: str
    port: int
    process: subprocess.Popen
    log_path: Path
    ready_path: str = "/health"
    startup_timeout_s: float = 300.0
    api_key: str = ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def log_tail(self, num_lines: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-num_lines:])
        except OSError:
            return "(no log)"

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM the leader (SGLang then shuts its children down and unlinks most of its shared
        memory; a session-wide SIGTERM leaks more), then SIGKILL whatever is left in the session."""
        _live.discard(self)
        if self.alive():
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()

    def wait_ready(self) -> None:
        """Poll ``ready_path`` until it answers 200; stop the process and raise with its log on failure."""
        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        deadline = time.monotonic() + self.startup_timeout_s
        while time.monotonic() < deadline:
            if not self.alive():
                self.stop()
                raise RuntimeError(f"{self.url} exited with code {self.process.returncode} during startup; "
                                   f"log {self.log_path}:\n{self.log_tail()}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=5.0, headers=headers).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(1.0)
        self.stop()
        raise TimeoutError(f"{self.url}{self.ready_path} not ready after {self.startup_timeout_s:.0f}s (a "
                           f"CPU server needs 20-60 s; raise startup_timeout_s on a busy machine); log "
                           f"{self.log_path}:\n{self.log_tail()}")

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@atexit.register
def _stop_all() -> None:
    for handle in list(_live):
        handle.stop(timeout_s=5.0)


def _cpu_env() -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(SGL_KERNEL_STUB), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, "SGLANG_USE_CPU_ENGINE": "1", "OMP_NUM_THREADS": "1"}


def _start(cmd: list[str], port: int, name: str, env: dict[str, str], log_dir: Optional[Path],
           max_lifetime_s: Optional[float], **readiness) -> ServerHandle:
    if max_lifetime_s:
        # --foreground: on expiry only the server gets SIGTERM, so it can shut down its own children
        cmd = ["timeout", "--foreground", "--kill-after=10", str(int(max_lifetime_s)), *cmd]
    log_dir = Path(log_dir or tempfile.mkdtemp(prefix="s2l-sglang-"))
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}-{port}.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                   env={**os.environ, **env}, start_new_session=True)
    handle = ServerHandle(url=f"http://127.0.0.1:{port}", port=port, process=process, log_path=log_path,
                          **readiness)
    _live.add(handle)
    return handle


def wait_ready(*handles: ServerHandle) -> None:
    """Wait for processes launched with ``wait=False``. Starting several side by side and then waiting
    saves time: most of a startup is one core's Python imports. On a failure every one is stopped."""
    try:
        for handle in handles:
            handle.wait_ready()
    except BaseException:
        for handle in handles:
            handle.stop()
        raise


def launch_server(model_path: str | Path, port: Optional[int] = None, *, device: Optional[str] = None,
                  dtype: str = "auto", api_key: str = "", max_total_tokens: Optional[int] = None,
                  extra_args: Sequence[str] = (), python: Optional[str | Path] = None,
                  log_dir: Optional[Path] = None, startup_timeout_s: float = 300.0,
                  max_lifetime_s: Optional[float] = None, wait: bool = True,
                  mem_fraction_static: Optional[float] = None) -> ServerHandle:
    """Start ``sglang.launch_server`` for an HF checkpoint and (unless ``wait=False``; then call
    ``wait_ready``) wait until it answers /health. ``mem_fraction_static``: the GPU memory share SGLang
    takes for weights and KV cache (its default assumes the GPU is its own, not shared with a learner)."""
    port = port or free_port()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cmd = [_require_python(python), "-m", "sglang.launch_server", "--model-path", str(model_path),
           "--host", "127.0.0.1", "--port", str(port), "--device", device, "--dtype", dtype,
           "--sleep-on-idle"]
    env: dict[str, str] = {}
    if device == "cpu":
        cmd += ["--attention-backend", "torch_native", "--disable-overlap-schedule"]
        max_total_tokens = max_total_tokens or 16384
        env = _cpu_env()
    if max_total_tokens:
        cmd += ["--max-total-tokens", str(max_total_tokens)]
    if mem_fraction_static is not None:
        cmd += ["--mem-fraction-static", str(mem_fraction_static)]
    if api_key:
        cmd += ["--api-key", api_key]
    handle = _start([*cmd, *extra_args], port, "sglang", env, log_dir, max_lifetime_s, ready_path="/health",
                    startup_timeout_s=startup_timeout_s, api_key=api_key)
    if wait:
        wait_ready(handle)
    return handle


def launch_router(worker_urls: Sequence[str], port: Optional[int] = None, *, policy: str = "round_robin",
                  extra_args: Sequence[str] = (), python: Optional[str | Path] = None,
                  log_dir: Optional[Path] = None, startup_timeout_s: float = 120.0,
                  request_timeout_s: float = RolloutConfig.request_timeout_s,
                  max_lifetime_s: Optional[float] = None) -> ServerHandle:
    """Start sglang-router in front of running workers and wait until it reports them all healthy.
    `request_timeout_s` should match the trainer's rollout.request_timeout_s (the router's own default is
    1800 s, shorter than a long rollout step's queue)."""
    port = port or free_port()
    cmd = [_require_python(python), "-m", "sglang_router.launch_router", "--host", "127.0.0.1",
           "--port", str(port), "--policy", policy, "--prometheus-port", str(free_port()),
           "--request-timeout-secs", str(int(request_timeout_s)), "--worker-urls", *worker_urls, *extra_args]
    handle = _start(cmd, port, "router", {}, log_dir, max_lifetime_s, ready_path="/readiness",
                    startup_timeout_s=startup_timeout_s)
    wait_ready(handle)
    return handle
