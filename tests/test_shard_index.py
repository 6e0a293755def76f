"""Shard indexes (ckpt_tools.formats.shard_index): every shard present, every tensor in exactly
one shard, the headers agreeing with the index. Hand-built indexes for each check, and a real
sharded ``save_pretrained`` with the damage of ``fixtures/ordinary_runs.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ckpt_tools.formats.safetensors_header import read_header
from ckpt_tools.formats.shard_index import (MISSING_SHOWN, check_shard_index, shards_of,
                                            tensor_bytes)
from ckpt_tools.problems import BAD_JSON, INDEX_MISMATCH, MISSING_FILE, WARNING
from ckpt_tools.validator.verdict import Tensor

INDEX = "model.safetensors.index.json"
S1, S2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
F32 = Tensor("F32", (4, 4))     # 64 bytes


def index_of(weight_map: dict, total_size=None) -> dict:
    doc = {"weight_map": weight_map}
    if total_size is not None:
        doc["metadata"] = {"total_size": total_size}
    return doc


def check(index, shards, present=None, shard_files=(), index_rel=INDEX):
    files = set(shards) if present is None else set(present)
    return check_shard_index(index_rel, index, shards, files.__contains__, shard_files)


def codes(found) -> list[tuple[str, str, str]]:
    return [(p.code, p.relpath, p.severity) for p in found.problems]


GOOD_MAP = {"a": S1, "b": S1, "c": S2}
GOOD_SHARDS = {S1: {"a": F32, "b": F32}, S2: {"c": F32}}


def test_a_sound_index_has_no_problem_and_names_its_shards():
    found = check(index_of(GOOD_MAP, total_size=192), GOOD_SHARDS)
    assert found.problems == () and found.shards == (S1, S2)
    assert shards_of(INDEX, index_of(GOOD_MAP)) == (S1, S2)


def test_shards_in_a_subfolder_are_relative_to_the_checkpoint():
    found = check(index_of(GOOD_MAP), {f"sub/{k}": v for k, v in GOOD_SHARDS.items()},
                  index_rel=f"sub/{INDEX}")
    assert found.problems == () and found.shards == (f"sub/{S1}", f"sub/{S2}")


@pytest.mark.parametrize("index, message", [
    ([1, 2], f"{INDEX} is list, not an object"),
    ({"metadata": {}}, f"{INDEX} has no weight_map"),
    ({"weight_map": ["a"]}, f"{INDEX}'s weight_map is list, not an object"),
    ({"weight_map": {"a": S1, "b": 3}}, "weight_map['b'] is int, not a shard file name"),
])
def test_a_weight_map_that_is_not_names_to_files_is_bad_json(index, message):
    found = check(index, GOOD_SHARDS)
    assert [(p.code, p.relpath, p.message) for p in found.problems] == [(BAD_JSON, INDEX, message)]
    assert found.shards == () and shards_of(INDEX, index) == ()


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/x.safetensors",
                                   "..\\x.safetensors", "C:x.safetensors", "..", ""])
def test_a_shard_name_that_leaves_the_folder_is_never_resolved(shard):
    asked = []
    found = check_shard_index(INDEX, index_of({"a": S1, "b": shard}), {S1: {"a": F32}},
                              lambda rel: asked.append(rel) or True)
    assert codes(found) == [(BAD_JSON, INDEX, "error")]
    assert repr(shard) in found.problems[0].message
    assert asked == [S1] and found.shards == (S1,) and shards_of(INDEX, index_of({"b": shard})) == ()


def test_a_shard_named_but_absent_is_missing_on_its_own_path():
    found = check(index_of(GOOD_MAP, total_size=192), {S1: GOOD_SHARDS[S1]})
    assert [(p.code, p.relpath, p.message) for p in found.problems] == [
        (MISSING_FILE, S2, f"named by {INDEX} but absent")]


def test_a_million_missing_shards_cost_a_few_problems():
    weight_map = {f"t{i}": f"model-{i:07d}-of-1000000.safetensors" for i in range(1_000_000)}
    found = check(index_of(weight_map), {}, present=())
    assert len(found.problems) == MISSING_SHOWN + 1
    assert found.problems[-1].relpath == INDEX and "999,992 more shards" in found.problems[-1].message


def test_a_tensor_listed_in_a_shard_that_lacks_it():
    # the fixture's bad index: one tensor of the first shard pointed at the second
    found = check(index_of({"a": S2, "b": S1, "c": S2}), GOOD_SHARDS)
    (problem,) = found.problems
    assert (problem.code, problem.relpath) == (INDEX_MISMATCH, INDEX)
    assert problem.message == (f"1 tensor listed in a shard that lacks it and held by another (the "
                               f"first, 'a', is in {S1!r}, listed in {S2!r}): 'a'")
    found = check(index_of({**GOOD_MAP, "d": S2}), GOOD_SHARDS)
    assert [p.message for p in found.problems] == [
        "1 tensor listed in a shard that lacks it, held by no shard: 'd'"]


def test_a_tensor_the_index_does_not_list_and_one_in_two_shards():
    found = check(index_of({"a": S1, "c": S2}), GOOD_SHARDS)
    assert [p.message for p in found.problems] == ["1 tensor held by a shard but not listed in the index: 'b'"]
    found = check(index_of(GOOD_MAP), {S1: GOOD_SHARDS[S1], S2: {"c": F32, "a": F32}})
    assert [(p.code, p.message) for p in found.problems] == [
        (INDEX_MISMATCH, "1 tensor held by two shards: 'a'")]


def test_an_unreadable_shard_is_not_compared():
    found = check(index_of({"a": S1, "b": S2, "zzz": S2}, total_size=1), {S1: {"a": F32}, S2: None})
    assert found.problems == ()          # the caller reported the shard's own problem


def test_names_are_capped_and_cut_short():
    many = {f"{'x' * 500}{i}": S1 for i in range(100_000)}
    found = check(index_of({**many, "a": S1}), {S1: {"a": F32}})
    (problem,) = found.problems
    assert "100,000 tensors" in problem.message and "and 99,997 more" in problem.message
    assert len(problem.message) < 400


def test_total_size_disagreeing_is_a_warning():
    found = check(index_of(GOOD_MAP, total_size=193), GOOD_SHARDS)
    assert [(p.code, p.severity, p.message) for p in found.problems] == [
        (INDEX_MISMATCH, WARNING, "metadata.total_size says 193 bytes but the shards' tensors hold 192")]
    assert codes(check(index_of(GOOD_MAP, total_size="192"), GOOD_SHARDS)) == [
        (INDEX_MISMATCH, INDEX, WARNING)]
    assert check(index_of(GOOD_MAP, total_size=192.0), GOOD_SHARDS).problems == ()
    # torch.save shards name their dtypes as torch does; an unknown dtype leaves it unchecked
    torch_shards = {S1: {"a": Tensor("float32", (4, 4)), "b": Tensor("bfloat16", (8, 4))},
                    S2: {"c": Tensor("F4", (3,))}}
    assert check(index_of(GOOD_MAP, total_size=64 + 64 + 2), torch_shards).problems == ()
    odd = {S1: {"a": Tensor("float99", (1,)), "b": F32}, S2: {"c": F32}}
    assert check(index_of(GOOD_MAP, total_size=1), odd).problems == ()
    assert tensor_bytes(Tensor("float99", (1,))) is None


def test_shard_files_the_index_does_not_name_are_a_warning():
    extra = "model-00003-of-00003.safetensors"
    found = check(index_of(GOOD_MAP), GOOD_SHARDS,
                  shard_files=[S1, S2, extra, "pytorch_model-00001-of-00002.bin", f"sub/{extra}",
                               "model.safetensors", "config.json"])
    assert [(p.code, p.severity, p.message) for p in found.problems] == [
        (INDEX_MISMATCH, WARNING, f"shard files beside it that it does not name: {extra!r}")]


# --- a real sharded save ----------------------------------------------------------------

def shard_headers(ckpt: Path, index: dict) -> dict:
    out = {}
    for rel in shards_of(INDEX, index):
        if (ckpt / rel).exists():
            header = read_header(ckpt / rel)
            out[rel] = {t.name: Tensor(t.dtype, t.shape) for t in header.tensors}
    return out


def check_saved(ckpt: Path):
    index = json.loads((ckpt / INDEX).read_text())
    present = lambda rel: (ckpt / rel).is_file()  # noqa: E731
    files = sorted(p.name for p in ckpt.iterdir())
    return check_shard_index(INDEX, index, shard_headers(ckpt, index), present, files)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory) -> Path:
    from fixtures.dylora import build_base
    from fixtures.ordinary_runs import SHARD_SIZE

    ckpt = tmp_path_factory.mktemp("sharded") / "checkpoint-2"
    build_base().save_pretrained(str(ckpt), max_shard_size=SHARD_SIZE)
    return ckpt


def copy_of(sharded: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(sharded, tmp_path / sharded.name))


def test_a_real_sharded_save_has_no_problem(sharded):
    found = check_saved(sharded)
    assert found.problems == ()
    assert len(found.shards) > 1 and set(found.shards) == {p.name for p in sharded.glob("model-*")}


def test_the_fixture_s_missing_shard_is_found(sharded, tmp_path):
    ckpt = copy_of(sharded, tmp_path)
    index = json.loads((ckpt / INDEX).read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (ckpt / shard).unlink()
    assert codes(check_saved(ckpt)) == [(MISSING_FILE, shard, "error")]


def test_the_fixture_s_bad_index_is_found(sharded, tmp_path):
    ckpt = copy_of(sharded, tmp_path)
    index_path = ckpt / INDEX
    index = json.loads(index_path.read_text())
    shards = sorted(set(index["weight_map"].values()))
    moved = sorted(k for k, v in index["weight_map"].items() if v == shards[0])[0]
    index["weight_map"][moved] = shards[1]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    (problem,) = check_saved(ckpt).problems
    assert (problem.code, problem.relpath, problem.severity) == (INDEX_MISMATCH, INDEX, "error")
    assert repr(moved) in problem.message and repr(shards[0]) in problem.message
