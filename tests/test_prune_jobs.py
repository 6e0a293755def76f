"""prune's execution in worker processes does what one process does: the same files
deleted, the same bytes counted, the same report, each action logged once; a worker that
dies leaves its checkpoints to the parent."""

from __future__ import annotations

import json
import os
from pathlib import Path

from click.testing import CliRunner
from fixtures.copying import copy_tree

import ckpt_tools.prune.execute as prune_exec
from ckpt_tools import plan_prune, scan
from ckpt_tools.cli import cli
from ckpt_tools.prune import ActionLog, Revalidator, execute_prune
from test_prune import allocated_bytes, link_twin, listing, restamp_young


def _plan(root: Path, now: float):
    return plan_prune(scan(str(root), now=now).checkpoints)


def _shape(tree: Path) -> dict:
    return {k: v[:2] for k, v in listing(tree).items()}   # type and size: inodes differ per copy


def _run(root: Path, now: float, jobs: int, **kw):
    return execute_prune(_plan(root, now), revalidate=Revalidator(), jobs=jobs, **kw)


def test_workers_delete_and_count_what_one_process_does(results_tree, tmp_path, monkeypatch, forked):
    src, _, now = results_tree
    one_root = copy_tree(src, tmp_path / "one" / "results")
    many_root = copy_tree(src, tmp_path / "many" / "results")
    plan = _plan(one_root, now)
    assert len({d.checkpoint for d in plan.deletions}) >= 3
    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
    before = allocated_bytes(many_root)
    one = _run(one_root, now, jobs=1)
    assert forked == []
    many = _run(many_root, now, jobs=3)
    assert len(forked) == 3
    assert one.ok and many.ok
    assert many.to_dict() == one.to_dict()
    assert [d.path for d in many.deleted] == [d.path for d in plan.deletions]
    assert _shape(many_root) == _shape(one_root)
    assert before - allocated_bytes(many_root) == many.freed_bytes == plan.freed_bytes > 0


def test_checkpoints_holding_links_of_one_file_stay_in_one_worker(results_tree, tmp_path,
                                                                 monkeypatch, forked):
    src, _, now = results_tree
    roots = {}
    for name in ("one", "many"):
        root = copy_tree(src, tmp_path / name / "results", only=("run_trainer", "seed_v3", "benchmarked"))
        # two redundant checkpoints, one file
        link_twin(root, "run_trainer/checkpoint-2", "run_trainer/checkpoint-4")
        roots[name] = root
    plan = _plan(roots["many"], now)
    groups: dict = {}
    for d in plan.deletions:
        groups.setdefault((d.root, d.checkpoint), []).append(d)
    units = prune_exec._units(groups)
    linked = [u for u in units if len(u) > 1]
    assert [[c for _, c in u] for u in linked] == [["run_trainer/checkpoint-2", "run_trainer/checkpoint-4"]]
    assert sum(map(len, units)) == len(groups) and len(units) >= 3

    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
    before = allocated_bytes(roots["many"])
    one = _run(roots["one"], now, jobs=1)
    many = _run(roots["many"], now, jobs=2)
    assert forked and many.ok and many.to_dict() == one.to_dict()
    freed = {d.path: d.bytes for d in many.deleted}
    assert freed["run_trainer/checkpoint-2/model.safetensors"] == 0     # the other link kept it
    assert freed["run_trainer/checkpoint-4/model.safetensors"] > 0      # this unlink freed it
    assert before - allocated_bytes(roots["many"]) == many.freed_bytes


def test_each_action_is_logged_once_by_whoever_did_it(results_tree, tmp_path, monkeypatch, forked):
    src, _, now = results_tree
    root = copy_tree(src, tmp_path / "results")
    plan = _plan(root, now)
    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
    events = []
    with ActionLog(str(tmp_path / "log.jsonl")) as log:
        result = execute_prune(plan, revalidate=Revalidator(), jobs=3, log=log, on_event=events.append)
    assert forked and result.ok
    lines = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert sorted((x["action"], x["path"]) for x in lines) == sorted(
        ("delete", str(root / d.path)) for d in plan.deletions)
    assert sorted(e.path for e in events) == sorted(d.path for d in plan.deletions)
    assert {x["bytes"] for x in lines if x["path"].endswith(".safetensors")} - {0} <= \
        {d.bytes for d in result.deleted}


def test_a_worker_that_dies_leaves_its_checkpoints_to_the_parent(results_tree, tmp_path,
                                                                monkeypatch, forked):
    src, _, now = results_tree
    root = copy_tree(src, tmp_path / "results")
    plan = _plan(root, now)
    victim = plan.deletions[-1].checkpoint
    parent = os.getpid()
    real = prune_exec._prune_checkpoint

    def die_after(key, items, revalidate, out):
        real(key, items, revalidate, out)
        if os.getpid() != parent and key[1] == victim:
            os._exit(9)   # its unlinks done, nothing reported

    monkeypatch.setattr(prune_exec, "_prune_checkpoint", die_after)
    monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
    with ActionLog(str(tmp_path / "log.jsonl")) as log:
        result = execute_prune(plan, revalidate=Revalidator(), jobs=2, log=log)
    assert len(forked) == 2
    for d in plan.deletions:
        assert not os.path.lexists(root / d.path), d.path
    # the parent did the dead worker's span again: what the worker had pruned says so
    changed = {s.path for s in result.changed}
    assert {d.path for d in plan.deletions if d.checkpoint == victim} <= changed
    assert all("no longer redundant" in s.reason and "worker process ended" in s.reason
               for s in result.changed)
    assert not result.failed
    assert {d.path for d in result.deleted} | {s.path for s in result.changed} == \
        {d.path for d in plan.deletions}
    logged = [json.loads(x) for x in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert {x["path"] for x in logged if x["action"] == "delete"} == {
        str(root / d.path) for d in plan.deletions}   # the worker logged what it deleted


def test_the_cli_reports_the_same_with_workers(results_tree, tmp_path, monkeypatch):
    src, manifest, _ = results_tree
    docs = []
    for jobs in ("1", "3"):
        root = copy_tree(src, tmp_path / jobs / "results")
        # the CLI's real clock: the young checkpoint is in progress for both runs alike, not
        # only for the first when the session's hour runs out between the two
        restamp_young(root, manifest)
        if jobs == "3":
            monkeypatch.setattr(prune_exec, "_MIN_PER_WORKER", 1)
        res = CliRunner().invoke(cli, ["prune", "--yes", "--json", "--jobs", jobs, str(root)])
        assert res.exit_code == 0, res.output
        docs.append(json.loads(res.stdout))
    assert docs[0] == docs[1] and docs[0]["deleted"]
