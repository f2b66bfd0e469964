"""Run the RMoE paper's pipelines side by side and compare accuracy with training cost.

    python jobs/pipeline.py                                   # the demo preset on local Ray, CPU
    python jobs/pipeline.py --config configs/smoke.yaml --pipelines dense,rmoe_d
    python jobs/pipeline.py --set moe.num_experts=8 --set intermediate.budget.steps=40
    ray job submit --working-dir . -- python jobs/pipeline.py --config configs/demo.yaml

Under `ray job submit` it joins that cluster (RAY_ADDRESS); otherwise it starts a local Ray.
Exit codes: 0 all stages succeeded, 1 a stage failed, 2 bad input (config, overrides, results URI).
"""

from __future__ import annotations

import sys
from pathlib import Path

# Prefer this checkout's packages over an older installed copy (a cluster image, a submitted job).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "platform")]

from rmoe_platform.cli.pipeline import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:], default_config=_ROOT / "configs" / "demo.yaml"))
