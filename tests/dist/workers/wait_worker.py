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
    from megatron_s2l import platform

    platform.init_distributed(timeout_minutes=3 / 60, driver_wait_minutes=1)
    rank, outcome = int(os.environ["RANK"]), {}
    with platform.fail_together("the driver's slow phase"):
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
    Path(sys.argv[1], f"rank{rank}.json").write_text(json.dumps(outcome))
    os._exit(0)  # the timed-out group cannot be torn down cleanly


if __name__ == "__main__":
    main()
