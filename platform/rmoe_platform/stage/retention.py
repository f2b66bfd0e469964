"""Which checkpoints a chained fit keeps: each stage its newest `checkpoint.keep`.

Ray Train prunes per fit (`CheckpointConfig.num_to_keep`), which in a chain would delete a parent's final
checkpoint once its child reports enough of its own; so a chain's fit keeps every checkpoint and the driver
prunes per stage once the fit has ended (succeeded or failed).
"""

from __future__ import annotations

from collections.abc import Mapping

import pyarrow.fs as pafs

from rmoe_platform import storage
from rmoe_platform.stage.checkpoint_names import parse_checkpoint_dir
from rmoe_platform.storage.s3 import S3Access


def prune_checkpoints(storage_root: str, fit_run: str, keep: Mapping[str, int], access: S3Access) -> list[str]:
    """Delete all but the newest `keep[stage run]` checkpoints of each stage in the fit's run folder; returns
    the deleted paths. Checkpoints of runs not in `keep` are left alone."""
    fs, root = storage.filesystem(storage_root, "stage.storage", access)
    run_dir = storage.join(root, fit_run)
    by_run: dict[str, list[tuple[int, str]]] = {}
    for entry in fs.get_file_info(pafs.FileSelector(run_dir, allow_not_found=True)):
        name = parse_checkpoint_dir(entry.base_name, fit_run)
        if entry.type == pafs.FileType.Directory and name is not None and name.owner in keep:
            by_run.setdefault(name.owner, []).append((name.step, entry.path))
    deleted = []
    for run, checkpoints in by_run.items():
        for _, path in sorted(checkpoints, reverse=True)[keep[run] :]:
            fs.delete_dir(path)
            deleted.append(path)
    return deleted
