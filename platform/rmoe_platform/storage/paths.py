"""Local paths and s3:// URIs behind one interface (pyarrow filesystems), checked before use.

Every function takes the driver-resolved `S3Access` for s3:// URIs; without one it is resolved from
this process's environment (fine on the driver, not inside Ray workers: pass it explicitly there).
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from rmoe_platform.config.fields import ConfigError
from rmoe_platform.storage.s3 import S3Access, explain_error


def is_remote(uri: str) -> bool:
    return "://" in uri


def normalize(uri: str) -> str:
    """Absolute local paths (Ray workers may run elsewhere in the tree); URIs unchanged."""
    return uri if is_remote(uri) else str(Path(uri).expanduser().resolve())


def join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *(p.strip("/") for p in parts)])


def filesystem(uri: str, field: str = "storage", s3: S3Access | None = None) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem and in-filesystem path of `uri`."""
    if not is_remote(uri):
        return pafs.LocalFileSystem(), normalize(uri)
    scheme, _, path = uri.partition("://")
    if scheme not in ("s3", "s3a"):
        raise ConfigError(f"{field}: unsupported URI scheme {scheme!r} in {uri!r} (use a local path or s3://)")
    if not path.split("/", 1)[0]:
        raise ConfigError(f"{field}: {uri!r} names no bucket")
    access = s3 or S3Access.resolve()
    return access.filesystem(), path.rstrip("/")


def check_bucket(uri: str, field: str, s3: S3Access | None = None) -> None:
    """The bucket of an s3:// URI exists and the credentials may use it; else a ConfigError naming `field`."""
    access = s3 or S3Access.resolve()
    fs, path = filesystem(uri, field, access)
    bucket = path.split("/", 1)[0]
    try:
        info = fs.get_file_info(bucket)
    except OSError as err:
        raise ConfigError(f"{field}: {explain_error(err, uri, access)}") from None
    if info.type != pafs.FileType.Directory:
        raise ConfigError(f"{field}: bucket {bucket!r} of {uri!r} does not exist at {access.describe()}")


def check_writable(uri: str, field: str = "storage", s3: S3Access | None = None) -> None:
    """Fail early, writing nothing, if `uri` cannot take output: the error names `field`."""
    if is_remote(uri):
        check_bucket(uri, field, s3)
        return
    path = Path(normalize(uri))
    existing = next((p for p in (path, *path.parents) if p.exists()), None)
    if existing is None or not existing.is_dir():
        raise ConfigError(f"{field}: {uri!r} is not under a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{field}: {str(existing)!r} is not writable")


def exists(uri: str, s3: S3Access | None = None) -> bool:
    fs, path = filesystem(uri, s3=s3)
    try:
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    except OSError:
        return False


def download(uri: str, local_dir: Path, s3: S3Access | None = None) -> Path:
    """Copy a file or directory at `uri` under `local_dir`; local paths are returned as they are."""
    if not is_remote(uri):
        return Path(normalize(uri))
    fs, path = filesystem(uri, s3=s3)
    target = local_dir / Path(path).name
    local_dir.mkdir(parents=True, exist_ok=True)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        target.mkdir(parents=True, exist_ok=True)  # pyarrow copies a tree only into an existing folder
    pafs.copy_files(path, str(target), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return target


def write_bytes(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    """Write a whole object: a temp file renamed into place locally, a single PUT on S3 (an object
    appears whole or not at all), so an interrupted writer never leaves a half-written file."""
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(str(Path(path).parent), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"  # never ends in .parquet: listings skip it
        with fs.open_output_stream(tmp) as out:
            out.write(data)
        fs.move(tmp, path)
        return
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    with fs.open_input_stream(path) as stream:
        return stream.read()
