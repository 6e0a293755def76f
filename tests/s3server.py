"""A real S3 API server on localhost for the object-storage tests: moto's standalone server,
started by the suite as a subprocess (never a mocked client), as s3fs's own suite does.

``s3_server`` (session-scoped) yields ``S3Server``: its endpoint and the storage options that
reach it. The dummy credentials live in those options and in the server's own environment,
never in this process's ``os.environ``. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

_CREDENTIALS = {"key": "testing", "secret": "testing"}


@dataclass(frozen=True)
class S3Server:
    endpoint: str

    @property
    def options(self) -> dict:
        """The ``storage_options`` of the CLI's ``--storage-option`` and of s3fs."""
        return {"endpoint_url": self.endpoint, **_CREDENTIALS}

    def cli_options(self) -> list[str]:
        return [a for k, v in self.options.items() for a in ("--storage-option", f"{k}={v}")]

    def filesystem(self):
        """A fresh s3fs client of this server (no listing cache shared with the library's)."""
        import s3fs
        return s3fs.S3FileSystem(key=_CREDENTIALS["key"], secret=_CREDENTIALS["secret"],
                                 client_kwargs={"endpoint_url": self.endpoint},
                                 skip_instance_cache=True, use_listings_cache=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_until_up(endpoint: str, proc: subprocess.Popen, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"moto_server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(endpoint + "/moto-api/", timeout=1).close()
            return
        except urllib.error.HTTPError:
            return   # it answers
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"moto_server did not answer on {endpoint} within {timeout_s} s")


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    port = _free_port()
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
           "AWS_DEFAULT_REGION": "us-east-1"}
    log = Path(tmp_path_factory.mktemp("moto")) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], env=env, stdout=out, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_up(endpoint, proc)
        yield S3Server(endpoint)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def upload_tree(fs, src: Path, prefix: str) -> list[str]:
    """Every regular file under ``src`` as an object under ``prefix`` (``bucket/key``), keys
    keeping the relative paths; returns the relative paths of what could not be uploaded:
    symlinks (a bucket has none) and files this user cannot read."""
    left_out = []
    for dirpath, _dirs, files in os.walk(src):
        for name in files:
            path = Path(dirpath, name)
            rel = path.relative_to(src).as_posix()
            if path.is_symlink():
                left_out.append(rel)
                continue
            try:
                data = path.read_bytes()
            except OSError:
                left_out.append(rel)
                continue
            fs.pipe_file(f"{prefix}/{rel}", data)
    return left_out
