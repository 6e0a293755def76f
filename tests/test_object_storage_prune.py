"""Issue 18, item 3: prune on object storage, against a real S3 API server on localhost
(``s3server.s3_server``: moto's standalone server, never a mocked client).

prune in a bucket must delete exactly what prune deletes on the same tree on disk; an object
rewritten between the plan and its DELETE survives (the DELETE names the plan's ETag); the lock
object stops a second run (exit 75) until it is stale, then is taken over; a versioned bucket
counts nothing as freed; a killed run's intent record is finished by the next run; a store
without conditional deletes is refused.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ckpt_tools import api
from ckpt_tools.cli.group import cli
from ckpt_tools.layout import INTENT_DIR, LOCK_FILE
from ckpt_tools.prune.bucket import (CHANGED_SINCE_PLAN, Bucket, BucketRevalidator,
                                     execute_in_bucket, with_etags)
from ckpt_tools.prune.plan import plan_prune
from ckpt_tools.prune.proof import ContentProof
from ckpt_tools.storage import open_storage
from ckpt_tools.storage.bucket_lock import STALE_S, BucketLock
from ckpt_tools.storage.conditional import ConditionalStore
from s3server import s3_server, upload_tree  # noqa: F401 - s3_server is a fixture

# redundant DyLoRA-MoE checkpoints of the fixture tree: canonical (router.pt) and V3
CANONICAL = "run canonical/checkpoint-300"
V3 = "seed_v3/checkpoint-100"
MERGED = "model.safetensors"


def prune_cli(*args) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["prune", "--no-progress", "--min-age", "0", *map(str, args)])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.stdout, result.stderr


def new_bucket(fs) -> str:
    name = f"prune-{uuid.uuid4().hex[:16]}"
    fs.mkdir(name)
    return name


def bucket_of(s3_server, results_tree, *checkpoints: str, versioned: bool = False) -> str:  # noqa: F811
    """A new bucket holding ``checkpoints`` of the fixture tree under ``runs/``; its root URL."""
    fs = s3_server.filesystem()
    name = new_bucket(fs)
    if versioned:
        fs.call_s3("put_bucket_versioning", Bucket=name,
                   VersioningConfiguration={"Status": "Enabled"})
    for c in checkpoints:
        assert upload_tree(fs, results_tree[0] / c, f"{name}/runs/{c}") == []
    return f"s3://{name}/runs"


def keys_under(fs, url: str) -> set[str]:
    root = url.removeprefix("s3://")
    fs.invalidate_cache(root)
    return {k[len(root) + 1:] for k in fs.find(root)}


def planned(s3_server, url: str):  # noqa: F811
    """The plan of ``url`` as the command makes it (--min-age 0), and its bucket."""
    roots, storage = open_storage([url], s3_server.options)
    scan = api.scan(*roots, min_age_s=0, storage=storage)
    bucket = Bucket(storage, ConditionalStore(storage.fs), uuid.uuid4().hex)
    plan = plan_prune(scan.checkpoints, prove=ContentProof(storage=storage), jobs=1)
    return with_etags(plan, bucket), bucket


def rewrite(fs, path: str) -> bytes:
    """Change one byte of an object's tensor data (a new ETag); its new bytes."""
    data = bytearray(fs.cat_file(path))
    data[-1] ^= 0xFF
    fs.pipe_file(path, bytes(data))
    return bytes(data)


# --- the differential test: a bucket prunes as the disk does ---------------------------------

def _copy_readable(src, dst, *, follow_symlinks=True):
    """copytree's copy: a file this user cannot read stays out (the upload leaves it out too)."""
    try:
        return shutil.copy2(src, dst, follow_symlinks=follow_symlinks)
    except PermissionError:
        return dst


def _files(root: Path) -> set[str]:
    return {Path(d, n).relative_to(root).as_posix()
            for d, _, names in os.walk(root) for n in names}


