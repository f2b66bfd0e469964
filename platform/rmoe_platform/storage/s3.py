"""S3 access (AWS S3, MinIO, or any S3-compatible endpoint) resolved once on the driver and shipped
explicitly to Ray workers, whose environment may differ from the driver's.

`S3Options` is the non-secret part of a config (endpoint, region, profile, timeouts, retries).
`S3Access` adds the credentials, read from the standard AWS environment variables or from the named
profile of the shared credentials file. Secrets never appear in `repr`, logs, configs or results.
When no credentials are found, pyarrow falls back to the AWS default chain (instance or pod identity).
"""

from __future__ import annotations

import configparser
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow.fs as pafs

from rmoe_platform.config.fields import ConfigError, check


@dataclass(frozen=True)
class S3Options:
    """How to reach S3. Every field left unset falls back to the standard AWS environment variables
    (`AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL`, `AWS_REGION`/`AWS_DEFAULT_REGION`, `AWS_PROFILE`)."""

    endpoint_url: str | None = None
    region: str | None = None
    profile: str | None = None
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    max_attempts: int = 3

    def __post_init__(self) -> None:
        check(
            self.endpoint_url is None or self.endpoint_url.startswith(("http://", "https://")),
            f"endpoint_url must start with http:// or https://, got {self.endpoint_url!r}",
        )
        check(self.connect_timeout > 0 and self.request_timeout > 0, "timeouts must be > 0")
        check(self.max_attempts >= 1, f"max_attempts must be >= 1, got {self.max_attempts}")


@dataclass(frozen=True)
class S3Access:
    """Resolved S3 settings with credentials; picklable, so Ray tasks and workers get the same access."""

    endpoint_url: str | None = None
    region: str | None = None
    access_key_id: str | None = field(default=None, repr=False)
    secret_access_key: str | None = field(default=None, repr=False)
    session_token: str | None = field(default=None, repr=False)
    connect_timeout: float = 5.0
    request_timeout: float = 30.0
    max_attempts: int = 3

    @classmethod
    def resolve(cls, options: S3Options | None = None, env: Mapping[str, str] | None = None) -> S3Access:
        """Options first, then the environment; a named profile must exist (ConfigError otherwise)."""
        options = options or S3Options()
        env = os.environ if env is None else env
        endpoint = options.endpoint_url or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None
        region = options.region or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None
        key, secret, token = (
            env.get("AWS_ACCESS_KEY_ID"),
            env.get("AWS_SECRET_ACCESS_KEY"),
            env.get("AWS_SESSION_TOKEN"),
        )
        profile = options.profile or (None if key else env.get("AWS_PROFILE"))
        if profile:
            key, secret, token = _profile_credentials(profile, env, explicit=options.profile is not None)
        if bool(key) != bool(secret):
            raise ConfigError("s3: credentials need both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
        return cls(
            endpoint_url=endpoint,
            region=region,
            access_key_id=key or None,
            secret_access_key=secret or None,
            session_token=token or None,
            connect_timeout=options.connect_timeout,
            request_timeout=options.request_timeout,
            max_attempts=options.max_attempts,
        )

    def filesystem(self) -> pafs.S3FileSystem:
        kwargs: dict[str, object] = {
            "connect_timeout": self.connect_timeout,
            "request_timeout": self.request_timeout,
            "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=self.max_attempts),
        }
        if self.region:
            kwargs["region"] = self.region
        if self.endpoint_url:
            scheme, _, host = self.endpoint_url.partition("://")
            kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
            kwargs.setdefault("region", "us-east-1")  # S3-compatible stores ignore it; skips a lookup
        if self.access_key_id:
            kwargs.update(access_key=self.access_key_id, secret_key=self.secret_access_key)
            if self.session_token:
                kwargs["session_token"] = self.session_token
        return pafs.S3FileSystem(**kwargs)

    def describe(self) -> str:
        """Where requests go and how they authenticate, without any secret."""
        where = self.endpoint_url or "AWS S3"
        who = "access key from env/profile" if self.access_key_id else "the AWS default credential chain"
        return f"{where} ({who})"


def _profile_credentials(profile: str, env: Mapping[str, str], *, explicit: bool) -> tuple[str, str, str | None]:
    path = Path(env.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials").expanduser()
    parser = configparser.ConfigParser()
    parser.read(path)
    if not parser.has_section(profile):
        origin = "s3.profile" if explicit else "AWS_PROFILE"
        raise ConfigError(f"{origin}: no profile {profile!r} in {str(path)!r}")
    section = parser[profile]
    return (
        section.get("aws_access_key_id", ""),
        section.get("aws_secret_access_key", ""),
        section.get("aws_session_token"),
    )


_UNREACHABLE_MARKS = ("NETWORK_CONNECTION", "curlCode", "Could not connect")


def unreachable(err: BaseException | str) -> bool:
    """Whether a failed S3 call (or a failure's text, e.g. a Train worker's) says the endpoint could not be
    reached: a transient condition (a restarting endpoint, a network cut), unlike a refusal."""
    text = str(err)
    return any(mark in text for mark in _UNREACHABLE_MARKS)


def explain_error(err: Exception, uri: str, access: S3Access) -> str:
    """A user-facing reason for a failed S3 call: bad credentials, an unreachable endpoint, or as is."""
    text = str(err)
    if "ACCESS_DENIED" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text:
        return f"access to {uri!r} denied at {access.describe()}: check the credentials (AWS_ACCESS_KEY_ID, …)"
    if unreachable(text):
        return (
            f"cannot reach the S3 endpoint {access.endpoint_url or 'of AWS'} for {uri!r} "
            f"after {access.max_attempts} attempt(s): {text.rsplit(':', 1)[-1].strip()}"
        )
    return f"{uri!r}: {text}"
