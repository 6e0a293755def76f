"""Issue 18, item 3: retention (``--keep-* --strip|--delete``) in a bucket, against a real S3 API
server on localhost (``s3server.s3_server``: moto's standalone server, never a mocked client).

The same runs uploaded to a bucket and copied to disk must keep the same files: a strip removes
the same resume-only objects as files, a ``--delete`` in the bucket (no trash there) leaves what
``--delete --purge-now`` leaves on disk, and the plan decides the same. An object rewritten
between the plan and its DELETE survives; a new object in a checkpoint stops its deletion; a
killed ``--delete`` is finished by the next run; a versioned bucket counts nothing freed.
"""

from __future__ import annotations

import json
import shutil
import time
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpt_tools import api, layout
from ckpt_tools.cli.group import cli
from ckpt_tools.prune.bucket import CHANGED_SINCE_PLAN, Bucket, BucketRevalidator
from ckpt_tools.report import size_str
from ckpt_tools.retention.bucket import execute_retention_in_bucket, for_bucket
from ckpt_tools.retention.plan import plan_retention
from ckpt_tools.retention.rules import Policy, Rules
from ckpt_tools.retention.strip_marker import STRIPPED, STRIPPING, StripMarker, parse_marker
from ckpt_tools.storage import open_storage
from ckpt_tools.storage.conditional import ConditionalStore
from s3server import s3_server, upload_tree  # noqa: F401 - s3_server is a fixture

RUNS = ("full", "peft-lora", "sharded")   # 3 checkpoints each (steps 2, 4, 6)
OWN = {layout.LOCK_FILE, layout.INTENT_DIR, layout.TRASH_DIR}