def test_prune_in_a_bucket_deletes_what_prune_deletes_on_disk(s3_server, results_tree, tmp_path):  # noqa: F811
    disk = tmp_path / "results"
    shutil.copytree(results_tree[0], disk, symlinks=True, copy_function=_copy_readable)
    fs = s3_server.filesystem()
    name = new_bucket(fs)
    url = f"s3://{name}/results"
    left_out = upload_tree(fs, disk, f"{name}/results")

    code, dry_disk, _ = prune_cli("--dry-run", "--json", disk)
    assert code == 0
    code, dry_bucket, err = prune_cli("--dry-run", "--json", *s3_server.cli_options(), url)
    assert code == 0, err
    plan_disk, plan_bucket = json.loads(dry_disk), json.loads(dry_bucket)
    planned_paths = {d["path"] for d in plan_disk["deleted"]}
    assert planned_paths and {d["path"] for d in plan_bucket["deleted"]} == planned_paths
    assert keys_under(fs, url) == _files(disk) - set(left_out)   # the dry run changed nothing

    code, out_disk, err = prune_cli("--yes", "--json", disk)
    assert code == 0, err
    code, out_bucket, err = prune_cli("--yes", "--json", *s3_server.cli_options(), url)
    assert code == 0, err
    done_disk, done_bucket = json.loads(out_disk), json.loads(out_bucket)
    assert {d["path"] for d in done_bucket["deleted"]} == planned_paths
    assert {d["path"] for d in done_disk["deleted"]} == planned_paths
    # a bucket's bytes are the objects' sizes, which the plan listed
    assert done_bucket["freed_bytes"] == sum(os.lstat(results_tree[0] / p).st_size
                                             for p in planned_paths)
    # What is left must agree, with these differences by nature: the disk keeps its lock
    # file (flock's; the lock object is deleted at the end) and what the upload left out
    # (symlinks, unreadable files); the bucket holds no intent record after a finished run.
    left_disk = _files(disk) - {LOCK_FILE} - set(left_out)
    assert keys_under(fs, url) == left_disk
    assert not planned_paths & left_disk
    # what the run sent: a dry run writes nothing; the real run, per checkpoint pruned, one
    # intent record PUT and DELETE and a DELETE per merged object, and the lock's own requests
    # (its create and the two refused requests that prove the conditions hold; its release
    # comes after the document is written)
    assert plan_bucket["storage"]["writes"] == 0 and plan_bucket["storage"]["reads"] > 0
    pruned = {p.rsplit("/", 1)[0] for p in planned_paths}
    counts = done_bucket["storage"]
    assert counts["writes"] == 2 * len(pruned) + len(planned_paths) + 3
    assert counts["requests"] == counts["listings"] + counts["reads"] + counts["writes"]


# --- conditional deletes ---------------------------------------------------------------------

def test_an_object_rewritten_between_the_checks_and_its_delete_survives(s3_server, results_tree):  # noqa: F811
    url = bucket_of(s3_server, results_tree, CANONICAL, V3)
    fs = s3_server.filesystem()
    plan, bucket = planned(s3_server, url)
    assert {d.path for d in plan.deletions} == {f"{CANONICAL}/{MERGED}", f"{V3}/{MERGED}"}
    assert all(d.etag for d in plan.deletions)
    changed = {}

    def rewrite_v3(ckpt, deletions):
        # after the listing, the re-validation, the proof and the intent record: only the
        # DELETE's If-Match can keep this object now
        if ckpt.path == V3:
            changed["bytes"] = rewrite(fs, f"{url[5:]}/{V3}/{MERGED}")

    result = execute_in_bucket(plan, bucket,
                               revalidate=BucketRevalidator(bucket.storage, min_age_s=0),
                               before_delete=rewrite_v3)
    assert [d.path for d in result.deleted] == [f"{CANONICAL}/{MERGED}"]
    assert [(s.path, s.reason) for s in result.changed] == [(f"{V3}/{MERGED}", CHANGED_SINCE_PLAN)]
    assert not result.ok
    left = keys_under(fs, url)
    assert f"{V3}/{MERGED}" in left and f"{CANONICAL}/{MERGED}" not in left
    assert fs.cat_file(f"{url[5:]}/{V3}/{MERGED}") == changed["bytes"]
    assert not any(k.startswith(INTENT_DIR) for k in left)


