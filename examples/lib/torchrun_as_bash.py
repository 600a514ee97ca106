"""`torchrun examples/run_s2l_8b.sh` works as `bash examples/run_s2l_8b.sh` does.

The launchers start torchrun themselves, but the design card (and habit) has users type torchrun in front
of them. torchrun runs its script with Python, so each launcher is valid bash and valid Python at once: bash
reads its first lines and exits; Python reads them as a string and calls `rerun_in_bash`, which replaces this
worker with bash on the same file and arguments, in the environment torchrun was started with. Only local
rank 0 does that; torchrun's other workers exit 0 at once, so one launcher runs per node, as with bash.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# what torchrun sets for its workers (torch/distributed/elastic/agent/server/local_elastic_agent.py)
TORCHRUN_VARIABLES = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK",
                      "GROUP_WORLD_SIZE", "ROLE_RANK", "ROLE_NAME", "ROLE_WORLD_SIZE", "MASTER_ADDR",
                      "MASTER_PORT")


def _is_torchruns(name: str) -> bool:
    return name in TORCHRUN_VARIABLES or name.startswith("TORCHELASTIC_")


def _parent_environment() -> dict[str, str]:
    """The environment torchrun (our parent) was started with, where Linux shows it; else {}."""
    try:
        raw = Path(f"/proc/{os.getppid()}/environ").read_bytes()
    except OSError:
        return {}
    items = (item.decode(errors="replace").partition("=") for item in raw.split(b"\0") if b"=" in item)
    return {name: value for name, _, value in items}


def user_environment() -> dict[str, str]:
    """The environment torchrun (our parent) was started with, where Linux shows it: what the user typed, with
    their own MASTER_ADDR and without the OMP_NUM_THREADS torchrun adds. Elsewhere, ours less what torchrun
    sets for its workers."""
    parent = _parent_environment() if "TORCHELASTIC_RUN_ID" in os.environ else {}
    if parent:
        return parent
    return {name: value for name, value in os.environ.items() if not _is_torchruns(name)}


def rerun_in_bash(script: str) -> None:
    """Become `bash SCRIPT ARGS...` (local rank 0), or exit 0 (torchrun's other workers)."""
    if os.environ.get("LOCAL_RANK", "0") != "0":
        sys.exit(0)
    if "TORCHELASTIC_RUN_ID" in os.environ:
        print(f"{script} is a bash launcher that starts torchrun itself: running it as `bash {script}`",
              file=sys.stderr, flush=True)
    os.execvpe("bash", ["bash", script, *sys.argv[1:]], user_environment())
