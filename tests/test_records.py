"""The typed records: enums that are the documented strings, named FileRecord rows, Problems
with a Severity, and ``Checkpoint.from_verdict`` as the one way from a verdict to a record."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
from unittest import mock

import pytest

import ckpt_tools
from ckpt_tools import api, scanner
from ckpt_tools.kinds import (Layout, MergedKind, MigrateAction, MigrateMethod, ModelKind, PruneAction,
                              RetentionAction, SpaceRole, Status, TreeForm)
from ckpt_tools.problems import TRUNCATED, Problem, Severity
from ckpt_tools.prune.plan import Skip, plan_prune
from ckpt_tools.records import Checkpoint, CheckpointDir, FileRecord
from ckpt_tools.validator import validate_checkpoint

# The strings the README and SPEC document, spelled out here so that a renamed member fails.
DOCUMENTED = {
    Status: ["healthy", "redundant", "legacy", "broken", "in-progress"],
    Layout: ["canonical", "canonical+merged", "v0", "v1", "v2", "v3", "v4", "v5", "hf-merged",
             "adapter", "adapters", "model", "sharded", "deepspeed", "fsdp", "unknown"],
    ModelKind: ["dylora-moe", "peft-adapter", "full-model", "deepspeed", "fsdp", "unknown"],
    TreeForm: ["dirs", "nested", "flat", "none"],
    MergedKind: ["v0", "v1", "hf", "hf-lora", "unreadable"],
    PruneAction: ["plan", "delete", "skip", "fail", "strip", "trash", "purge"],
    RetentionAction: ["keep", "strip", "delete"],
    MigrateAction: ["migrate", "skip", "done"],
    MigrateMethod: ["copy", "exact", "svd"],
    Severity: ["error", "warning"],
    SpaceRole: ["weights", "adapters", "redundant_merged", "training_state", "trash", "other"],
}


@pytest.mark.parametrize("enum", list(DOCUMENTED), ids=lambda e: e.__name__)
def test_each_enum_is_exactly_its_documented_strings(enum):
    assert [m.value for m in enum] == DOCUMENTED[enum]
    for member, text in zip(enum, DOCUMENTED[enum]):
        # equal to, hashed like, printed and serialised as the plain string
        assert member == text and {text: 1}[member] == 1 and enum(text) is member
        assert f"{member}" == str(member) == text
        assert json.dumps({member: [member]}) == json.dumps({text: [text]})


def test_status_order_is_the_order_of_the_json_totals(results_tree):
    root, _, now = results_tree
    doc = json.loads(json.dumps(ckpt_tools.scan(str(root), now=now).to_dict()))
    assert list(doc["totals"]["by_status"]) == DOCUMENTED[Status]
    assert {c["status"] for c in doc["checkpoints"]} <= set(DOCUMENTED[Status])
    assert {c["layout"] for c in doc["checkpoints"]} <= set(DOCUMENTED[Layout])


def test_a_file_record_is_a_named_tuple_that_pickles_like_one():
    rec = FileRecord("peft_adapters/expert_0/adapter_model.safetensors", 10, 4096, 1, 2, 1, 3,
                     True, "/r/x", False, 9, False, 1000)
    assert FileRecord._fields == (
        "relpath", "size", "allocated", "dev", "ino", "nlink", "mtime_ns", "is_symlink",
        "symlink_target", "escapes_root", "target_size", "is_regular", "uid")
    assert [getattr(rec, f) for f in FileRecord._fields] == list(rec)   # index i is field i
    copy = pickle.loads(pickle.dumps(rec))
    assert copy == rec and type(copy) is FileRecord and copy.identity == (1, 2, 10, 3)
    assert rec.name == "adapter_model.safetensors"
    with pytest.raises(AttributeError):
        rec.size = 11  # noqa: B018 - immutable
    plain = FileRecord("a", 1, 512, 1, 2, 1, 3)   # the defaults: a regular file, no link
    assert (plain.is_symlink, plain.symlink_target, plain.escapes_root, plain.target_size,
            plain.is_regular, plain.uid) == (False, None, False, None, True, None)


def test_records_are_built_by_their_constructors():
    d = CheckpointDir.from_values(("r", "run/checkpoint-1", "run", "checkpoint-1", 1,
                                   (("b", 1, 512, 1, 5, 1, 0, False, None, False, None, True, 0),),
                                   0, False, (), 0, 0))
    assert type(d.files[0]) is FileRecord and d.file("b").ino == 5
    assert "files" in vars(d)   # a plain field, not built behind __getattr__
    c = Checkpoint(d, "redundant", "canonical+merged", (), ("b",), 2, 512)
    assert c.status is Status.REDUNDANT and c.layout is Layout.CANONICAL_MERGED
    with pytest.raises(ValueError):
        Checkpoint(d, "half-done", "canonical", (), (), None)
    assert c.with_reclaimable(512) == dataclasses.replace(c, reclaimable_bytes=512)


def test_problems_are_frozen_with_a_severity():
    p = Problem(TRUNCATED, "run/checkpoint-1/model.safetensors", "ends early", "warning")
    assert p.severity is Severity.WARNING and not p.is_error
    assert Problem(TRUNCATED, "x", "m").severity is Severity.ERROR
    with pytest.raises(dataclasses.FrozenInstanceError):
        p.code = "other"  # noqa: B018
    with pytest.raises(ValueError):
        Problem(TRUNCATED, "x", "m", "fatal")
    doc = p.to_dict()
    assert json.loads(json.dumps(doc)) == {"code": "truncated", "path": p.path,
                                           "message": "ends early", "severity": "warning"}
    assert Problem.from_dict(json.loads(json.dumps(doc))) == p
    assert pickle.loads(pickle.dumps(p)) == p


def test_from_verdict_gives_the_scans_record_for_every_fixture_checkpoint(results_tree):
    root, manifest, now = results_tree
    dirs, _ = scanner.find_checkpoints(str(root))
    assert {d.path for d in dirs} == set(manifest.checkpoints)
    made = {}
    for d in dirs:
        v = validate_checkpoint(d, now=now)
        c = Checkpoint.from_verdict(d, v, api._size(d))
        # field for field what the verdict says
        assert (c.dir, c.status, c.layout, c.problems, c.merged_files, c.num_experts, c.facts) == \
            (d, v.status, v.layout, tuple(v.problems), v.merged_files, v.num_experts, v.facts)
        assert c.status == manifest[d.path].status_for(os.geteuid())
        assert c.layout == manifest[d.path].layout
        made[d.path] = c
    # and the records a scan builds, in this process and from forked workers, are the same
    # records with what prune could free filled in
    freed = plan_prune(made.values(), prove=False).by_checkpoint()
    for jobs in (1, 2):
        with mock.patch.object(api, "_MIN_PER_PROCESS", 1):
            result = ckpt_tools.scan(str(root), now=now, jobs=jobs)
        assert len(result.checkpoints) == len(made)
        for c in result.checkpoints:
            want = made[c.path].with_reclaimable(freed.get((c.dir.root, c.path), 0))
            assert c == want and c.facts == want.facts and c.to_dict() == want.to_dict()
            assert type(c.status) is Status and type(c.layout) is Layout
            assert all(type(f) is FileRecord for f in c.dir.files)


def test_skips_name_the_documented_status(results_tree):
    root, _, now = results_tree
    plan = plan_prune(ckpt_tools.scan(str(root), now=now).checkpoints, prove=False)
    assert plan.skipped and all(isinstance(s, Skip) for s in plan.skipped)
    for s in plan.skipped:
        assert s.status in DOCUMENTED[Status]
        assert s.reason.split(":")[0].removesuffix(" (fresh)") in DOCUMENTED[Status]
