"""Shared fixtures: a real S3 endpoint on loopback (moto's server), reached through s3fs like production storage, and
scikit-learn's digits as shards for the trainer's tests."""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


DEEPSPEED = str(Path(sys.executable).parent / "deepspeed")


def two_rank_command(port: int, *script: str, cli: bool = False) -> list[str]:
    """Two CPU ranks of `script` on this machine. With `cli`, through the `deepspeed` command as users run it;
    otherwise through the command that one starts for a single node (`deepspeed.launcher.launch`, which starts,
    signals and waits for the ranks), without the 2.7 s the `deepspeed` process itself takes here to build it."""
    if cli:
        return [DEEPSPEED, "--num_gpus", "2", "--master_port", str(port), *script]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": [0, 1]}).encode()).decode()
    launcher = [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}"]
    return [*launcher, "--master_addr=127.0.0.1", f"--master_port={port}", *script]


@pytest.fixture(scope="session", autouse=True)
def temp_dir_per_worker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A $TMPDIR of this pytest process's own, for it and the jobs it starts. build-shards and the checkpoint staging
    name their folders on this machine after the output URL, and under pytest-xdist both workers' S3 servers serve
    the same `s3://bucket/...` URLs: two tests writing one URL at the same time would share a folder. Inductor's
    cache of compiled kernels stays at torch's default place under the old $TMPDIR, shared and warm. (Socket paths
    under it stay far below the 108-byte limit here: pytest's folder is short.)"""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCHINDUCTOR_CACHE_DIR", os.environ.get("TORCHINDUCTOR_CACHE_DIR", default_cache_dir()))
        patch.setenv("TMPDIR", str(tmp_path_factory.mktemp("tmp")))
        patch.setattr(tempfile, "tempdir", None)  # gettempdir() reads $TMPDIR again
        yield


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """Endpoint URL of a moto S3 server for the whole session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@contextlib.contextmanager
def s3_bucket(endpoint_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Storage options for s3fs with credentials in the environment, as users set them, and an empty bucket `bucket`
    that is removed on leaving (a module-scoped fixture passes `pytest.MonkeyPatch.context()`)."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    options = {"endpoint_url": endpoint_url}
    fs = s3fs.S3FileSystem(skip_instance_cache=True, **options)
    fs.mkdir("bucket")
    try:
        yield options
    finally:
        fs.rm("bucket", recursive=True)
        s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture
def s3(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """Storage options for s3fs with credentials in the environment, as users set them; a fresh bucket per test."""
    with s3_bucket(s3_server, monkeypatch) as options:
        yield options


@pytest.fixture(scope="session")
def digit_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """scikit-learn's digits at 16 px as shards with a held-out split, for the trainer's tests (which only read
    them)."""
    from data_pipeline.build.builder import BuildOptions, build
    from pretrain.demos.digits import write_digits

    root = tmp_path_factory.mktemp("digits")
    images, shards = root / "images", root / "shards"
    write_digits(images, size=16)
    build(BuildOptions(input=str(images), output=str(shards), val_fraction=0.2, max_samples_per_shard=200, workers=0))
    return shards


def put_digits(digit_shards: Path, s3: dict) -> None:
    """The digits shards copied to s3://bucket/digits/."""
    import s3fs

    fs = s3fs.S3FileSystem(skip_instance_cache=True, **s3)
    fs.put(str(digit_shards) + "/", "bucket/digits/", recursive=True)


@pytest.fixture
def s3_digits(digit_shards: Path, s3: dict) -> dict:
    put_digits(digit_shards, s3)
    return s3
