"""S3 settings: config over environment, profiles, and secrets kept out of every printable form."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from rmoe_platform.config.experiment import ExperimentConfig
from rmoe_platform.config.fields import ConfigError
from rmoe_platform.storage.s3 import S3Access, S3Options

ENV = {
    "AWS_ACCESS_KEY_ID": "AKIAENVENVENV",
    "AWS_SECRET_ACCESS_KEY": "env-secret-value",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:9000",
    "AWS_REGION": "eu-west-1",
}


def test_environment_then_config_precedence_and_no_secret_in_repr() -> None:
    access = S3Access.resolve(S3Options(), ENV)
    assert (access.endpoint_url, access.region, access.access_key_id) == (
        "http://127.0.0.1:9000",
        "eu-west-1",
        "AKIAENVENVENV",
    )
    overridden = S3Access.resolve(S3Options(endpoint_url="https://minio.internal:9000", region="us-east-1"), ENV)
    assert overridden.endpoint_url == "https://minio.internal:9000" and overridden.region == "us-east-1"
    for text in (repr(access), str(access), access.describe()):
        assert "env-secret-value" not in text and "AKIAENVENVENV" not in text
    fs = access.filesystem()
    assert fs.region == "eu-west-1"


def test_profiles_from_the_shared_credentials_file(tmp_path: Path) -> None:
    credentials = tmp_path / "credentials"
    credentials.write_text("[research]\naws_access_key_id = AKIAPROFILE\naws_secret_access_key = profile-secret\n")
    env = {"AWS_SHARED_CREDENTIALS_FILE": str(credentials)}
    access = S3Access.resolve(S3Options(profile="research"), env)
    assert access.access_key_id == "AKIAPROFILE" and access.secret_access_key == "profile-secret"
    assert S3Access.resolve(S3Options(), {**env, "AWS_PROFILE": "research"}).access_key_id == "AKIAPROFILE"
    with pytest.raises(ConfigError, match=r"s3\.profile: no profile 'missing'"):
        S3Access.resolve(S3Options(profile="missing"), env)
    with pytest.raises(ConfigError, match="both AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        S3Access.resolve(S3Options(), {"AWS_ACCESS_KEY_ID": "only-the-key"})


PHASES = ["name=x", "upstream={data: {uri: a}, budget: {steps: 1}}", "downstream={data: {uri: b}, budget: {steps: 1}}"]


def test_bad_s3_options_name_the_field() -> None:
    with pytest.raises(ConfigError, match=r"experiment\.s3\.endpoint_url must start with http"):
        ExperimentConfig.load(None, [*PHASES, "s3.endpoint_url=minio:9000"])
    with pytest.raises(ConfigError, match=r"experiment\.s3\.max_attempts must be >= 1"):
        ExperimentConfig.load(None, [*PHASES, "s3.max_attempts=0"])


def test_the_local_endpoint_starts_again_on_another_port_when_its_port_was_taken(monkeypatch) -> None:
    """A port picked free can be bound by another process before the server binds it: the server exits, and
    a connection to the port would be answered by the other process; LocalS3 moves on to a fresh port."""
    from rmoe_platform.storage import local_s3

    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        ports = iter([taken, local_s3.free_port()])
        monkeypatch.setattr(local_s3, "free_port", lambda: next(ports))
        server = local_s3.LocalS3()
        with server as endpoint:
            assert not endpoint.endpoint_url.endswith(f":{taken}")
            bucket = endpoint.bucket()
            assert endpoint.client().list_objects_v2(Bucket=bucket)["KeyCount"] == 0
            log = server.log
            assert log is not None and log.exists()
        assert server.process is None and not log.exists(), "stopped, its log removed"
