"""The ordinary Trainer runs are what their manifest says: checked on disk with the libraries that wrote them.

What ckpt-tools must say of each entry is tested in test_audit_ordinary.py; here only the fixture's own shape.
"""

from __future__ import annotations

import filecmp
import json
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from ckpt_tools.kinds import Layout, ModelKind
from fixtures.dylora import build_base
from fixtures.ordinary_runs import (
    ADAPTER_CONFIG, BAD_CONFIG_FIELD, BAD_INDEX, DAMAGES, MAX_STEPS, MISSING_SHARD, NO_TRAINER_STATE,
    SECOND_ADAPTER, TMP_NAME, TRUNCATED, UNKNOWN_PEFT_TYPE, UNKNOWN_TYPE, build_ordinary_runs,
)

INDEX = "model.safetensors.index.json"
REAL_RUNS = ("peft-lora", "peft-lora-bin", "peft-ia3", "peft-lokr", "peft-two-adapters", "full",
             "full-saved-at-root", "sharded", "best")
MARKERS = {"LORA": (".lora_A.", ".lora_B."), "IA3": (".ia3_l",), "LOKR": (".lokr_w1", ".lokr_w2")}


@pytest.fixture(scope="module")
def tree(ordinary_runs):
    return ordinary_runs


def entries(manifest, *, model_kind=None, layout=None, damaged=None, run=None, damage=None):
    return [e for e in manifest.values()
            if (model_kind is None or e.model_kind == model_kind) and (layout is None or e.layout == layout)
            and (run is None or e.run == run) and (damage is None or e.damage == damage)
            and (damaged is None or (e.damage is not None) == damaged)]


def safetensors_keys(path: Path) -> set[str]:
    with safe_open(str(path), framework="pt") as f:
        return set(f.keys())


def adapter_weights(adapter_dir: Path) -> Path:
    (found,) = [p for p in (adapter_dir / "adapter_model.safetensors", adapter_dir / "adapter_model.bin")
                if p.exists()]
    return found


def adapter_keys(weights: Path) -> set[str]:
    return (set(torch.load(weights, weights_only=True, mmap=True)) if weights.suffix == ".bin"
            else safetensors_keys(weights))


def test_every_kind_layout_damage_and_run_is_built(tree):
    root, manifest = tree
    assert {e.model_kind for e in manifest.values()} == {
        ModelKind.PEFT_ADAPTER, ModelKind.FULL_MODEL, ModelKind.DEEPSPEED, ModelKind.FSDP}
    assert {e.layout for e in manifest.values()} == {
        Layout.ADAPTER, Layout.ADAPTERS, Layout.MODEL, Layout.SHARDED, Layout.DEEPSPEED, Layout.FSDP}
    assert {e.damage for e in manifest.values()} - {None} == set(DAMAGES)
    for e in manifest.values():
        assert (root / e.path).is_dir(), e.path
        assert e.run == e.path.rsplit("/", 1)[0] or (e.step is None and e.run == e.path)
    for run in REAL_RUNS:
        steps = [e.step for e in entries(manifest, run=run) if e.step is not None]
        assert 2 <= len(steps) <= 3 and max(steps) == MAX_STEPS, run
        (final,) = [e for e in entries(manifest, run=run) if e.step is None]
        assert final.path in (f"{run}/final", run)
    (at_root,) = [e for e in manifest.values() if e.path == e.run]
    assert at_root.path == "full-saved-at-root"


def test_peft_checkpoints_hold_each_adapter_weights_and_config_where_peft_saves_it(tree):
    root, manifest = tree
    peft = entries(manifest, model_kind=ModelKind.PEFT_ADAPTER, damaged=False)
    assert {a.peft_type for e in peft for a in e.adapters} == set(MARKERS)
    for e in peft:
        ckpt = root / e.path
        assert e.adapters[0].name == "default"
        for adapter in e.adapters:
            # PEFT writes the default adapter at the root and every other one in <its name>/
            adapter_dir = ckpt if adapter.name == "default" else ckpt / adapter.name
            config = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
            assert config["peft_type"] == adapter.peft_type
            weights = adapter_weights(adapter_dir)
            assert weights.suffix == (".bin" if e.run == "peft-lora-bin" else ".safetensors"), e.path
            keys = adapter_keys(weights)
            markers = MARKERS[adapter.peft_type]
            assert keys and all(k.startswith("base_model.model.") and any(m in k for m in markers) for k in keys)
            assert all(any(m in k for k in keys) for m in markers), e.path
        assert not list(ckpt.glob("model*.safetensors")), e.path  # an adapter, not a model
        if e.step is not None:
            for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
                assert (ckpt / name).is_file(), f"{e.path}/{name}"


