"""torchrun worker: ranks wait for a slow driver longer than the collective timeout.

argv: OUT_DIR. init_distributed with a 3 s collective timeout and a 60 s driver wait. Rank 0 works 6 s inside
fail_together (as the driver collects rollouts), then 6 s before a plain collective (as a hung learner rank).
Each rank writes rank<r>.json: whether each wait succeeded, and the error if not.
"""

import json
import os
import sys
import time
from pathlib import Path


def main():
    import megatron.core.parallel_state  # noqa: F401 - imported before the rendezvous, whose timeout is 3 s too
    import megatron.core.tensor_parallel.random  # noqa: F401

    from megatron_s2l import platform
    from megatron_s2l.train.stopping import fail_together

    rank, out_dir, outcome = int(os.environ["RANK"]), Path(sys.argv[1]), {}
    (out_dir / f"ready{rank}").touch()  # both ranks reach the rendezvous together, however slow the imports
    while not all((out_dir / f"ready{r}").exists() for r in range(2)):
        time.sleep(0.01)
    platform.init_distributed(timeout_minutes=3 / 60, driver_wait_minutes=1)
    with fail_together("the driver's slow phase"):
        if rank == 0:
            time.sleep(6)
    outcome["driver_wait"] = "ok"
    if rank == 0:
        time.sleep(6)
    try:
        platform.any_rank(False)
        outcome["collective"] = "ok"
    except RuntimeError as error:
        outcome["collective"] = f"failed: {error}"
    (out_dir / f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)  # the timed-out group cannot be torn down cleanly


if __name__ == "__main__":
    main()
