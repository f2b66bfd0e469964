"""Find where an interrupted stage can continue: the newest whole checkpoint of an unfinished run.

A stage's runs are named `<stage>-<resume hash>-<suffix>` (the resume hash is the config hash less the worker
layout), and every checkpoint under the experiment's storage names the run it belongs to, also where a chain
of stages wrote it into its first stage's run directory (`stage.checkpoint_names`). So a rerun of the
experiment (after a cancelled job, a restarted head, Ctrl-C), on any worker count, finds the runs of the
stage that never wrote a succeeded row, and resumes from the newest of their checkpoints that is whole.
A checkpoint is whole when its state file parses and each safetensors file is as long as its header says:
a checkpoint cut short by a kill is passed over (and said so), never loaded partially.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Collection
from dataclasses import dataclass

import pyarrow.fs as pafs

from rmoe_platform import storage
from rmoe_platform.stage.checkpoint_names import CheckpointName, parse_checkpoint_dir
from rmoe_platform.stage.worker.checkpoints import MODEL_FILE, OPTIMIZER_FILE, STATE_FILE
from rmoe_platform.storage.s3 import S3Access


def run_prefix(stage_key: str, resume_hash: str) -> str:
    """The start of every run name of a stage with this config (the runner appends a unique suffix)."""
    return f"{stage_key.replace('/', '-')}-{resume_hash[:8]}-"


@dataclass(frozen=True)
class ResumePoint:
    run_name: str  # the interrupted run
    checkpoint_uri: str
    step: int


@dataclass(frozen=True)
class CheckpointListing:
    """Every checkpoint directory under a storage root, with whose it is: listed once, searched per stage (a
    chained stage's checkpoints lie in its chain's folder, so every run folder is read)."""

    storage_uri: str
    fs: pafs.FileSystem
    root: str
    checkpoints: tuple[tuple[CheckpointName, str], ...]  # (whose and which step, path in `fs`)


def list_checkpoints(storage_uri: str, access: S3Access | None) -> CheckpointListing:
    """The checkpoints under `storage_uri` (none when the storage does not exist yet)."""
    fs, root = storage.filesystem(storage_uri, s3=access)
    found = []
    for run in _children(fs, root):
        if run.type != pafs.FileType.Directory:
            continue
        for checkpoint in _children(fs, run.path):
            name = parse_checkpoint_dir(checkpoint.base_name, run.base_name)
            if checkpoint.type == pafs.FileType.Directory and name is not None:
                found.append((name, checkpoint.path))
    return CheckpointListing(storage_uri, fs, root, tuple(found))


def find_resume_point(
    storage_uri: str,
    prefix: str,
    *,
    finished_runs: Collection[str],
    access: S3Access | None,
    log: Callable[[str], None],
    listing: CheckpointListing | None = None,
) -> ResumePoint | None:
    """The newest whole checkpoint of a run whose name starts with `prefix` and is not one of `finished_runs`,
    in any run directory under `storage_uri` (searched in `listing` when given); None when there is none."""
    listing = listing or list_checkpoints(storage_uri, access)
    fs, root = listing.fs, listing.root
    candidates = [
        (name.step, name.owner, path)
        for name, path in listing.checkpoints
        if name.owner.startswith(prefix) and name.owner not in finished_runs
    ]
    for step, owner, path in sorted(candidates, reverse=True):
        problem = checkpoint_problem(fs, path)
        if problem is None:
            return ResumePoint(owner, _uri(storage_uri, root, path), step)
        log(f"checkpoint {_uri(storage_uri, root, path)} passed over: {problem}")
    return None


def checkpoint_problem(fs: pafs.FileSystem, directory: str) -> str | None:
    """Why the training checkpoint in `directory` cannot be resumed from, or None if it is whole."""
    try:
        json.loads(storage.read_bytes(fs, f"{directory}/{STATE_FILE}"))
    except (OSError, ValueError) as err:
        return f"{STATE_FILE} unreadable ({err})"
    for name in (MODEL_FILE, OPTIMIZER_FILE):
        problem = _safetensors_problem(fs, f"{directory}/{name}")
        if problem is not None:
            return f"{name} {problem}"
    return None


def _safetensors_problem(fs: pafs.FileSystem, path: str) -> str | None:
    """Compare a safetensors file's length with what its header declares (8-byte length, JSON, data).

    The length is the opened file's own, not a separate lookup's: an object store may not list an object
    that it already serves (an upload completing), and the two views must be of the same file."""
    try:
        with fs.open_input_file(path) as f:
            size = f.size()
            head = f.read(8)
            if len(head) < 8:
                return f"is truncated ({size} bytes)"
            (header_len,) = struct.unpack("<Q", head)
            if 8 + header_len > size:
                return f"is truncated (header of {header_len} bytes, file of {size})"
            header = json.loads(f.read(header_len))
    except (OSError, ValueError) as err:
        return f"unreadable ({err})"
    data_end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    if size != 8 + header_len + data_end:
        return f"is truncated ({size} bytes of {8 + header_len + data_end})"
    return None


def _children(fs: pafs.FileSystem, path: str) -> list[pafs.FileInfo]:
    """The entries under `path` (none when it does not exist). Any other failure (an unreachable endpoint,
    a refusal) is raised: read as "nothing to resume", it would start an interrupted stage from scratch."""
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def _uri(storage_uri: str, root: str, path: str) -> str:
    """`path` (in the filesystem of `storage_uri`, whose root is `root`) as a URI like `storage_uri`."""
    return storage.join(storage.normalize(storage_uri), path.removeprefix(root)) if path.startswith(root) else path