def test_an_object_rewritten_after_the_plan_is_skipped_when_listed_again(s3_server, results_tree):  # noqa: F811
    url = bucket_of(s3_server, results_tree, V3)
    fs = s3_server.filesystem()
    plan, bucket = planned(s3_server, url)
    rewrite(fs, f"{url[5:]}/{V3}/{MERGED}")   # the proof, made again, fails: still kept
    result = execute_in_bucket(plan, bucket,
                               revalidate=BucketRevalidator(bucket.storage, min_age_s=0))
    assert result.deleted == ()
    assert [s.path for s in result.changed] == [f"{V3}/{MERGED}"]
    assert f"{V3}/{MERGED}" in keys_under(fs, url)


# --- the lock object ---------------------------------------------------------------------------

def _lock_of(s3_server, url: str, *, age_s: float) -> BucketLock:  # noqa: F811
    """Another run's lock on ``url``'s root, last refreshed ``age_s`` ago (never refreshed
    again: as a run that died, or hangs)."""
    import time
    store = ConditionalStore(s3_server.filesystem())
    lock = BucketLock(store, f"{url[5:]}/{LOCK_FILE}", "other-run",
                      clock=lambda: time.time() - age_s, refresh_s=0)
    lock.acquire()
    return lock


@pytest.mark.parametrize("age_s, code", [(STALE_S - 120, 75), (STALE_S + 120, 0)])
def test_a_live_lock_stops_a_second_run_and_a_stale_one_is_taken_over(
        s3_server, results_tree, age_s, code):  # noqa: F811
    url = bucket_of(s3_server, results_tree, V3)
    fs = s3_server.filesystem()
    other = _lock_of(s3_server, url, age_s=age_s)
    got, _, err = prune_cli("--yes", *s3_server.cli_options(), url)
    assert got == code, err
    left = keys_under(fs, url)
    if code == 75:
        (line,) = err.splitlines()
        assert line.startswith(f"ckpt-tools: another ckpt-tools run holds the lock "
                               f"{url}/{LOCK_FILE} (host ")
        assert "run_id other-run" in line
        assert f"{V3}/{MERGED}" in left
        assert fs.info(other.path)["ETag"] == other.etag   # its lock untouched
        other.release()
        assert LOCK_FILE not in keys_under(fs, url)
    else:
        assert f"{V3}/{MERGED}" not in left
        assert LOCK_FILE not in left   # taken over, then released by a conditional delete
        other.release()   # its conditional delete names the stale ETag: refused, nothing deleted


def test_a_lock_refresh_names_its_own_etag_and_finds_a_takeover(s3_server):  # noqa: F811
    fs = s3_server.filesystem()
    name = new_bucket(fs)
    store = ConditionalStore(fs)
    now = [1_000_000.0]
    lock = BucketLock(store, f"{name}/runs/{LOCK_FILE}", "mine", clock=lambda: now[0],
                      refresh_s=0)
    lock.acquire()
    first = lock.etag
    now[0] += 300
    lock.refresh()
    assert lock.etag != first and lock.lost is None
    assert json.loads(fs.cat_file(lock.path))["refreshed_epoch"] == now[0]
    # another run finds it stale and takes it over: delete on its ETag, then create
    thief = BucketLock(store, lock.path, "thief", clock=lambda: now[0] + STALE_S + 1,
                       refresh_s=0)
    thief.acquire()
    assert thief.took_over["run_id"] == "mine"
    lock.refresh()
    assert lock.lost is not None and "taken over" in lock.lost
    lock.release()   # never deletes the thief's lock
    assert json.loads(fs.cat_file(lock.path))["run_id"] == "thief"
    thief.release()
    assert not fs.exists(lock.path)


class _IgnoringStore(ConditionalStore):
    """The real server, asked as a store that ignores one kind of condition would be asked:
    the condition is left off the request, so the server carries it out regardless."""

    def __init__(self, fs, ignores: str):
        super().__init__(fs)
        self.ignores = ignores

    def create(self, path, body):
        if self.ignores == "create":
            return self.put(path, body)
        return super().create(path, body)

    def delete(self, path, etag):
        if self.ignores == "delete":
            return self._call("delete_object", path)
        return super().delete(path, etag)


@pytest.mark.parametrize("ignores, says", [("create", "If-None-Match: * on PUT"),
                                           ("delete", "If-Match on DELETE")])