def prune_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["prune", "--no-progress", "--min-age", "0", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


@pytest.fixture
def both(s3_server, ordinary_runs, tmp_path):  # noqa: F811
    """RUNS copied to ``tmp_path/runs`` and uploaded to a new bucket: (disk root, root URL)."""
    return _both(s3_server, ordinary_runs, tmp_path)


def _both(s3_server, ordinary_runs, tmp_path, versioned: bool = False,  # noqa: F811
          runs: tuple[str, ...] = RUNS):
    src, _ = ordinary_runs
    fs = s3_server.filesystem()
    name = f"retain-{uuid.uuid4().hex[:16]}"
    fs.mkdir(name)
    if versioned:
        fs.call_s3("put_bucket_versioning", Bucket=name,
                   VersioningConfiguration={"Status": "Enabled"})
    for run in runs:
        shutil.copytree(src / run, tmp_path / "runs" / run, symlinks=True)
        assert upload_tree(fs, src / run, f"{name}/runs/{run}") == []
    return tmp_path / "runs", f"s3://{name}/runs"


def files_under(root: Path) -> set[str]:
    """The files under a disk root, ckpt-tools' lock and trash left out."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*")
            if p.is_file() and not OWN & set(p.relative_to(root).parts)}


def keys_under(s3_server, url: str) -> set[str]:  # noqa: F811
    """The objects under a root URL, ckpt-tools' lock and intent records left out."""
    fs = s3_server.filesystem()
    root = url.removeprefix("s3://")
    return {k[len(root) + 1:] for k in fs.find(root)
            if not OWN & set(k[len(root) + 1:].split("/"))}


def test_strip_in_a_bucket_removes_the_objects_it_removes_as_files(s3_server, both):  # noqa: F811
    disk, url = both
    before = files_under(disk)
    assert keys_under(s3_server, url) == before
    assert prune_cli("--yes", "--keep-last", "1", "--strip", disk)[0] == 0
    fs = s3_server.filesystem()
    sizes = {k: v["size"] for k, v in fs.find(url.removeprefix("s3://"), detail=True).items()}
    code, out, err = prune_cli("--yes", "--json", "--keep-last", "1", "--strip",
                               *s3_server.cli_options(), url)
    assert code == 0, err
    # the bytes it says it freed are the bytes that left the bucket, the markers' counted
    left = {k: v["size"] for k, v in fs.find(url.removeprefix("s3://"), detail=True).items()}
    assert json.loads(out)["retention"]["freed_bytes_now"] == sum(sizes.values()) - sum(left.values()) > 0
    after = files_under(disk)
    assert any(layout.is_resume_only(p.split("/", 2)[2]) for p in before - after)
    assert keys_under(s3_server, url) == after   # the strip markers included, on both
    marker = f"{url.removeprefix('s3://')}/full/checkpoint-2/{layout.STRIP_MARKER}"
    written = parse_marker(s3_server.filesystem().cat_file(marker))
    assert written.state == STRIPPED and written.files
    assert f"full/checkpoint-6/{layout.STRIP_MARKER}" not in after   # kept: not stripped


def test_delete_in_a_bucket_leaves_what_delete_and_purge_leave_on_disk(s3_server, both,  # noqa: F811
                                                                      tmp_path):
    disk, url = both
    assert prune_cli("--yes", "--keep-last", "1", "--delete", "--purge-now", disk)[0] == 0
    log = tmp_path / "prune.jsonl"
    code, out, err = prune_cli("--yes", "--json", "--keep-last", "1", "--delete", "--log", log,
                               *s3_server.cli_options(), url)
    assert code == 0, err
    after = files_under(disk)
    assert not any(p.startswith("full/checkpoint-2/") for p in after)
    assert keys_under(s3_server, url) == after
    done = json.loads(out)["retention"]
    assert {d["path"] for d in done["deleted"]} == {f"{r}/checkpoint-{s}" for r in RUNS
                                                    for s in (2, 4)}
    assert done["freed_bytes_now"] == sum(d["bytes"] for d in done["deleted"]) > 0
    assert done["trashed"] == [] and done["freed_bytes_when_purged"] == 0
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    deleted = [r["path"] for r in lines if r["action"] == "delete"]
    assert sorted(deleted) == sorted(f"{url}/{d['path']}" for d in done["deleted"])
    assert lines[-1]["counts"]["delete"] == 6


def test_the_plan_in_a_bucket_decides_as_on_disk(s3_server, both):  # noqa: F811
    disk, url = both
    pin = b"keep_steps = [2]\n"   # the run's own policy file, read from the bucket too
    (disk / "full" / layout.RUN_POLICY).write_bytes(pin)
    s3_server.filesystem().pipe_file(f"{url.removeprefix('s3://')}/full/{layout.RUN_POLICY}", pin)
    args = ("--dry-run", "--json", "--keep-last", "1", "--keep-every", "4", "--delete")
    code, on_disk, _ = prune_cli(*args, disk)
    assert code == 0
    code, in_bucket, err = prune_cli(*args, "--purge-now", *s3_server.cli_options(), url)
    assert code == 0, err

    def decisions(doc):
        return [(d["path"], d["action"], d["reasons"]) for d in
                json.loads(doc)["retention"]["decisions"]]

    assert decisions(in_bucket) == decisions(on_disk)
    assert {a for _, a, _ in decisions(on_disk)} == {"keep", "delete"}
    assert ("full/checkpoint-2", "keep", ["pinned: user"]) in decisions(in_bucket)
    assert err.splitlines() == [f"{url}: --purge-after and --purge-now mean nothing in a bucket: "
                                "it has no trash (a rename is a copy there), so a checkpoint "
                                "--delete removes is deleted at once; the bucket's versioning "
                                "and lifecycle rules are its grace period"]
    assert keys_under(s3_server, url) == files_under(disk)   # a dry run changes nothing


def planned(s3_server, url: str, action: str = "delete"):  # noqa: F811
    """The retention plan (--keep-last 1 ``action``, --min-age 0) of ``url`` made for the bucket."""
    roots, storage = open_storage([url], s3_server.options)
    scan = api.scan(*roots, min_age_s=0, storage=storage)
    policy = Policy.from_flags(Rules(keep_last=1), action)
    bucket = Bucket(storage, ConditionalStore(storage.fs), uuid.uuid4().hex)
    kept = plan_retention(scan, policy, now=time.time(), min_age_s=0, purge_after_s=0,
                          storage=storage)
    return for_bucket(kept, bucket), bucket


def execute(retention, bucket, before_delete=None):
    return execute_retention_in_bucket(
        retention, bucket, now=time.time(), before_delete=before_delete,
        revalidate=BucketRevalidator(bucket.storage, min_age_s=0, prove=False))


def test_an_object_rewritten_between_plan_and_delete_survives(s3_server, ordinary_runs,  # noqa: F811
                                                              tmp_path):
    _, url = _both(s3_server, ordinary_runs, tmp_path, runs=("full",))
    retention, bucket = planned(s3_server, url)
    fs = s3_server.filesystem()
    root = url.removeprefix("s3://")
    target = "full/checkpoint-2/trainer_state.json"

    def rewrite(checkpoint):
        if checkpoint.path == "full/checkpoint-2":
            fs.pipe_file(f"{root}/{target}", fs.cat_file(f"{root}/{target}") + b" ")

    result = execute(retention, bucket, before_delete=rewrite)
    assert (url, target, CHANGED_SINCE_PLAN) in result.skipped
    left = keys_under(s3_server, url)
    assert {k for k in left if k.startswith("full/checkpoint-2/")} == {target}
    assert not any(k.startswith("full/checkpoint-4/") for k in left)
    assert "full/checkpoint-2" not in {p for _, p, _ in result.deleted}
    assert fs.find(f"{root}/{layout.INTENT_DIR}") == []   # the record went with the run


def test_a_new_object_in_the_checkpoint_stops_its_deletion(s3_server, ordinary_runs,  # noqa: F811
                                                           tmp_path):
    _, url = _both(s3_server, ordinary_runs, tmp_path, runs=("sharded",))
    retention, bucket = planned(s3_server, url)
    fs = s3_server.filesystem()
    root = url.removeprefix("s3://")
    fs.pipe_file(f"{root}/sharded/checkpoint-4/optimizer.pt.partial", b"being written")
    result = execute(retention, bucket)
    assert (url, "sharded/checkpoint-4", "changed since the plan: optimizer.pt.partial appeared "
            "(it is being written again)") in result.skipped
    left = keys_under(s3_server, url)
    assert "sharded/checkpoint-4/model.safetensors.index.json" in left
    assert not any(k.startswith("sharded/checkpoint-2/") for k in left)


class Killed(BaseException):
    pass


def test_a_killed_delete_is_finished_by_the_next_run(s3_server, ordinary_runs,  # noqa: F811
                                                     tmp_path):
    disk, url = _both(s3_server, ordinary_runs, tmp_path, runs=("sharded",))
    retention, bucket = planned(s3_server, url)
    fs = s3_server.filesystem()
    root = url.removeprefix("s3://")
    shard = "sharded/checkpoint-2/model-00001-of-00002.safetensors"

    def killed(checkpoint):   # the first checkpoint: one shard deleted, then the run is killed
        fs.rm(f"{root}/{shard}")
        raise Killed

    with pytest.raises(Killed):
        execute(retention, bucket, before_delete=killed)
    assert len(fs.find(f"{root}/{layout.INTENT_DIR}")) == 1
    assert "sharded/checkpoint-2/model.safetensors.index.json" in keys_under(s3_server, url)
    # without the record, the half-deleted checkpoint would be broken: pinned, kept for ever
    code, _, err = prune_cli("--yes", "--keep-last", "1", "--delete", *s3_server.cli_options(),
                             url)
    assert code == 0, err
    assert "finished the interrupted prune run" in err
    assert prune_cli("--yes", "--keep-last", "1", "--delete", "--purge-now", disk)[0] == 0
    assert keys_under(s3_server, url) == files_under(disk)
    assert fs.find(f"{root}/{layout.INTENT_DIR}") == []


def test_a_killed_strip_is_finished_by_the_next_run(s3_server, ordinary_runs,  # noqa: F811
                                                    tmp_path):
    _, url = _both(s3_server, ordinary_runs, tmp_path, runs=("peft-lora",))
    fs = s3_server.filesystem()
    ckpt = f"{url.removeprefix('s3://')}/peft-lora/checkpoint-2"
    resume_only = sorted(k for k in fs.find(ckpt) if layout.is_resume_only(k[len(ckpt) + 1:]))
    assert len(resume_only) >= 2
    first = resume_only[0][len(ckpt) + 1:]
    fs.pipe_file(f"{ckpt}/{layout.STRIP_MARKER}",
                 StripMarker(STRIPPING, ((first, 10),), "2026-01-01T00:00:00+00:00").to_json())
    fs.rm(resume_only[0])   # killed after its first DELETE
    code, _, err = prune_cli("--yes", "--keep-last", "1", "--strip", *s3_server.cli_options(), url)
    assert code == 0, err
    assert not any(fs.exists(k) for k in resume_only)
    marker = parse_marker(fs.cat_file(f"{ckpt}/{layout.STRIP_MARKER}"))
    assert marker.state == STRIPPED and first in dict(marker.files)


def test_a_versioned_bucket_counts_nothing_freed_by_retention(s3_server, ordinary_runs,  # noqa: F811
                                                              tmp_path):
    _, url = _both(s3_server, ordinary_runs, tmp_path, versioned=True, runs=("full",))
    code, out, err = prune_cli("--yes", "--json", "--keep-last", "1", "--delete",
                               *s3_server.cli_options(), url)
    assert code == 0, err
    done = json.loads(out)["retention"]
    assert len(done["deleted"]) == 2 and done["freed_bytes_now"] == 0
    bucket = url.removeprefix("s3://").split("/")[0]
    hidden = sum(p.stat().st_size for s in (2, 4)
                 for p in (ordinary_runs[0] / "full" / f"checkpoint-{s}").rglob("*") if p.is_file())
    assert [line for line in err.splitlines() if "delete marker" in line] == [
        f"{url}: versioning is enabled in bucket {bucket}: a delete only adds a delete marker: "
        f"{size_str(hidden)} stay, hidden behind delete markers; the bucket's lifecycle rules "
        "free them"]
    assert not any(k.startswith("full/checkpoint-2/") for k in keys_under(s3_server, url))
