"""`examples/run_*.sh --dry-run`: the printed torchrun and SGLang commands agree with each other and the
overrides they pass make a valid config. With stand-in servers: how the launcher starts the rollout side,
waits for it and stops it."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys

import psutil
import pytest

from megatron_s2l.config import load_config
from tests.utils import REPO, free_port, free_port_pair, port_is_free, wait_for


def dry_run(script: str, **env) -> list[list[str]]:
    result = launcher(script, **env)
    assert result.returncode == 0, result.stderr
    return _commands(result.stdout)


def _commands(stdout: str) -> list[list[str]]:
    """The commands a --dry-run printed."""
    return [shlex.split(line[2:].split(" > ")[0].rstrip(" &")) for line in stdout.splitlines()
            if line.startswith("+ ") and not line.startswith("+ waiting")]


def launcher(script: str, runner: tuple[str, ...] = ("bash",), **env) -> subprocess.CompletedProcess:
    defaults = {"GPUS_PER_NODE": "8", "NNODES": "1", "POOL": "/nonexistent/pool"}
    clean = {k: v for k, v in os.environ.items() if k not in ("ROLE", "ROLLOUT_ADDR", "MASTER_ADDR")}
    return subprocess.run([*runner, f"examples/{script}", "--dry-run", "algorithm.kl_coef=0.002"], cwd=REPO,
                          capture_output=True, text=True, timeout=120, env={**clean, **defaults, **env})


def _train_config(commands: list[list[str]]):
    torchrun = next(c for c in commands if "torch.distributed.run" in c)
    config = torchrun[torchrun.index("--config") + 1]
    overrides = [arg for arg in torchrun[torchrun.index("--config") + 2:] if "=" in arg]
    return torchrun, load_config(config, overrides)  # the launcher's overrides make a valid config


def _flag(command: list[str], name: str) -> str:
    return command[command.index(name) + 1]


def _servers(commands: list[list[str]], model: str) -> list[list[str]]:
    return [c for c in commands if "sglang.launch_server" in c and _flag(c, "--model-path") == model]


def _worker_urls(router: list[str]) -> list[str]:
    after = router[router.index("--worker-urls") + 1:]
    return after[:next((i for i, arg in enumerate(after) if arg.startswith("--")), len(after))]


def _gpus(command: list[str]) -> set[str]:
    return set(next(a for a in command if a.startswith("CUDA_VISIBLE_DEVICES="))[21:].split(","))


@pytest.mark.parametrize("script,learner", [("run_s2l_8b.sh", "/models/Qwen3-8B-Base"),
                                            ("run_s2l_14b.sh", "/models/Qwen3-14B-Base"),
                                            ("run_grpo_8b.sh", "/models/Qwen3-8B-Base")])
def test_dry_run_commands_are_consistent(script, learner):
    commands = dry_run(script, ROLLOUT_GPUS="4", SGLANG_TP="2", ROUTER_PORT="31234", REPLICA_PORT="31300",
                       TP="2", PP="2", RECOMPUTE="full", FP8="tensorwise")
    torchrun, cfg = _train_config(commands)
    assert _flag(torchrun, "--nproc-per-node") == "4" and _gpus(torchrun) == {"0", "1", "2", "3"}
    # SIGTERM goes to the trainer, not torchrun (it would exit 1); a torchrun that acts on it anyway waits 600 s
    assert "PET_SIGNALS_TO_HANDLE=SIGHUP,SIGQUIT" in torchrun
    assert "TORCH_ELASTIC_SHUTDOWN_TIMEOUT=600" in torchrun
    assert (cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.recompute) == (2, 2, "full")
    assert cfg.model.fp8.recipe == "tensorwise"
    assert cfg.model.path == learner and cfg.algorithm.kl_coef == 0.002  # user overrides pass through
    # the learner replica: one server per SGLANG_TP GPUs (never --dp-size: SGLang's weight-update group
    # ranks by TP rank), on the rollout GPUs, behind a router; the trainer updates every server
    replicas = _servers(commands, learner)
    assert [_flag(c, "--port") for c in replicas] == ["31300", "31301"]
    assert all(_flag(c, "--tp") == "2" and _flag(c, "--dp-size") == "1" for c in replicas)
    assert all("--sleep-on-idle" in c for c in commands if "sglang.launch_server" in c)  # no core spinning
    assert _gpus(replicas[0]) | _gpus(replicas[1]) == {"4", "5", "6", "7"}
    assert not _gpus(replicas[0]) & _gpus(replicas[1])
    assert cfg.rollout.learner_url == "http://127.0.0.1:31234"
    assert cfg.rollout.learner_worker_urls == ["http://127.0.0.1:31300", "http://127.0.0.1:31301"]
    router = next(c for c in commands if "sglang_router.launch_router" in c)
    assert _flag(router, "--port") == "31234"
    assert _worker_urls(router) == cfg.rollout.learner_worker_urls
    assert float(_flag(router, "--request-timeout-secs")) == cfg.rollout.request_timeout_s  # both wait as long
    if cfg.explorer.mode == "pool":  # no manifest at POOL: the pool is built first from an explorer server
        build = next(c for c in commands if "pool" in c and "build" in c)
        explorer, = _servers(commands, cfg.explorer.model_path)
        assert _flag(build, "--explorer-url").endswith(_flag(explorer, "--port"))
        assert _gpus(explorer) == {"4", "5", "6", "7"}
        assert commands.index(explorer) < commands.index(build) < commands.index(replicas[0])
    else:
        assert not any("pool" in c for c in commands)
    assert commands.index(router) < commands.index(torchrun)


@pytest.mark.parametrize("status,builds", [(None, True), ("building", True), ("complete", False)])
def test_the_pool_is_built_or_finished_unless_it_is_complete(tmp_path, status, builds):
    """A pool build that ran out of time leaves its manifest ("building"); the next job must resume it, or the
    trainer would refuse the unfinished pool."""
    if status is not None:
        (tmp_path / "manifest.json").write_text(json.dumps({"status": status, "num_chunks": 3}, indent=2))
    commands = dry_run("run_s2l_8b.sh", POOL=str(tmp_path), PYTHON=sys.executable)
    assert any("pool" in c and "build" in c for c in commands) == builds
    assert len(_servers(commands, "/models/Qwen3-1.7B-Base")) == builds  # an explorer server for the build


def test_rollout_node_and_training_nodes_agree():
    layout = dict(ROLLOUT_GPUS="8", SGLANG_TP="2", EXPLORER_GPUS="2", ROLLOUT_ADDR="10.0.0.2")
    rollout = dry_run("run_s2l_8b.sh", ROLE="rollout", **layout)
    train = dry_run("run_s2l_8b.sh", ROLE="train", NNODES="2", NODE_RANK="1", MASTER_ADDR="10.0.0.3", **layout)
    assert not any("torch.distributed.run" in c for c in rollout)
    assert not any("sglang.launch_server" in c or "sglang_router.launch_router" in c for c in train)
    torchrun, cfg = _train_config(train)
    assert _flag(torchrun, "--nproc-per-node") == "8" and _flag(torchrun, "--node-rank") == "1"
    assert _flag(torchrun, "--master-addr") == "10.0.0.3"
    assert cfg.model.fp8 is None  # BF16 unless FP8 is set
    replicas = _servers(rollout, cfg.model.path)
    assert cfg.rollout.learner_worker_urls == [f"http://10.0.0.2:{_flag(c, '--port')}" for c in replicas]
    assert len(replicas) == 3 and cfg.rollout.learner_url == "http://10.0.0.2:30000"
    # EXPLORER_GPUS > 0: an online explorer on GPUs of its own instead of the offline pool
    explorer, = _servers(rollout, cfg.explorer.model_path)
    assert cfg.explorer.mode == "online" and cfg.explorer.url == f"http://10.0.0.2:{_flag(explorer, '--port')}"
    assert _gpus(explorer) == {"6", "7"} and not _gpus(explorer) & set().union(*map(_gpus, replicas))
    assert not any("pool" in c for c in rollout)


def test_two_rollout_nodes_share_one_router_and_the_trainer_updates_every_server():
    layout = dict(ROLLOUT_GPUS="4", SGLANG_TP="2", EXPLORER_GPUS="2", ROLLOUT_ADDR="10.0.0.2,10.0.0.3")
    head = dry_run("run_s2l_8b.sh", ROLE="rollout", ROLLOUT_RANK="0", **layout)
    other = dry_run("run_s2l_8b.sh", ROLE="rollout", ROLLOUT_RANK="1", **layout)
    train = dry_run("run_s2l_8b.sh", ROLE="train", MASTER_ADDR="10.0.0.4", **layout)
    _, cfg = _train_config(train)
    # node 0: the explorer on 2 GPUs, one replica on the other 2, the router; node 1: two replicas, nothing else
    assert len(_servers(head, cfg.model.path)) == 1 and len(_servers(head, cfg.explorer.model_path)) == 1
    assert len(_servers(other, cfg.model.path)) == 2 and not _servers(other, cfg.explorer.model_path)
    assert not any("sglang_router.launch_router" in c for c in other)
    assert set().union(*map(_gpus, _servers(other, cfg.model.path))) == {"0", "1", "2", "3"}
    assert cfg.rollout.learner_worker_urls == ["http://10.0.0.2:30100", "http://10.0.0.3:30100",
                                               "http://10.0.0.3:30101"]
    router = next(c for c in head if "sglang_router.launch_router" in c)
    assert _worker_urls(router) == cfg.rollout.learner_worker_urls
    assert cfg.rollout.learner_url == "http://10.0.0.2:30000" and cfg.explorer.url == "http://10.0.0.2:30001"


def test_training_nodes_wait_for_the_rollout_side_then_start_torchrun(tmp_path):
    port = free_port()
    env = {**os.environ, "ROLE": "train", "ROLLOUT_ADDR": "127.0.0.1", "ROLLOUT_GPUS": "1", "REPLICA_PORT": str(port),
           "GPUS_PER_NODE": "2", "RUN_DIR": str(tmp_path / "run"), "PYTHON": "echo"}  # echo: torchrun printed
    nobody = subprocess.run(["bash", "examples/run_s2l_8b.sh"], cwd=REPO, capture_output=True, text=True,
                            timeout=60, env={**env, "ROLLOUT_WAIT_MINUTES": "0"})
    assert nobody.returncode == 1 and f"rollout_side did not answer at http://127.0.0.1:{port}/health" in nobody.stderr
    assert "torch.distributed.run" not in nobody.stdout
    (tmp_path / "health").write_text("ok")  # a stand-in rollout side: /health answers 200
    server = subprocess.Popen([sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1"], cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        started = subprocess.run(["bash", "examples/run_s2l_8b.sh"], cwd=REPO, capture_output=True, text=True,
                                 timeout=120, env={**env, "ROLLOUT_WAIT_MINUTES": "1"})
    finally:
        server.kill()
        server.wait()
    assert started.returncode == 0, started.stderr
    assert "-m torch.distributed.run --nnodes 1" in started.stdout.splitlines()[-1]


FAKE_TORCH_PYTHON = """
# stands in for a python whose torch loads NCCL VERSION from LIB, answering the launcher's NCCL probe; a
# preloaded libnccl-X.so replaces it unless the build ignores LD_PRELOAD (as one with NCCL linked in would)
import os, re
version, lib, ignores_preload = {version!r}, {lib!r}, {ignores_preload!r}
preloaded = re.search(r"\\S*libnccl-([0-9.]+)\\.so", os.environ.get("LD_PRELOAD", ""))
if preloaded and not ignores_preload:
    version, lib = preloaded.group(1), preloaded.group(0)
