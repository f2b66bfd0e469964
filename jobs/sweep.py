"""Sweep one RMoE pipeline over experts, residual budget, top-k, capacity, … with Ray Tune.

    python jobs/sweep.py --config configs/sweeps/demo.yaml            # 2x2 grid on local Ray, CPU
    python jobs/sweep.py --config configs/sweeps/demo.yaml --resume   # finish it after an interruption
    python jobs/sweep.py --config configs/sweeps/demo.yaml --set name=demo-b --set search.seed=1
    ray job submit --working-dir . -- python jobs/sweep.py --config configs/sweeps/demo.yaml

The dense core trains once before the trials; each trial runs the residual and downstream stages of
its setting; ASHA stops poor trials early. Exit codes: 0 every trial finished (or was stopped early),
1 a trial failed, 2 bad input (config, search space, resume state).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Prefer this checkout's packages over an older installed copy (a cluster image, a submitted job).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "platform")]

from rmoe_platform.cli.sweep import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_config=_ROOT / "configs" / "sweeps" / "demo.yaml"))
