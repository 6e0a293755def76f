"""The ordinary Trainer runs are what their manifest says: checked on disk with the libraries that wrote them."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fixtures.dylora import build_base
from fixtures.ordinary_runs import (
    BAD_INDEX, DAMAGES, DEEPSPEED, FSDP, FULL_MODEL, KINDS, MAX_STEPS, MISSING_SHARD, PEFT_ADAPTER,
    SHARDED_FULL_MODEL, TRUNCATED, build_ordinary_runs,
)

INDEX = "model.safetensors.index.json"
REAL_RUNS = ("peft-lora", "peft-lora-bin", "peft-ia3", "full", "sharded", "best")


@pytest.fixture(scope="module")
def tree(ordinary_runs):
    return ordinary_runs


def entries(manifest, *, kind=None, damaged=None, run=None):
    return [e for e in manifest.values()
            if (kind is None or e.kind == kind) and (run is None or e.run == run)
            and (damaged is None or (e.damage is not None) == damaged)]


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def adapter_weights(ckpt: Path) -> Path:
    (found,) = [p for p in (ckpt / "adapter_model.safetensors", ckpt / "adapter_model.bin") if p.exists()]
    return found


def test_every_kind_damage_and_run_is_built(tree):
    root, manifest = tree
    assert {e.kind for e in manifest.values()} == set(KINDS)
    assert {e.damage for e in manifest.values()} - {None} == set(DAMAGES)
    for e in manifest.values():
        assert (root / e.path).is_dir(), e.path
        assert e.run == e.path.rsplit("/", 1)[0]
    for run in REAL_RUNS:
        steps = [e.step for e in entries(manifest, run=run) if e.step is not None]
        assert 2 <= len(steps) <= 3 and max(steps) == MAX_STEPS, run
        assert f"{run}/final" in manifest and manifest[f"{run}/final"].step is None


def test_peft_checkpoints_hold_adapter_weights_and_config_at_their_root(tree):
    root, manifest = tree
    peft = entries(manifest, kind=PEFT_ADAPTER, damaged=False)
    assert {e.peft_type for e in peft} == {"LORA", "IA3"}
    for e in peft:
        ckpt = root / e.path
        config = json.loads((ckpt / "adapter_config.json").read_text())
        assert config["peft_type"] == e.peft_type
        weights = adapter_weights(ckpt)
        assert weights.suffix == (".bin" if e.run == "peft-lora-bin" else ".safetensors"), e.path
        keys = (set(torch.load(weights, weights_only=True, mmap=True)) if weights.suffix == ".bin"
                else safetensors_keys(weights))
        markers = (".lora_A.", ".lora_B.") if e.peft_type == "LORA" else (".ia3_l",)
        assert keys and all(k.startswith("base_model.model.") and any(m in k for m in markers) for k in keys)
        assert all(any(m in k for k in keys) for m in markers), e.path
        assert not list(ckpt.glob("model*.safetensors")), e.path  # an adapter, not a model
        if e.step is not None:
            for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
                assert (ckpt / name).is_file(), f"{e.path}/{name}"


def test_the_bin_adapter_is_a_torch_save_zip_archive_with_the_same_keys_as_safetensors(tree):
    root, manifest = tree
    for e in entries(manifest, run="peft-lora-bin"):
        path = root / e.path / "adapter_model.bin"
        assert zipfile.is_zipfile(path)
        with zipfile.ZipFile(path) as z:
            assert any(n.endswith("/data.pkl") for n in z.namelist())
        twin = root / e.path.replace("peft-lora-bin", "peft-lora", 1) / "adapter_model.safetensors"
        state = torch.load(path, weights_only=True)
        assert set(state) == safetensors_keys(twin)


def test_trainer_state_names_each_checkpoint_step(tree):
    root, manifest = tree
    for e in manifest.values():
        state_file = root / e.path / "trainer_state.json"
        if e.step is None:
            assert not state_file.exists(), e.path  # save_model writes no trainer state
            continue
        assert e.path.endswith(f"checkpoint-{e.step}")
        assert json.loads(state_file.read_text())["global_step"] == e.step, e.path


def test_full_fine_tunes_hold_the_whole_model_with_training_state(tree):
    root, manifest = tree
    model_keys = set(build_base().state_dict())
    for e in entries(manifest, kind=FULL_MODEL, damaged=False):
        ckpt = root / e.path
        assert safetensors_keys(ckpt / "model.safetensors") == model_keys, e.path
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == "llama"
        if e.step is not None:
            for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
                assert (ckpt / name).is_file(), f"{e.path}/{name}"


def test_good_sharded_checkpoints_list_shards_that_exist_and_hold_their_tensors(tree):
    root, manifest = tree
    model_keys = set(build_base().state_dict())
    good = entries(manifest, kind=SHARDED_FULL_MODEL, damaged=False)
    assert good
    for e in good:
        ckpt = root / e.path
        weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
        assert set(weight_map) == model_keys
        shards = sorted(set(weight_map.values()))
        assert len(shards) >= 2 and not (ckpt / "model.safetensors").exists()
        for shard in shards:
            assert safetensors_keys(ckpt / shard) == {k for k, v in weight_map.items() if v == shard}, shard


def test_damaged_sharded_copies_miss_a_shard_or_misplace_a_tensor(tree):
    root, manifest = tree
    (missing,) = [e for e in manifest.values() if e.damage == MISSING_SHARD]
    weight_map = json.loads((root / missing.path / INDEX).read_text())["weight_map"]
    gone = Path(missing.damaged_file).name
    assert gone in weight_map.values()
    assert not (root / missing.damaged_file).exists()
    assert (root / missing.original / gone).is_file()

    (bad,) = [e for e in manifest.values() if e.damage == BAD_INDEX]
    ckpt = root / bad.path
    assert bad.damaged_file == f"{bad.path}/{INDEX}"
    weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
    misplaced = [k for k, shard in weight_map.items() if k not in safetensors_keys(ckpt / shard)]
    assert len(misplaced) == 1
    assert all((ckpt / shard).is_file() for shard in set(weight_map.values()))


def test_truncated_copies_are_shorter_than_their_originals(tree):
    root, manifest = tree
    truncated = [e for e in manifest.values() if e.damage == TRUNCATED]
    assert {e.kind for e in truncated} == {PEFT_ADAPTER, FULL_MODEL}
    for e in truncated:
        name = Path(e.damaged_file).name
        assert e.damaged_file == f"{e.path}/{name}"
        assert (root / e.damaged_file).stat().st_size < (root / e.original / name).stat().st_size


def test_best_run_records_its_best_checkpoint_and_every_eval(tree):
    root, manifest = tree
    run = entries(manifest, run="best")
    (best,) = [e for e in run if e.best]
    assert [e for e in manifest.values() if e.best] == [best]
    last = max((e for e in run if e.step is not None), key=lambda e: e.step)
    state = json.loads((root / last.path / "trainer_state.json").read_text())
    # The Trainer records the path it had while training; the run is found by name.
    assert Path(state["best_model_checkpoint"]).name == Path(best.path).name
    evals = {log["step"]: log["eval_loss"] for log in state["log_history"] if "eval_loss" in log}
    assert sorted(evals) == list(range(1, MAX_STEPS + 1))
    saved = {e.step for e in run if e.step is not None}
    assert state["best_metric"] == min(evals[s] for s in saved) == evals[best.step]
    assert best.step != last.step  # the run overfits, so keeping only the last would lose the best


def test_deepspeed_and_fsdp_checkpoints_have_the_documented_names(tree):
    root, manifest = tree
    for e in entries(manifest, kind=DEEPSPEED):
        ckpt = root / e.path
        tag = (ckpt / "latest").read_text()
        assert tag == f"global_step{e.step}"
        assert (ckpt / tag / "mp_rank_00_model_states.pt").is_file()
        assert len(list((ckpt / tag).glob("*_optim_states.pt"))) == 2
        assert (ckpt / "zero_to_fp32.py").is_file()
        assert zipfile.is_zipfile(ckpt / tag / "mp_rank_00_model_states.pt")
    for e in entries(manifest, kind=FSDP):
        ckpt = root / e.path
        for state in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert (ckpt / state / ".metadata").is_file()
            assert len(list((ckpt / state).glob("__*_0.distcp"))) == 2
        assert not list(ckpt.glob("*.safetensors"))
    assert entries(manifest, kind=DEEPSPEED) and entries(manifest, kind=FSDP)


def test_build_is_deterministic_and_refuses_a_non_empty_destination(tree, tmp_path):
    root, manifest = tree
    again = build_ordinary_runs(tmp_path / "again")
    assert again == manifest
    weights = [p.relative_to(root) for p in sorted(root.rglob("*.safetensors"))]
    assert weights
    for rel in weights:
        assert (tmp_path / "again" / rel).read_bytes() == (root / rel).read_bytes(), rel
    with pytest.raises(FileExistsError):
        build_ordinary_runs(root)