print("nccl", version, lib)
"""


def _fake_torch_python(path, version: str, ignores_preload: bool = False) -> str:
    lib = f"{path}-lib/libnccl-{version}.so"
    path.write_text(f"#!{sys.executable}" + FAKE_TORCH_PYTHON.format(version=version, lib=lib,
                                                                     ignores_preload=ignores_preload))
    path.chmod(0o755)
    return lib


def _preloads(commands: list[list[str]]) -> tuple[set[str], set[str]]:
    """LD_PRELOAD values of the torchrun command and of the SGLang servers."""
    def preload(command):
        return next((arg.removeprefix("LD_PRELOAD=") for arg in command if arg.startswith("LD_PRELOAD=")), "")
    return ({preload(c) for c in commands if "torch.distributed.run" in c},
            {preload(c) for c in commands if "sglang.launch_server" in c})


@pytest.mark.parametrize("trainer,servers", [("2.27.7", "2.30.7"), ("2.30.7", "2.27.7"), ("2.30.7", "2.30.7")])
def test_the_trainer_and_the_servers_load_the_newer_of_their_nccl_versions(tmp_path, trainer, servers):
    trainer_lib = _fake_torch_python(tmp_path / "trainer_python", trainer)
    server_lib = _fake_torch_python(tmp_path / "sglang_python", servers)
    pythons = {"PYTHON": str(tmp_path / "trainer_python"), "SGLANG_PYTHON": str(tmp_path / "sglang_python")}
    result = launcher("run_s2l_8b.sh", **pythons)
    assert result.returncode == 0, result.stderr
    commands = _commands(result.stdout)
    if trainer < servers:
        assert _preloads(commands) == ({server_lib}, {""})
        assert f"NCCL {trainer} and the SGLang servers' {servers}; both load {servers}" in result.stderr
    elif trainer > servers:
        assert _preloads(commands) == ({""}, {trainer_lib})
    else:
        assert _preloads(commands) == ({""}, {""}) and "NCCL" not in result.stderr
    # disk sync, or NCCL_ALIGN=0, leaves them alone
    for env in ({"WEIGHT_SYNC": "disk"}, {"NCCL_ALIGN": "0"}):
        assert _preloads(dry_run("run_s2l_8b.sh", **pythons, **env)) == ({""}, {""})


def test_nccl_versions_that_cannot_be_aligned_stop_the_launch_with_the_fix(tmp_path):
    _fake_torch_python(tmp_path / "trainer_python", "2.27.7", ignores_preload=True)
    _fake_torch_python(tmp_path / "sglang_python", "2.30.7")
    result = launcher("run_s2l_8b.sh", PYTHON=str(tmp_path / "trainer_python"),
                      SGLANG_PYTHON=str(tmp_path / "sglang_python"))
    assert result.returncode == 2, result.stderr
    assert "loads NCCL 2.27.7 and the SGLang servers'" in result.stderr
    assert "Install one NCCL version for both, or use WEIGHT_SYNC=disk" in result.stderr
    assert "+ " not in result.stdout  # nothing was started


FAKE_SGLANG = """
# stands in for SGLang's python: notes its start, "loads" for LOAD_S seconds (or crashes at once on
# CRASH_PORT), then answers every GET with 200
import http.server, os, sys, time
port = int(sys.argv[sys.argv.index("--port") + 1])
with open(os.environ["STARTS"], "a") as starts:
    starts.write(f"{time.time()} {port} {os.getpid()}\\n")