def test_a_store_that_ignores_conditions_is_refused_before_anything_is_done(s3_server, ignores, says):  # noqa: F811
    from ckpt_tools.storage.conditional import ConditionsIgnored
    fs = s3_server.filesystem()
    name = new_bucket(fs)
    lock = BucketLock(_IgnoringStore(fs, ignores), f"{name}/runs/{LOCK_FILE}", "mine", refresh_s=0)
    with pytest.raises(ConditionsIgnored) as info:
        lock.acquire()
    assert info.value.exit_code == 2
    assert str(info.value) == (f"{lock.url}: the store ignored a conditional request ({says}): "
                               "prune cannot keep its promises here")
    assert not fs.exists(lock.path)   # the lock it took is let go: the next run is not held
    # the real store honours both: the same proof passes and the lock is held
    honest = BucketLock(ConditionalStore(fs), lock.path, "mine", refresh_s=0)
    honest.acquire()
    assert json.loads(fs.cat_file(lock.path))["run_id"] == "mine"
    honest.release()
    assert not fs.exists(lock.path)


def test_a_held_lock_is_refreshed_in_the_background_until_released(s3_server):  # noqa: F811
    import time
    fs = s3_server.filesystem()
    store = ConditionalStore(fs)
    ticks = iter(range(1_000_000, 2_000_000, 60))
    lock = BucketLock(store, f"{new_bucket(fs)}/runs/{LOCK_FILE}", "mine",
                      clock=lambda: float(next(ticks)), refresh_s=0.05)
    lock.acquire()
    first = json.loads(fs.cat_file(lock.path))["refreshed_epoch"]
    deadline = time.monotonic() + 10
    while json.loads(fs.cat_file(lock.path))["refreshed_epoch"] == first:
        assert time.monotonic() < deadline, "the lock was never refreshed"
        time.sleep(0.05)
    lock.release()
    assert not fs.exists(lock.path) and lock.lost is None


def test_a_run_that_lost_its_lock_starts_no_other_checkpoint(s3_server, results_tree):  # noqa: F811
    url = bucket_of(s3_server, results_tree, CANONICAL, V3)
    plan, bucket = planned(s3_server, url)
    result = execute_in_bucket(plan, bucket,
                               revalidate=BucketRevalidator(bucket.storage, min_age_s=0),
                               stop=lambda: "the lock was taken over")
    assert result.deleted == () and len(result.stopped) == 2
    assert {f"{CANONICAL}/{MERGED}", f"{V3}/{MERGED}"} <= keys_under(s3_server.filesystem(), url)


# --- a versioned bucket -------------------------------------------------------------------------

def test_a_versioned_bucket_deletes_but_counts_nothing_freed(s3_server, results_tree):  # noqa: F811
    url = bucket_of(s3_server, results_tree, V3, versioned=True)
    fs = s3_server.filesystem()
    size = (results_tree[0] / V3 / MERGED).stat().st_size
    bucket = url[5:].split("/")[0]
    hidden = (f"{url}: versioning is enabled in bucket {bucket}: a delete only adds a delete "
              f"marker: {_size(size)} stay, hidden behind delete markers; the bucket's "
              "lifecycle rules free them")
    code, out, err = prune_cli("--dry-run", *s3_server.cli_options(), url)
    assert code == 0 and f"A real run would free {_size(0)}." in out
    assert hidden in err.splitlines()
    code, out, err = prune_cli("--yes", "--json", *s3_server.cli_options(), url)
    assert code == 0, err
    doc = json.loads(out)
    assert [d["path"] for d in doc["deleted"]] == [f"{V3}/{MERGED}"]
    assert doc["freed_bytes"] == 0 and doc["deleted"][0]["bytes"] == 0
    assert [line for line in err.splitlines() if "delete marker" in line] == [hidden]
    assert f"{V3}/{MERGED}" not in keys_under(fs, url)
    versions = fs.call_s3("list_object_versions", Bucket=bucket,
                          Prefix=f"runs/{V3}/{MERGED}")
    assert len(versions.get("Versions", [])) == 1 and len(versions.get("DeleteMarkers", [])) == 1


def _size(n: int) -> str:
    from ckpt_tools.report import size_str
    return size_str(n)


# --- intent records -------------------------------------------------------------------------------

