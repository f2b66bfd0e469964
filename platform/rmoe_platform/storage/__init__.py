"""Where the platform reads and writes: local paths and s3:// URIs behind one interface (`paths`), S3 access
resolved on the driver and shipped to workers (`s3`), and a real S3 endpoint on loopback for tests and
benchmarks (`local_s3`). `from rmoe_platform import storage` gives the path functions (`storage.exists`, …).
"""

from rmoe_platform.storage.paths import (
    check_bucket,
    check_writable,
    download,
    exists,
    filesystem,
    is_remote,
    join,
    normalize,
    read_bytes,
    write_bytes,
)

__all__ = [
    "check_bucket",
    "check_writable",
    "download",
    "exists",
    "filesystem",
    "is_remote",
    "join",
    "normalize",
    "read_bytes",
    "write_bytes",
]
