"""Write datasets in the rmoe shard format (Parquet shards + card.json), locally or to s3://.

    python jobs/prepare_data.py generate --task detection --size tiny --out ./runs/data/shapes-det
    python jobs/prepare_data.py generate --size medium --img-size 64 --out s3://my-bucket/data/shapes64
    python jobs/prepare_data.py convert imagenet --root /data/imagenet --out s3://my-bucket/data/imagenet
    python jobs/prepare_data.py convert ade20k --root /data/ADEChallengeData2016 --out ./runs/data/ade20k
    python jobs/prepare_data.py convert coco --root /data/coco --out s3://my-bucket/data/coco

Re-running after an interruption keeps the finished shards. Exit codes: 0 done, 2 bad input.
"""

from __future__ import annotations

import sys
from pathlib import Path

# Prefer this checkout's packages over an older installed copy (a cluster image, a submitted job).
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT), str(_ROOT / "platform")]

from rmoe_platform.cli.prepare_data import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