def test_the_second_adapter_is_a_subdirectory_with_only_its_config_and_weights(tree):
    root, manifest = tree
    two = entries(manifest, layout=Layout.ADAPTERS)
    assert two and all(e.run == "peft-two-adapters" for e in two)
    for e in two:
        ckpt = root / e.path
        assert [a.name for a in e.adapters] == ["default", SECOND_ADAPTER]
        assert sorted(p.name for p in (ckpt / SECOND_ADAPTER).iterdir()) == [ADAPTER_CONFIG,
                                                                            "adapter_model.safetensors"]
        default = json.loads((ckpt / ADAPTER_CONFIG).read_text())
        second = json.loads((ckpt / SECOND_ADAPTER / ADAPTER_CONFIG).read_text())
        assert (default["r"], sorted(default["target_modules"])) == (4, ["q_proj", "v_proj"])
        assert (second["r"], second["target_modules"]) == (2, ["k_proj"])
        # the saved keys drop the adapter's name: each file reads as a single adapter
        second_keys = safetensors_keys(ckpt / SECOND_ADAPTER / "adapter_model.safetensors")
        assert second_keys and all(".k_proj.lora_" in k and SECOND_ADAPTER not in k for k in second_keys)
        assert not any(".k_proj." in k for k in safetensors_keys(ckpt / "adapter_model.safetensors"))


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
        if e.step is None or e.damage == NO_TRAINER_STATE:
            assert not state_file.exists(), e.path  # save_model writes no trainer state
            continue
        assert e.path.endswith(f"checkpoint-{e.step}")
        assert json.loads(state_file.read_text())["global_step"] == e.step, e.path


def test_full_fine_tunes_hold_the_whole_model_with_training_state(tree):
    root, manifest = tree
    model_keys = set(build_base().state_dict())
    full = entries(manifest, model_kind=ModelKind.FULL_MODEL, layout=Layout.MODEL, damaged=False)
    assert "full-saved-at-root" in {e.path for e in full}
    for e in full:
        ckpt = root / e.path
        assert safetensors_keys(ckpt / "model.safetensors") == model_keys, e.path
        assert json.loads((ckpt / "config.json").read_text())["model_type"] == "llama"
        if e.step is not None:
            for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
                assert (ckpt / name).is_file(), f"{e.path}/{name}"


def test_the_model_saved_at_the_run_root_sits_beside_the_checkpoints(tree):
    root, manifest = tree
    run = root / "full-saved-at-root"
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert (run / "config.json").is_file() and (run / "model.safetensors").is_file()
    assert not (run / "trainer_state.json").exists() and not (run / "optimizer.pt").exists()


def test_good_sharded_checkpoints_list_shards_that_exist_and_hold_their_tensors(tree):
    root, manifest = tree
    model_keys = set(build_base().state_dict())
    good = entries(manifest, layout=Layout.SHARDED, damaged=False)
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
    (missing,) = entries(manifest, damage=MISSING_SHARD)
    weight_map = json.loads((root / missing.path / INDEX).read_text())["weight_map"]
    gone = Path(missing.damaged_file).name
    assert gone in weight_map.values()
    assert not (root / missing.damaged_file).exists()
    assert (root / missing.original / gone).is_file()

    (bad,) = entries(manifest, damage=BAD_INDEX)
    ckpt = root / bad.path
    assert bad.damaged_file == f"{bad.path}/{INDEX}"
    weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
    misplaced = [k for k, shard in weight_map.items() if k not in safetensors_keys(ckpt / shard)]
    assert len(misplaced) == 1
    assert all((ckpt / shard).is_file() for shard in set(weight_map.values()))


