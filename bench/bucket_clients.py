"""Ordinary S3 clients for the bucket benchmark, run as processes of their own: boto3 listing a
prefix (the anchor where awscli is not installed) and boto3 downloading every object under it
with N threads, as a plain copy of the checkpoints to local disk would. Each prints one JSON line:
what it saw (objects, bytes), so the benchmark can check it against the proxy's counts.

    python bench/bucket_clients.py list --endpoint http://127.0.0.1:PORT s3://bucket/root
    python bench/bucket_clients.py download --endpoint URL --jobs 16 s3://bucket/root DEST
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def client(endpoint: str, jobs: int):
    import boto3
    from botocore.config import Config
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        config=Config(max_pool_connections=max(jobs, 10),
                                      retries={"max_attempts": 1}))


def objects(s3, url: str):
    """(key, size) of every object under the URL's prefix, page by page."""
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    prefix = prefix.rstrip("/") + "/" if prefix else ""
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            yield bucket, prefix, obj["Key"], obj["Size"]


def list_prefix(endpoint: str, url: str) -> dict:
    found = list(objects(client(endpoint, 1), url))
    return {"objects": len(found), "bytes": sum(size for *_, size in found)}


def download(endpoint: str, url: str, dest: Path, jobs: int) -> dict:
    s3 = client(endpoint, jobs)
    found = list(objects(s3, url))

    def fetch(item) -> int:
        bucket, prefix, key, _size = item
        path = dest / key[len(prefix):]
        path.parent.mkdir(parents=True, exist_ok=True)
        data = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
        path.write_bytes(data)
        return len(data)

    with ThreadPoolExecutor(jobs) as pool:
        got = list(pool.map(fetch, found))
    return {"objects": len(got), "bytes": sum(got)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("what", choices=("list", "download"))
    ap.add_argument("--endpoint", required=True)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("url")
    ap.add_argument("dest", type=Path, nargs="?")
    args = ap.parse_args(argv)
    if args.what == "list":
        out = list_prefix(args.endpoint, args.url)
    else:
        out = download(args.endpoint, args.url, args.dest, args.jobs)
    print(json.dumps(out))
    sys.stdout.flush()
    os._exit(0)   # the pool's threads are done; skip the interpreter's teardown


if __name__ == "__main__":
    main()