if port == int(os.environ.get("CRASH_PORT", 0)):
    sys.exit("crashed while loading")
time.sleep(float(os.environ["LOAD_S"]))
class Ok(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
http.server.HTTPServer(("127.0.0.1", port), Ok).serve_forever()
"""


def _launch_with_fake_servers(tmp_path, load_s: int, crash_replica: int = -1):
    """run_s2l_8b.sh with an online explorer, two replicas and the router, all stand-ins; torchrun echoed.
    Returns the launcher's result, {port: (start time, pid)} of the stand-ins, and the first replica port."""
    fake = tmp_path / "fake_sglang_python"
    fake.write_text(f"#!{sys.executable}" + FAKE_SGLANG)
    fake.chmod(0o755)
    replica_port = free_port_pair()
    env = {**os.environ, "SGLANG_PYTHON": str(fake), "PYTHON": "echo", "STARTS": str(tmp_path / "starts"),
           "LOAD_S": str(load_s), "CRASH_PORT": str(replica_port + crash_replica if crash_replica >= 0 else 0),
           "RUN_DIR": str(tmp_path / "run"), "GPUS_PER_NODE": "4", "ROLLOUT_GPUS": "3", "EXPLORER_GPUS": "1",
           "SGLANG_TP": "1", "REPLICA_PORT": str(replica_port), "EXPLORER_PORT": str(free_port()),
           "ROUTER_PORT": str(free_port()), "STARTUP_MINUTES": "1", "EXPLORER": "/models/explorer",
           "LEARNER": "/models/learner"}
    result = subprocess.run(["bash", "examples/run_s2l_8b.sh"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env=env)
    lines = (tmp_path / "starts").read_text().splitlines()
    return result, {int(port): (float(t), int(pid)) for t, port, pid in map(str.split, lines)}, replica_port


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_explorer_replicas_and_router_start_side_by_side_and_stop_with_the_launcher(tmp_path):
    result, started, replica_port = _launch_with_fake_servers(tmp_path, load_s=3)
    assert result.returncode == 0, result.stderr
    assert "-m torch.distributed.run" in result.stdout.splitlines()[-1]  # training starts once all answer
    assert len(started) == 4 and {replica_port, replica_port + 1} < set(started)
    times = [t for t, _ in started.values()]
    assert max(times) - min(times) < 3  # each started before any had loaded (3 s)
    assert wait_for(lambda: all(map(port_is_free, started)), 30)  # the launcher stopped them on exit


def test_a_server_that_dies_while_others_load_stops_the_launch_at_once(tmp_path):
    # the second replica crashes while the others would take 10 minutes to load
    result, started, _ = _launch_with_fake_servers(tmp_path, load_s=600, crash_replica=1)
    assert result.returncode == 1 and "learner_replica_1 exited; see" in result.stderr, result.stderr
    assert "did not answer" not in result.stderr and "torch.distributed.run" not in result.stdout
    # the launcher stopped the ones still loading
    assert wait_for(lambda: not any(_running(pid) for _, pid in started.values()), 30), \
        "a stand-in server outlived the launcher"


@pytest.mark.parametrize("env,message", [
    (dict(ROLLOUT_ADDR="a,b"), "run them with ROLE=rollout ROLLOUT_RANK=0..1"),
    (dict(ROLE="rollout", ROLLOUT_ADDR="a,b", ROLLOUT_RANK="2"), "ROLLOUT_RANK=2 is not a place in ROLLOUT_ADDR"),
    (dict(ROLE="rollout", ROLLOUT_ADDR="a,b", ROLLOUT_GPUS="3", EXPLORER_GPUS="1", SGLANG_TP="2"),
     "rollout node 1 has 3 GPUs"),
    (dict(ROLE="train"), "ROLE=train needs ROLLOUT_ADDR"),
    (dict(ROLE="sideways"), "ROLE=sideways: use all, rollout or train"),
    (dict(ROLLOUT_GPUS="3", SGLANG_TP="2"), "rollout node 0 has 3 GPUs"),
    (dict(ROLLOUT_GPUS="8"), "node 0 has no GPUs left to train"),
    (dict(WEIGHT_SYNC="tensor"), "the SGLang server must run on the trainer's own GPU"),
])
def test_bad_layouts_are_refused_with_the_fix(env, message):
    result = launcher("run_s2l_8b.sh", **env)
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("script", ["run_s2l_8b.sh", "run_s2l_14b.sh", "run_grpo_8b.sh"])
def test_a_launcher_run_by_python_runs_as_bash(script):
    """Each launcher is bash and Python at once, because torchrun runs the script it is given with Python."""
    layout = dict(ROLLOUT_GPUS="4", SGLANG_TP="2")
    as_python = launcher(script, runner=(sys.executable,), **layout)
    assert as_python.returncode == 0, as_python.stderr
    assert _commands(as_python.stdout) == dry_run(script, **layout)


def test_torchrun_typed_in_front_of_a_launcher_runs_it_once_as_bash():
    """`torchrun examples/run_s2l_8b.sh` (the design card's words): one launcher, in the environment torchrun
    was started with (the user's MASTER_ADDR, not torchrun's port), and every worker exits 0."""
    torchrun = (sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-port", str(free_port()))
    typed = launcher("run_s2l_8b.sh", runner=torchrun, MASTER_ADDR="10.1.2.3")
    assert typed.returncode == 0, typed.stderr
    assert typed.stderr.count("run_s2l_8b.sh is a bash launcher that starts torchrun itself") == 1
    assert _commands(typed.stdout) == dry_run("run_s2l_8b.sh", MASTER_ADDR="10.1.2.3")
    trainer, _ = _train_config(_commands(typed.stdout))
    assert (_flag(trainer, "--master-addr"), _flag(trainer, "--master-port")) == ("10.1.2.3", "29500")


def test_unknown_argument_is_refused():
    result = subprocess.run(["bash", "examples/run_s2l_8b.sh", "--frobnicate"], cwd=REPO, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 2 and "unknown argument" in result.stderr


@pytest.mark.parametrize("tool", ["convert_hf_to_megatron.py", "convert_megatron_to_hf.py", "build_explorer_pool.py",
                                  "eval_passk.py", "make_toy_models.py", "plot_run.py", "compare_runs.py"])
def test_tools_show_help(tool):
    result = subprocess.run([sys.executable, f"tools/{tool}", "--help"], cwd=REPO, capture_output=True, text=True,
                            timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert result.returncode == 0 and "usage:" in result.stdout, result.stderr[-2000:]