def test_truncated_copies_are_shorter_than_their_originals(tree):
    root, manifest = tree
    truncated = entries(manifest, damage=TRUNCATED)
    assert {Path(e.damaged_file).name for e in truncated} == {
        "adapter_model.safetensors", "adapter_model.bin", "model.safetensors"}
    for e in truncated:
        name = Path(e.damaged_file).name
        assert e.damaged_file == f"{e.path}/{name}"
        assert (root / e.damaged_file).stat().st_size < (root / e.original / name).stat().st_size


def test_bad_adapter_configs_differ_from_their_originals_in_one_field(tree):
    root, manifest = tree
    for damage, field, value in ((BAD_CONFIG_FIELD, "r", "eight"), (UNKNOWN_PEFT_TYPE, "peft_type", UNKNOWN_TYPE)):
        (e,) = entries(manifest, damage=damage)
        assert e.damaged_file == f"{e.path}/{ADAPTER_CONFIG}"
        bad = json.loads((root / e.damaged_file).read_text())
        good = json.loads((root / e.original / ADAPTER_CONFIG).read_text())
        assert bad[field] == value and good[field] != value
        assert {k: v for k, v in bad.items() if k != field} == {k: v for k, v in good.items() if k != field}


def _same_files(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    return not (cmp.left_only or cmp.right_only or cmp.diff_files or cmp.funny_files)


def test_the_tmp_checkpoint_and_the_one_without_trainer_state_are_copies_of_a_good_one(tree):
    root, manifest = tree
    (tmp,) = entries(manifest, damage=TMP_NAME)
    assert Path(tmp.path).name == f"tmp-checkpoint-{tmp.step}" and tmp.damaged_file is None
    assert _same_files(root / tmp.path, root / tmp.original)
    (bare,) = entries(manifest, damage=NO_TRAINER_STATE)
    assert (root / bare.original / "trainer_state.json").is_file()
    assert not (root / bare.damaged_file).exists() and bare.damaged_file.endswith("/trainer_state.json")
    cmp = filecmp.dircmp(root / bare.path, root / bare.original)
    assert cmp.right_only == ["trainer_state.json"] and not (cmp.left_only or cmp.diff_files)


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
    deepspeed = entries(manifest, layout=Layout.DEEPSPEED)
    assert {e.run for e in deepspeed} == {"deepspeed", "deepspeed-zero3"}
    for e in deepspeed:
        ckpt = root / e.path
        tag = (ckpt / "latest").read_text()
        assert tag == f"global_step{e.step}"
        model_states = sorted((ckpt / tag).glob("*model_states.pt"))
        assert len(list((ckpt / tag).glob("*_optim_states.pt"))) == 2
        assert (ckpt / "zero_to_fp32.py").is_file() and (ckpt / "config.json").is_file()
        assert model_states and all(zipfile.is_zipfile(p) for p in model_states)
        if e.run == "deepspeed-zero3":  # ZeRO-3 without gathering: per-rank model states, no weights
            assert [p.name for p in model_states] == [f"zero_pp_rank_{r}_mp_rank_00_model_states.pt" for r in (0, 1)]
            assert e.model_kind == ModelKind.DEEPSPEED and not list(ckpt.glob("model*.safetensors"))
        else:
            assert [p.name for p in model_states] == ["mp_rank_00_model_states.pt"]
            assert e.model_kind == ModelKind.FULL_MODEL and (ckpt / "model.safetensors").is_file()
    fsdp = entries(manifest, layout=Layout.FSDP)
    for e in fsdp:
        ckpt = root / e.path
        for state in ("pytorch_model_fsdp_0", "optimizer_0"):
            assert (ckpt / state / ".metadata").is_file()
            assert len(list((ckpt / state).glob("__*_0.distcp"))) == 2
        assert not list(ckpt.glob("*.safetensors"))
    assert fsdp and all(e.model_kind == ModelKind.FSDP for e in fsdp)


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
