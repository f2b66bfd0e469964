"""Local paths and s3:// URIs behind one interface (pyarrow filesystems), checked before use."""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow.fs as pafs

from rmoe_platform.configtools import ConfigError


def is_remote(uri: str) -> bool:
    return "://" in uri


def normalize(uri: str) -> str:
    """Absolute local paths (Ray workers may run elsewhere in the tree); URIs unchanged."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().resolve())


def filesystem(uri: str, field: str = "storage") -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of `uri` (S3 endpoint/credentials from AWS_* env)."""
    if is_remote(uri):
        try:
            return pafs.FileSystem.from_uri(uri)
        except Exception as err:
            raise ConfigError(f"{field}: cannot open {uri!r}: {err}") from None
    return pafs.LocalFileSystem(), normalize(uri)


def check_writable(uri: str, field: str = "storage") -> None:
    """Fail early, writing nothing, if `uri` cannot take output: the error names `field`."""
    if not is_remote(uri):
        path = Path(normalize(uri))
        existing = next((p for p in (path, *path.parents) if p.exists()), None)
        if existing is None or not existing.is_dir():
            raise ConfigError(f"{field}: {uri!r} is not under a directory")
        if not os.access(existing, os.W_OK | os.X_OK):
            raise ConfigError(f"{field}: {str(existing)!r} is not writable")
        return
    fs, path = filesystem(uri, field)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except Exception as err:
        raise ConfigError(f"{field}: cannot reach {uri!r}: {err}") from None
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"{field}: bucket {bucket!r} of {uri!r} does not exist")


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except Exception:
        return False


def download(uri: str, local_dir: Path) -> Path:
    """Copy a file or directory at `uri` under `local_dir`; local paths are returned as they are."""
    if not is_remote(uri):
        return Path(normalize(uri))
    fs, path = filesystem(uri)
    target = local_dir / Path(path).name
    local_dir.mkdir(parents=True, exist_ok=True)
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target
