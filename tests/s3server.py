"""The S3 server of the object-storage tests: moto's standalone server on localhost
(``fixtures/s3server.py``, which the bucket benchmark starts too), once per test session.

``s3_server`` (session-scoped) yields ``S3Server``: its endpoint and the storage options that
reach it.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.s3server import S3Server, moto_server, upload_tree  # noqa: F401 - re-exported


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    with moto_server(Path(tmp_path_factory.mktemp("moto")) / "server.log") as server:
        yield server
