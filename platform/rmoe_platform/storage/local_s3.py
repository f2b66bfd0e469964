"""A real S3 endpoint on loopback (`moto_server` from `moto[server]`) for tests, benchmarks and local
trials: IAM checks on, so wrong credentials are refused as AWS would. Not for production data."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

from rmoe_platform.storage.s3 import S3Access


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass(frozen=True)
class S3Endpoint:
    """A running endpoint and credentials it accepts."""

    endpoint_url: str
    access_key_id: str
    secret_access_key: str
    region: str = "us-east-1"

    def env(self) -> dict[str, str]:
        """The standard AWS variables that point a process (and this platform) at the endpoint."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.secret_access_key,
            "AWS_REGION": self.region,
        }

    def access(self, **overrides: object) -> S3Access:
        base: dict[str, object] = {
            "endpoint_url": self.endpoint_url,
            "region": self.region,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "connect_timeout": 2.0,
            "request_timeout": 10.0,
        }
        return S3Access(**{**base, **overrides})  # type: ignore[arg-type]

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def bucket(self) -> str:
        """A new empty bucket."""
        name = f"rmoe-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name


class LocalS3:
    """`with LocalS3() as s3:` starts moto_server on a free loopback port and stops exactly that process.

    A free port is only free when it is picked: should another process bind it first, the server exits (or
    someone else answers), and it starts again on another port. The server's output goes to a log file
    whose tail a failed start shows."""

    START_ATTEMPTS = 3

    def __init__(self, startup_timeout: float = 30.0) -> None:
        self.startup_timeout = startup_timeout
        self.process: subprocess.Popen | None = None
        self.log: Path | None = None

    def __enter__(self) -> S3Endpoint:
        try:
            for _ in range(self.START_ATTEMPTS):
                port = free_port()
                if self._start(port):
                    endpoint = f"http://127.0.0.1:{port}"
                    return S3Endpoint(endpoint, *self._credentials(endpoint))
                self._stop()
            raise RuntimeError(f"moto_server: every port it was given was taken ({self.START_ATTEMPTS} tries)")
        except BaseException:
            self._stop()
            raise

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None) -> None:
        self._stop()

    def _start(self, port: int) -> bool:
        """Start the server on `port`; False when the port turned out to be taken."""
        server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or "moto_server"
        # The first 4 requests go unauthenticated: just enough to create a user, a policy and a key.
        env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "4"}
        handle, name = tempfile.mkstemp(prefix="moto-server-", suffix=".log")
        self.log = Path(name)
        with os.fdopen(handle, "wb") as log:
            self.process = subprocess.Popen(
                [server, "-H", "127.0.0.1", "-p", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT
            )
        return self._wait(port)

    def _wait(self, port: int) -> bool:
        """Until the server says it listens on `port` (it prints that once bound: a connection alone could be
        answered by whoever else holds the port); False when the port was taken."""
        assert self.process is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            log = self.log_tail()
            if self.process.poll() is not None:
                if "Address already in use" in log:
                    return False
                raise RuntimeError(f"moto_server exited on port {port}:\n{log}")
            if f"Running on http://127.0.0.1:{port}" in log:
                return True
            if time.monotonic() > deadline:
                raise RuntimeError(f"moto_server did not start on port {port} in {self.startup_timeout:g} s:\n{log}")
            time.sleep(0.1)

    def log_tail(self, chars: int = 3000) -> str:
        """The end of the server's output so far."""
        if self.log is None or not self.log.exists():
            return ""
        return self.log.read_text(errors="replace")[-chars:]

    @staticmethod
    def _credentials(endpoint: str) -> tuple[str, str]:
        import boto3

        iam = boto3.client(
            "iam", endpoint_url=endpoint, region_name="us-east-1", aws_access_key_id="x", aws_secret_access_key="x"
        )
        iam.create_user(UserName="rmoe")
        statement = {"Effect": "Allow", "Action": "s3:*", "Resource": "*"}
        document = json.dumps({"Version": "2012-10-17", "Statement": [statement]})
        policy = iam.create_policy(PolicyName="rmoe-s3", PolicyDocument=document)
        iam.attach_user_policy(UserName="rmoe", PolicyArn=policy["Policy"]["Arn"])
        key = iam.create_access_key(UserName="rmoe")["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    def _stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
            self.process = None
        if self.log is not None:
            self.log.unlink(missing_ok=True)
            self.log = None
