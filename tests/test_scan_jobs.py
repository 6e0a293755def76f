"""scan() gives the same result whatever the number of worker processes, and memoised
validation gives the same verdicts as a fresh one."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

import ckpt_tools
from ckpt_tools import api, scanner, validator
from ckpt_tools.read_cache import ReadCache
from ckpt_tools.validator import DEEP, FULL, HEADERS

REPO = Path(__file__).resolve().parents[1]


def _everything(result):
    """to_dict() plus what it leaves out: files, facts, problems of every checkpoint."""
    doc = result.to_dict()
    doc["records"] = [(c.dir, c.problems, c.merged_files, c.num_experts, c.facts)
                      for c in result.checkpoints]
    doc["total"] = result.size_bytes
    return doc


@pytest.mark.parametrize("level", [HEADERS, FULL])
def test_jobs_do_not_change_the_result_on_the_fixture_tree(results_tree, monkeypatch, level):
    root, _, now = results_tree
    one = ckpt_tools.scan(str(root), now=now, jobs=1, level=level)
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)  # processes even for a small tree
    two = ckpt_tools.scan(str(root), now=now, jobs=2, level=level, cache=ReadCache())
    three = ckpt_tools.scan(str(root), now=now, jobs=3, level=level, cache=None)
    assert one.to_dict() == two.to_dict() == three.to_dict()
    assert _everything(one) == _everything(two) == _everything(three)


def test_jobs_do_not_change_the_result_with_several_roots(results_tree, monkeypatch):
    root, _, now = results_tree
    roots = [str(root / "run canonical"), str(root / "broken"), str(root),
             str(root / "run canonical" / "checkpoint-100")]
    one = ckpt_tools.scan(*roots, now=now, jobs=1)
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)
    two = ckpt_tools.scan(*roots, now=now, jobs=2)
    assert _everything(one) == _everything(two)


def test_unlistable_directories_keep_their_place_among_problems(tmp_path, monkeypatch,
                                                                private_unlistable):
    root = tmp_path / "root"
    for d in ("a/private", "a/checkpoint-1/peft_adapters", "b/private", "b/checkpoint-2/x/private"):
        (root / d).mkdir(parents=True)
    one = ckpt_tools.scan(str(root), now=10**10, jobs=1)
    monkeypatch.setattr(api, "_MIN_PER_PROCESS", 1)
    two = ckpt_tools.scan(str(root), now=10**10, jobs=2)
    # b/checkpoint-2 is walked by a worker; its problem comes before b/private all the same
    assert [p.path for p in one.problems] == ["a/private", "b/checkpoint-2/x/private", "b/private"]
    assert _everything(one) == _everything(two)


@pytest.mark.parametrize("level", [HEADERS, FULL, DEEP])
def test_memoised_verdicts_equal_fresh_ones(results_tree, level):
    root, _, now = results_tree
    dirs, _ = scanner.find_checkpoints(str(root))

    def verdicts(cache):
        return [vars(validator.validate_checkpoint(d, level=level, now=now, min_age_s=m,
                                                   cache=cache))
                for d in dirs for m in (3600, 0)]

    fresh = verdicts(None)
    cache = ReadCache()
    assert verdicts(cache) == fresh
    assert verdicts(cache) == fresh  # replayed from the memo where it applies


@pytest.fixture(scope="module")
def generated_tree(tmp_path_factory):
    pytest.importorskip("torch")
    sys.path.insert(0, str(REPO / "bench"))
    try:
        from gen_tree import generate
    finally:
        sys.path.remove(str(REPO / "bench"))
    root = tmp_path_factory.mktemp("generated") / "tree"
    generate(root, 300)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_jobs_do_not_change_the_result_on_a_generated_tree(generated_tree):
    import time
    now = time.time()
    one = ckpt_tools.scan(str(generated_tree), now=now, jobs=1, cache=ReadCache())
    two = ckpt_tools.scan(str(generated_tree), now=now, jobs=2, cache=ReadCache())
    assert len(one.checkpoints) == 300
    assert one.to_dict() == two.to_dict()
    assert _everything(one) == _everything(two)
    assert _everything(ckpt_tools.scan(str(generated_tree), now=now, jobs=2)) == _everything(one)
    assert _everything(ckpt_tools.scan(str(generated_tree), now=now, jobs=1, cache=None)) == \
        _everything(one)