class _Killed(BaseException):
    """Stands for the run being killed between its intent record and its DELETEs."""


def _killed_run(s3_server, url: str) -> str:  # noqa: F811
    plan, bucket = planned(s3_server, url)

    def kill(ckpt, deletions):
        raise _Killed

    with pytest.raises(_Killed):
        execute_in_bucket(plan, bucket, revalidate=BucketRevalidator(bucket.storage, min_age_s=0),
                          before_delete=kill)
    (record,) = [k for k in keys_under(s3_server.filesystem(), url) if k.startswith(INTENT_DIR)]
    return record


def test_a_killed_runs_intent_is_finished_by_the_next_run(s3_server, results_tree):  # noqa: F811
    url = bucket_of(s3_server, results_tree, V3)
    fs = s3_server.filesystem()
    record = _killed_run(s3_server, url)
    intent = json.loads(fs.cat_file(f"{url[5:]}/{record}"))
    assert [d["key"] for d in intent["delete"]] == [f"{url[5:]}/{V3}/{MERGED}"]
    code, _, err = prune_cli("--dry-run", *s3_server.cli_options(), url)
    assert code == 0 and "a run with --yes finishes it first" in err
    assert f"{V3}/{MERGED}" in keys_under(fs, url)
    code, _, err = prune_cli("--yes", *s3_server.cli_options(), url)
    assert code == 0, err
    assert (f"finished the interrupted prune run {intent['run_id']} in {V3}: 1 deleted now"
            in err)
    left = keys_under(fs, url)
    assert f"{V3}/{MERGED}" not in left and record not in left


def test_a_killed_runs_intent_whose_peft_tree_changed_deletes_nothing(s3_server, results_tree):  # noqa: F811
    url = bucket_of(s3_server, results_tree, V3)
    fs = s3_server.filesystem()
    record = _killed_run(s3_server, url)
    adapter = next(k for k in keys_under(fs, url) if k.endswith(".pt") and "peft_adapters" in k)
    rewrite(fs, f"{url[5:]}/{adapter}")
    code, _, err = prune_cli("--yes", *s3_server.cli_options(), url)
    assert code == 0, err
    assert "changed since the interrupted run proved the merged weights redundant" in err
    left = keys_under(fs, url)
    assert f"{V3}/{MERGED}" in left and record not in left


def test_a_bucket_that_does_not_exist_is_one_line(s3_server):  # noqa: F811
    code, out, err = prune_cli("--yes", *s3_server.cli_options(), "s3://no-such-bucket-here/runs")
    assert code == 2 and out == ""
    (line,) = err.splitlines()
    assert line == ("ckpt-tools: error: s3://no-such-bucket-here/runs: cannot take the "
                    "lock s3://no-such-bucket-here/runs/.ckpt-tools.lock: no such bucket")


@pytest.mark.parametrize("args", [["--dry-run"], ["--yes"]])
def test_a_store_that_refuses_the_credentials_is_one_line(s3_server, tmp_path, args):  # noqa: F811
    """No credentials anywhere (environment, profile): one line naming the cause, exit 2,
    before anything is planned; a dry run too (it looks for a killed run's intent records)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env |= {"AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
            "AWS_CONFIG_FILE": str(tmp_path / "none"), "AWS_EC2_METADATA_DISABLED": "true"}
    done = subprocess.run([sys.executable, "-m", "ckpt_tools.cli", "prune", *args,
                           "--storage-option", f"endpoint_url={s3_server.endpoint}",
                           "s3://bucket/runs"], capture_output=True, text=True, env=env)
    assert done.returncode == 2 and done.stdout == ""
    (line,) = done.stderr.splitlines()
    assert line.startswith("ckpt-tools: error: s3://bucket/runs: ") and "credentials" in line, line


# --- what is refused --------------------------------------------------------------------------------

@pytest.mark.parametrize("url", ["gs://bucket/runs", "memory://bucket/runs"])
def test_a_store_without_conditional_deletes_is_refused(url):
    code, out, err = prune_cli("--yes", url)
    assert code == 2 and out == ""
    assert err.splitlines() == [f"ckpt-tools: error: {url}: prune needs conditional deletes, "
                                "which this storage does not offer"]

