"""Issue 18, the read-only half: audit and validate of runs in a bucket, through fsspec.

Against a real S3 API server on localhost (``s3server.s3_server``: moto's standalone server,
started by the suite), the fixture trees uploaded to a bucket must audit exactly as they do on
disk; a hostile bucket (``..`` keys, keys that are prefixes of others, an object and a prefix
of one name, an object gone between listing and reading, a 50 MB object claiming a 100-byte
header) gets a clear problem each, with bounded bytes read. ``memory://`` needs no server and
``file://`` is the local path. migrate refuses URLs, prune those without conditional deletes
(tests/test_object_storage_prune.py).
"""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpt_tools import api
from ckpt_tools.cli.group import cli
from ckpt_tools.problems import MISSING_FILE, UNREADABLE
from ckpt_tools.storage import open_storage
from ckpt_tools.storage.walk import find_checkpoints
from s3server import s3_server, upload_tree  # noqa: F401 - s3_server is a fixture

REPO = Path(__file__).resolve().parents[1]
# a healthy canonical DyLoRA-MoE checkpoint of the fixture tree (about 200 kB)
HEALTHY = "sweeps/lr1e-4/seed0/checkpoint-50"


def audit_json(*args) -> tuple[int, dict]:
    result = CliRunner().invoke(cli, ["audit", "--no-progress", "--json", "--min-age", "0",
                                      *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, json.loads(result.stdout)


def judged(doc: dict) -> dict[str, dict]:
    """What must agree between disk and bucket, by checkpoint path."""
    return {c["path"]: {"status": c["status"], "layout": c["layout"], "model_kind": c["model_kind"],
                        "step": c["step"], "run": c["run"], "best_of_run": c["best_of_run"],
                        "reclaims": c["reclaimable_bytes"] > 0,
                        "problems": sorted((p["code"], p["path"], p["severity"])
                                           for p in c["problems"])}
            for c in doc["checkpoints"]}


def apparent_sizes(root: Path) -> dict[str, int]:
    """Each checkpoint's bytes as a bucket holds them: its files' sizes (each inode once), not
    the blocks they take on disk."""
    sizes = {}
    for c in api.scan(str(root), min_age_s=0).checkpoints:
        files = {(f.dev, f.ino): f.size for f in c.dir.files if not f.is_symlink}
        sizes[c.path] = sum(files.values())
    return sizes


def holding(doc: dict, left_out: list[str]) -> set[str]:
    """The checkpoints that hold a file the upload left out."""
    paths = [c["path"] for c in doc["checkpoints"]]
    return {p for p in paths for rel in left_out if p == "." or rel.startswith(p + "/")}


@pytest.fixture(scope="session")
def bucket_of_runs(s3_server, results_tree, ordinary_runs):  # noqa: F811
    """The DyLoRA fixture tree and the ordinary Trainer runs uploaded once, keys keeping their
    relative paths: {name: (local root, bucket URL, relative paths left out)}."""
    fs = s3_server.filesystem()
    fs.mkdir("runs")
    trees = {"dylora": results_tree[0], "ordinary": ordinary_runs[0]}
    return {name: (root, f"s3://runs/{name}", upload_tree(fs, root, f"runs/{name}"))
            for name, root in trees.items()}


@pytest.mark.parametrize("name", ["dylora", "ordinary"])
def test_a_bucket_audits_as_the_disk_it_was_uploaded_from(s3_server, bucket_of_runs, name):  # noqa: F811
    root, url, left_out = bucket_of_runs[name]
    code_here, here = audit_json(root)
    code_there, there = audit_json(*s3_server.cli_options(), url)
    # Expected differences, by nature: a bucket holds no symlink (the fixtures' symlinks, in or
    # out of the root, dangling or not) and nothing the uploading user could not read; the
    # checkpoints that held one are judged on what the bucket holds, so they are left out here.
    differ = holding(here, left_out)
    if name == "dylora":
        assert "broken/symlink-escape/checkpoint-100" in differ   # the fixture tree has symlinks
    assert set(judged(there)) == set(judged(here))
    a, b = judged(here), judged(there)
    for path in sorted(set(a) - differ):
        assert b[path] == a[path], path
    sizes = apparent_sizes(root)
    for c in there["checkpoints"]:
        if c["path"] not in differ:
            assert c["size_bytes"] == sizes[c["path"]], c["path"]
    if not differ:
        assert code_there == code_here
    assert there["storage"]["listings"] == 1
    assert there["storage"]["bytes_read"] > 0


def test_jobs_overlap_requests_without_changing_the_verdicts(s3_server, bucket_of_runs):  # noqa: F811
    _, url, _ = bucket_of_runs["dylora"]
    _, one = audit_json(*s3_server.cli_options(), "--jobs", "1", url)
    _, many = audit_json(*s3_server.cli_options(), "--jobs", "8", url)
    # the bytes of a first read depend on which header of the run was read before (the scan's
    # cache sizes it): everything else is the same, requests included
    cost = [(c.pop("storage")["reads"], d.pop("storage")["reads"])
            for c, d in zip(one["checkpoints"], many["checkpoints"])]
    assert many["checkpoints"] == one["checkpoints"]
    assert all(a == b for a, b in cost)
    assert many["totals"] == one["totals"]


@pytest.fixture(scope="session")
def hostile_bucket(s3_server, results_tree):  # noqa: F811
    """Under s3://hostile/runs: a healthy checkpoint as run/checkpoint-1 and run/checkpoint-10
    (keys that are prefixes of each other), keys with '..' and an empty segment, an object
    named as the prefix run/checkpoint-1 is, and huge/checkpoint-5: the healthy checkpoint
    plus a 50 MB model.safetensors whose header claims 100 bytes."""
    fs = s3_server.filesystem()
    fs.mkdir("hostile")
    healthy = results_tree[0] / HEALTHY
    for where in ("runs/run/checkpoint-1", "runs/run/checkpoint-10", "runs/huge/checkpoint-5",
                  "vanish/run/checkpoint-7"):
        assert upload_tree(fs, healthy, f"hostile/{where}") == []
    for key in ("runs/run/../escape.json", "runs/run//twice.json", "runs/run/checkpoint-1"):
        fs.pipe_file(f"hostile/{key}", b"{}")
    header = json.dumps({"w": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}).encode()
    header = header.ljust(100)
    huge = struct.pack("<Q", len(header)) + header + bytes(50 * 2**20 - 8 - len(header))
    fs.pipe_file("hostile/runs/huge/checkpoint-5/model.safetensors", huge)
    return healthy


def test_hostile_keys_are_problems_and_prefix_keys_stay_apart(s3_server, hostile_bucket):  # noqa: F811
    _, doc = audit_json(*s3_server.cli_options(), "s3://hostile/runs")
    problems = {(p["path"], p["code"]) for p in doc["problems"]}
    assert ("run/../escape.json", UNREADABLE) in problems
    assert ("run//twice.json", UNREADABLE) in problems
    assert ("run/checkpoint-1", UNREADABLE) in problems   # an object named as a prefix
    by_path = {c["path"]: c for c in doc["checkpoints"]}
    assert set(by_path) == {"run/checkpoint-1", "run/checkpoint-10", "huge/checkpoint-5"}
    one, ten = by_path["run/checkpoint-1"], by_path["run/checkpoint-10"]
    assert one["status"] == ten["status"] == "healthy"
    assert one["size_bytes"] == ten["size_bytes"] == sum(
        f.stat().st_size for f in hostile_bucket.rglob("*") if f.is_file())


def test_a_huge_object_claiming_a_tiny_header_costs_a_bounded_read(s3_server, hostile_bucket):  # noqa: F811
    code, doc = audit_json(*s3_server.cli_options(), "s3://hostile/runs/huge")
    assert code == 1
    (ckpt,) = doc["checkpoints"]
    assert ckpt["status"] == "broken"
    assert ("bad-header", "checkpoint-5/model.safetensors") in {(p["code"], p["path"])
                                                                for p in ckpt["problems"]}
    files = [f for f in hostile_bucket.rglob("*") if f.is_file()]
    small = sum(f.stat().st_size for f in files)
    # every small file at most once, and of the 50 MB object its first 64 KiB
    for counts in (ckpt["storage"], doc["storage"]):
        assert counts["bytes_read"] <= small + 64 * 1024
        assert counts["reads"] <= len(files) + 2
    assert doc["storage"]["listings"] == 1
    assert ckpt["storage"]["listings"] == 0


def test_a_long_listing_counts_each_page_the_client_asks_for(s3_server):  # noqa: F811
    """s3fs lists 1,000 keys a request: 1,500 keys are two listing requests, and the counts
    say two, as a proxy between them would see."""
    fs = s3_server.filesystem()
    bucket = f"pages-{uuid.uuid4().hex[:8]}"
    fs.mkdir(bucket)
    fs.pipe({f"{bucket}/runs/notes/n{i:04d}.txt": b"x" for i in range(1500)})
    code, doc = audit_json(*s3_server.cli_options(), f"s3://{bucket}/runs")
    assert code == 0 and doc["checkpoints"] == []
    assert doc["storage"]["listings"] == 2
    assert doc["storage"]["requests"] == doc["storage"]["listings"] + doc["storage"]["reads"]


def test_an_object_gone_between_listing_and_reading_is_missing(s3_server, hostile_bucket):  # noqa: F811
    roots, storage = open_storage(["s3://hostile/vanish"], s3_server.options)
    (ckpt,), _ = find_checkpoints(storage, roots[0])
    gone = "dylo_moe_state/config.json"
    assert ckpt.file(gone) is not None
    s3_server.filesystem().rm_file(f"hostile/vanish/run/checkpoint-7/{gone}")
    judged_now = api.classify(ckpt, min_age_s=0, storage=storage)
    assert judged_now.status == "broken"
    assert (MISSING_FILE, f"run/checkpoint-7/{gone}") in {(p.code, p.path)
                                                           for p in judged_now.problems}


def test_memory_url_needs_no_server(results_tree):
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    bucket = f"ckpt-tools-{uuid.uuid4().hex}"
    run = results_tree[0] / Path(HEALTHY).parent
    assert upload_tree(fs, run, f"/{bucket}/run") == []
    try:
        _, here = audit_json(run)
        code, there = audit_json(f"memory://{bucket}/run")
        assert code == 0
        assert judged(there) == judged(here)
        assert there["storage"]["listings"] == 1
        result = CliRunner().invoke(cli, ["validate", "--no-progress", "--json", "--min-age", "0",
                                          f"memory://{bucket}/run"])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["valid"] is True
    finally:
        fs.rm(f"/{bucket}", recursive=True)


def test_file_url_is_the_local_path(results_tree):
    run = results_tree[0] / Path(HEALTHY).parent
    _, here = audit_json(run)
    _, there = audit_json(f"file://{run}")
    assert there == here
    assert "storage" not in there


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ckpt_tools.cli", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)


@pytest.mark.parametrize("args, line", [
    (["prune", "--yes", "gs://bucket/runs"],
     "ckpt-tools: error: gs://bucket/runs: prune needs conditional deletes, which this storage "
     "does not offer"),
    (["migrate", "gs://bucket/runs", "out"],
     "ckpt-tools: error: gs://bucket/runs: migrate on object storage is not supported yet"),
    (["audit", "memory://bucket/runs", "."],
     "ckpt-tools: error: .: local paths and URLs cannot be scanned in one run"),
])
def test_what_cannot_act_on_a_bucket_refuses_in_one_line(args, line, tmp_path):
    proc = _cli(*args)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [line]
    assert proc.stdout == ""
    assert not (REPO / "out").exists()


def test_an_interrupted_strip_in_a_bucket_is_read_from_its_marker(results_tree, tmp_path):
    """The strip marker is read through the storage too: the same warning as on disk."""
    fsspec = pytest.importorskip("fsspec")
    from ckpt_tools.layout import STRIP_MARKER
    from ckpt_tools.problems import STRIP_INTERRUPTED
    from ckpt_tools.retention.strip_marker import STRIPPING, StripMarker
    run = tmp_path / "run"
    shutil.copytree(results_tree[0] / HEALTHY, run / "checkpoint-50")
    (run / "checkpoint-50" / STRIP_MARKER).write_bytes(
        StripMarker(STRIPPING, (("optimizer.pt", 1),), started="2026-01-01T00:00:00").to_json())
    fs = fsspec.filesystem("memory")
    bucket = f"ckpt-tools-{uuid.uuid4().hex}"
    assert upload_tree(fs, run, f"/{bucket}/run") == []
    try:
        _, here = audit_json(run)
        _, there = audit_json(f"memory://{bucket}/run")
        assert judged(there) == judged(here)
        (ckpt,) = there["checkpoints"]
        said = [p["message"] for p in ckpt["problems"] if p["code"] == STRIP_INTERRUPTED]
        assert said == [p["message"] for p in here["checkpoints"][0]["problems"]
                        if p["code"] == STRIP_INTERRUPTED]
        assert "cannot read" not in said[0]
    finally:
        fs.rm(f"/{bucket}", recursive=True)
