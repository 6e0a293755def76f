"""``ckpt-tools migrate`` on every layout of the fixture tree.

The expectations are computed from the source files with this module's own readers (plain
``torch.load`` / ``safetensors``) and the fixture manifest's true hyperparameters, never
with the converter's code.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import fault_entry
from ckpt_tools import scan
from ckpt_tools.migrate import (ACTION_DONE, ACTION_MIGRATE, MigrateOptions,
                                  MigratePlan, execute_migrate, plan_migrate)

REPO = Path(__file__).resolve().parents[1]
TRAINER_NAMES = ("trainer_state.json", "optimizer.pt", "scheduler.pt", "scaler.pt",
                 "training_args.bin", "generation_config.json")
EXPECTED_METHOD = {"canonical": "copy", "canonical+merged": "copy", "v0": "exact", "v1": "exact",
                   "v2": "exact", "v3": "exact", "v4": "exact", "v5": "exact", "hf-merged": "svd",
                   "model": "svd"}   # a plain model with --base-model: its delta is low-rank


def _has_lowrank() -> bool:
    try:
        from ckpt_tools.migrate import lowrank
        return hasattr(lowrank, "extract") and hasattr(lowrank, "write_adapter")
    except ImportError:
        return False


needs_lowrank = pytest.mark.skipif(not _has_lowrank(), reason="ckpt_tools.migrate.lowrank.extract missing")


# --- independent readers of the source ------------------------------------------------------

def status_here(entry) -> str:
    return entry.status_as_root if os.geteuid() == 0 else entry.status


def migratable(manifest) -> list:
    """What migrate plans to migrate: not broken, in progress or fresh (younger than --min-age)."""
    return [e for e in manifest.values()
            if status_here(e) not in ("broken", "in-progress") and "young" not in e.flags]


def deep_broken(manifest) -> set[str]:
    """Planned for migration, but broken once every tensor is read (NaN/Inf): migrate fails them."""
    return {e.path for e in migratable(manifest)
            if e.deep_status == "broken" and not (e.needs_non_root and os.geteuid() == 0)}


def _load_any(path: Path) -> dict:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    obj = torch.load(path, weights_only=True, map_location="cpu")
    return obj


def _canonical(key: str) -> tuple[int, str] | None:
    """``….lora_A.expert_3.weight`` in any prefix form → (3, ``base_model.model.….lora_A.weight``)."""
    parts = key.split(".")
    for i, p in enumerate(parts):
        if p.startswith("lora_") and i + 1 < len(parts) and parts[i + 1].startswith("expert_"):
            expert = int(parts[i + 1][len("expert_"):])
            rest = parts[:i + 1] + parts[i + 2:]
            name = ".".join(rest)
            if name.startswith("foundation_model."):
                name = name[len("foundation_model."):]
            if name.startswith("base_model.model."):
                name = name[len("base_model.model."):]
            return expert, "base_model.model." + name
    return None


def source_experts(ckpt: Path) -> dict[int, dict[str, torch.Tensor]]:
    """Every expert's LoRA tensors, read straight from the source checkpoint's files."""
    peft = ckpt / "peft_adapters"
    out: dict[int, dict] = {}
    if peft.is_dir():
        for d in sorted(peft.iterdir()):
            if d.is_dir():
                i = int(d.name.split("_")[1])
                f = d / "adapter_model.safetensors"
                if not f.exists():
                    f = d / d.name / "adapter_model.safetensors"
                out[i] = load_file(str(f))
            elif d.suffix == ".pt":
                i = int(d.stem.split("_")[1])
                out[i] = {_canonical(k)[1]: v for k, v in _load_any(d).items()}
        if out:
            return out
    flat = sorted(ckpt.glob("expert_*.pt"))
    if flat:
        for f in flat:
            out[int(f.stem.split("_")[1])] = {_canonical(k)[1]: v for k, v in _load_any(f).items()}
        return out
    for f in sorted(ckpt.iterdir()):
        if f.name.endswith((".safetensors", ".bin", ".pt")) and not f.name.startswith(
                ("training_args", "optimizer", "scheduler", "rng_state")):
            for k, v in _load_any(f).items():
                c = _canonical(k)
                if c is not None:
                    out.setdefault(c[0], {})[c[1]] = v
    return out


def source_router(ckpt: Path) -> dict[str, torch.Tensor]:
    has_tree = (ckpt / "peft_adapters").is_dir() or any(ckpt.glob("expert_*.pt"))
    if not has_tree:
        merged = {}
        for f in sorted(ckpt.iterdir()):
            if f.name.endswith((".safetensors", ".bin", ".pt")) and not f.name.startswith(
                    ("training_args", "optimizer", "scheduler", "rng_state")):
                merged.update({k[len("router."):]: v for k, v in _load_any(f).items()
                               if k.startswith("router.")})
        return merged
    if (ckpt / "router.safetensors").exists():
        return load_file(str(ckpt / "router.safetensors"))
    for d in (ckpt / "dylo_moe_state", ckpt.parent / "dylo_moe_state"):
        if (d / "router.pt").exists():
            obj = torch.load(d / "router.pt", weights_only=True)
            if "gate_state_dict" in obj:
                return {f"gate.{k}": v for k, v in obj["gate_state_dict"].items()}
            return obj
    raise AssertionError(f"no router in {ckpt}")


def bits_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.is_floating_point:
        view = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        return torch.equal(a.contiguous().view(view), b.contiguous().view(view))
    return torch.equal(a, b)


def random_ids(vocab: int = 128) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 12), generator=torch.Generator().manual_seed(1))


def load_base(base_dir: Path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.eval()
    return model


def reference_logits(base_dir: Path, tensors: dict, r: int, alpha, ids) -> torch.Tensor:
    """The source expert in a fresh PEFT model built from its tensors and the TRUE alpha."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    targets = sorted({k.split(".lora_")[0].rsplit(".", 1)[-1] for k in tensors})
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0,
                     task_type="CAUSAL_LM")
    model = get_peft_model(load_base(base_dir), cfg, adapter_name="ref")
    res = set_peft_model_state_dict(model, tensors, adapter_name="ref")
    assert not res.unexpected_keys
    model.eval()
    with torch.no_grad():
        return model(input_ids=ids).logits


def peft_keys(model, adapter: str) -> set[str]:
    from peft import get_peft_model_state_dict
    return set(get_peft_model_state_dict(model, adapter_name=adapter, save_embedding_layers=False))


def tree_hashes(root: Path) -> dict[str, tuple]:
    """Every entry under ``root``: its kind, mode, size, mtime and content hash."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = Path(dirpath) / name
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if p.is_symlink():
                out[rel] = ("link", os.readlink(p))
            elif p.is_dir():
                out[rel] = ("dir", st.st_mode)
            else:
                out[rel] = ("file", st.st_mode, st.st_size, st.st_mtime_ns,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def copy_tree(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --- one migration of the whole tree, shared by the tests below ---------------------------------

@pytest.fixture(scope="module")
def migration(results_tree, tmp_path_factory):
    root, manifest, now = results_tree
    base = tmp_path_factory.mktemp("migrate")
    src = copy_tree(root, base / "src")
    dst = base / "dst"
    before = tree_hashes(src)
    options = MigrateOptions(base_model=str(manifest.base_model_dirs["llama"]), rank=4)
    plan = plan_migrate(str(src), str(dst), options, now=now)
    result = execute_migrate(plan)
    return src, dst, manifest, now, plan, result, before


def test_every_variant_is_migrated_or_skipped_with_its_reason(migration):
    src, dst, manifest, now, plan, result, _ = migration
    migrated = {o.source: o for o in result.migrated}
    skipped = {o.source: o for o in result.skipped}
    expected_skips = {e.path for e in manifest.values() if e not in migratable(manifest)}
    wanted = {e.path for e in migratable(manifest) if e.layout not in ("hf-merged", "model") or _has_lowrank()}
    failed = {o.source: o.reason for o in result.failed}
    assert set(failed) == deep_broken(manifest), failed
    for path, reason in failed.items():
        # read back, a NaN in an adapter is what validate --deep calls broken: never a migration
        assert reason.startswith("broken: nan-or-inf: ") and manifest[path].problem_paths[
            "nan-or-inf"].endswith(reason.split(": ")[2]), reason
        assert not (dst / manifest[path].path).exists(), "a failed target was left in DST"
    assert set(migrated) == wanted - deep_broken(manifest)
    assert expected_skips <= set(skipped)
    for path in expected_skips:
        reason = skipped[path].reason
        e = manifest[path]
        assert reason.startswith("broken" if e.status == "broken" else "fresh" if "young" in e.flags
                                 else "in progress"), reason
    for path, o in migrated.items():
        e = manifest[path]
        assert o.method == EXPECTED_METHOD[e.layout], (path, o.method)
        assert o.experts == (e.num_experts or 1)
    layouts = {manifest[p].layout for p in migrated}
    assert set(EXPECTED_METHOD) - {"hf-merged"} <= layouts


def test_targets_audit_peft_only_canonical(migration):
    src, dst, manifest, now, plan, result, _ = migration
    audit = scan(str(dst), min_age_s=0)
    found = {c.path: c for c in audit.checkpoints}
    assert set(found) == {o.target for o in result.migrated}
    for path, c in found.items():
        assert c.status == "healthy", (path, c.status, c.problems)
        assert c.layout == "canonical", (path, c.layout)
        assert not c.problems, (path, c.problems)
        assert c.num_experts == (manifest[path].num_experts or 1)
        assert not c.merged_files, "merged weights in a target"


def test_configs_record_the_true_hyperparameters(migration):
    src, dst, manifest, now, plan, result, _ = migration
    for o in result.migrated:
        e = manifest[o.source]
        if o.method == "svd":
            continue
        t = dst / o.target
        moe = json.loads((t / "dylo_moe_state" / "config.json").read_text())
        root_cfg = json.loads((t / "config.json").read_text())
        assert moe["num_experts"] == e.num_experts == root_cfg["num_experts"]
        assert moe["lora_r"] == e.lora_r and moe["lora_alpha"] == e.lora_alpha, o.source
        assert root_cfg["model_type"] == "dylora-moe" and root_cfg["checkpoint_type"] == "peft_only"
        for i in range(e.num_experts):
            cfg = json.loads((t / "peft_adapters" / f"expert_{i}" / "adapter_config.json").read_text())
            assert cfg["r"] == e.lora_r and cfg["lora_alpha"] == e.lora_alpha, o.source
            assert cfg["peft_type"] == "LORA"
        assert (t / "dylo_moe_state" / "skill_library.pt").exists()
        torch.load(t / "dylo_moe_state" / "skill_library.pt", weights_only=True)


def test_expert_tensors_are_bit_identical_in_their_dtype(migration):
    src, dst, manifest, now, plan, result, _ = migration
    for o in result.migrated:
        if o.method == "svd":
            continue
        e = manifest[o.source]
        want = source_experts(src / o.source)
        assert sorted(want) == list(range(e.num_experts))
        for i, tensors in want.items():
            got = load_file(str(dst / o.target / "peft_adapters" / f"expert_{i}" /
                                "adapter_model.safetensors"))
            assert set(got) == set(tensors), (o.source, i)
            for k, t in tensors.items():
                assert got[k].dtype == t.dtype, (o.source, k)
                assert str(t.dtype).removeprefix("torch.") == e.lora_dtype
                assert bits_equal(got[k], t), (o.source, k)


def test_router_state_is_carried_exactly(migration):
    src, dst, manifest, now, plan, result, _ = migration
    for o in result.migrated:
        router = torch.load(dst / o.target / "dylo_moe_state" / "router.pt", weights_only=True)
        assert set(router) == {"gate.weight", "gate.bias"}
        if o.method == "svd":
            assert router["gate.weight"].shape[0] == 1
            continue
        want = source_router(src / o.source)
        for k in ("gate.weight", "gate.bias"):
            assert bits_equal(router[k], want[k]), (o.source, k)


def test_peft_loads_every_expert_and_logits_equal_the_source(migration):
    from peft import PeftModel
    src, dst, manifest, now, plan, result, _ = migration
    ids = random_ids()
    checked = 0
    for o in result.migrated:
        if o.method == "svd":
            continue
        e = manifest[o.source]
        base_dir = manifest.base_model_dirs[e.arch]
        for i, tensors in source_experts(src / o.source).items():
            ref = reference_logits(base_dir, tensors, e.lora_r, e.lora_alpha, ids)
            adapter_dir = dst / o.target / "peft_adapters" / f"expert_{i}"
            model = PeftModel.from_pretrained(load_base(base_dir), str(adapter_dir),
                                              adapter_name=f"expert_{i}")
            assert peft_keys(model, f"expert_{i}") == set(load_file(str(
                adapter_dir / "adapter_model.safetensors"))), "missing or unexpected keys"
            model.eval()
            with torch.no_grad():
                out = model(input_ids=ids).logits
            torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
            checked += 1
    assert checked >= 50


def test_trainer_and_tokenizer_files_are_byte_identical(migration):
    src, dst, manifest, now, plan, result, _ = migration
    compared = 0
    for o in result.migrated:
        for f in (src / o.source).iterdir():
            if f.name in TRAINER_NAMES or f.name.startswith("rng_state"):
                target = dst / o.target / f.name
                assert target.read_bytes() == f.read_bytes(), (o.source, f.name)
                compared += 1
    assert compared > 60
    multi = dst / "sweeps/lr1e-4/seed0/checkpoint-50"
    assert (multi / "rng_state_0.pth").exists() and (multi / "rng_state_1.pth").exists()


def test_source_tree_is_never_modified(migration):
    src, dst, manifest, now, plan, result, before = migration
    assert tree_hashes(src) == before


def test_rerun_skips_finished_targets_and_writes_nothing(migration):
    src, dst, manifest, now, plan, result, _ = migration
    stamp = {p: p.stat().st_mtime_ns for p in dst.rglob("*")}
    plan2 = plan_migrate(str(src), str(dst), plan.options, now=now)
    assert {i.source for i in plan2.items if i.action == ACTION_DONE} == {o.source for o in result.migrated}
    # what failed (a NaN read back) is planned again, and fails again, writing nothing
    assert {i.source for i in plan2.items if i.action == ACTION_MIGRATE} == deep_broken(manifest)
    again = execute_migrate(plan2)
    assert not again.migrated and {o.source for o in again.failed} == deep_broken(manifest)
    assert {o.source for o in again.skipped if o.reason == "already migrated"} == \
        {o.source for o in result.migrated}
    # the failed retry made and removed its temporary directory (and the missing directories
    # above it): only the mtimes of the directories above it moved; every path and every
    # other timestamp is as it was
    retried = {d for path in deep_broken(manifest) for d in (dst / path).parents}
    assert {p: p.stat().st_mtime_ns for p in dst.rglob("*")
            if p.name != ".ckpt-tools.lock" and p not in retried} == {
        p: t for p, t in stamp.items() if p.name != ".ckpt-tools.lock" and p not in retried}
    assert set(dst.rglob("*")) == set(stamp)


def test_plan_is_serialisable(migration):
    src, dst, manifest, now, plan, result, _ = migration
    doc = json.loads(json.dumps(plan.to_dict()))
    assert MigratePlan.from_dict(doc) == plan


# --- svd -------------------------------------------------------------------------------------

@needs_lowrank
def test_hf_merged_svd_target_audits_peft_only_and_verify_passes(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = copy_tree(root / "merged_hf", tmp_path / "src")
    dst = tmp_path / "dst"
    out = _run_cli(["migrate", str(src), str(dst), "--base-model",
                    str(manifest.base_model_dirs["llama"]), "--rank", "4", "--verify", "--json"])
    assert out["rc"] == 0, out
    doc = out["json"]
    (m,) = doc["migrated"]
    assert m["method"] == "svd" and m["experts"] == 1
    assert m["max_rel_error"] < 1e-4
    assert m["module_errors"] and max(m["module_errors"].values()) == m["max_rel_error"]
    assert m["verify"]["passed"] and m["verify"]["max_rel_diff"] < 1e-2
    audit = scan(str(dst), min_age_s=0)
    (c,) = audit.checkpoints
    assert c.status == "healthy" and c.layout == "canonical" and not c.problems


@needs_lowrank
def test_svd_without_base_model_fails_that_checkpoint_only(results_tree, tmp_path):
    """A DyLoRA-marked merged export without --base-model fails alone; the same directory
    unmarked is a full model as far as anyone can tell without a base: skipped."""
    root, manifest, now = results_tree
    src = tmp_path / "src"
    copy_tree(root / "merged_hf", src / "merged_hf")
    copy_tree(root / "legacy_v1", src / "legacy_v1")
    copy_tree(root / "merged_hf", src / "marked")
    cfg_path = src / "marked" / "merged_model" / "config.json"
    cfg_path.write_text(json.dumps(json.loads(cfg_path.read_text())
                                   | {"_dylora_original_type": "dylora-moe"}))
    out = _run_cli(["migrate", str(src), str(tmp_path / "dst"), "--json", "--min-age", "0"])
    assert out["rc"] == 1
    assert [f["source"] for f in out["json"]["failed"]] == ["marked/merged_model"]
    assert "--base-model" in out["json"]["failed"][0]["reason"]
    (s,) = [s for s in out["json"]["skipped"] if s["source"] == "merged_hf/merged_model"]
    assert s["reason"].startswith("a full model: nothing to migrate")
    assert not (tmp_path / "dst" / "merged_hf").exists()
    assert len(out["json"]["migrated"]) == 4


def test_a_nan_adapter_is_reported_broken_and_nothing_is_left_in_dst(results_tree, tmp_path):
    """A normal validation cannot see a NaN; migrate reads back every tensor it writes, so it
    fails that checkpoint as ``validate --deep`` would, and DST holds nothing of it."""
    root, manifest, now = results_tree
    e = manifest["deep-only/nan-or-inf/checkpoint-100"]
    src = tmp_path / "src"
    copy_tree(root / "deep-only" / "nan-or-inf", src / "nan-or-inf")
    copy_tree(root / "run canonical", src / "run canonical")    # a healthy neighbour
    dst = tmp_path / "dst"
    out = _run_cli(["migrate", str(src), str(dst), "--json", "--min-age", "0"])
    assert out["rc"] == 1
    [failed] = out["json"]["failed"]
    assert failed["source"] == "nan-or-inf/checkpoint-100"
    assert failed["reason"].startswith("broken: nan-or-inf: peft_adapters/expert_0/adapter_model.safetensors: ")
    assert not (dst / "nan-or-inf").exists()
    assert {m["source"] for m in out["json"]["migrated"]} == {
        p.relative_to(src).as_posix() for p in (src / "run canonical").glob("checkpoint-*")}
    text = _run_cli(["migrate", str(src / "nan-or-inf"), str(tmp_path / "dst2"), "--min-age", "0"])
    assert text["rc"] == 1 and "nan-or-inf" in text["stdout"] + text["stderr"]
    assert not list((tmp_path / "dst2").glob("checkpoint-*"))
    assert e.deep_problem_codes == {"nan-or-inf"}


# --- CLI ---------------------------------------------------------------------------------------

def _run_cli(args: list[str]) -> dict:
    from click.testing import CliRunner

    from ckpt_tools.cli import cli
    res = CliRunner().invoke(cli, args, catch_exceptions=False)
    doc = None
    if "--json" in args:
        doc = json.loads(res.stdout)
    return {"rc": res.exit_code, "stdout": res.stdout, "stderr": res.stderr, "json": doc}


def test_dry_run_writes_nothing_and_names_each_method(results_tree, tmp_path):
    root, manifest, now = results_tree
    dst = tmp_path / "dst"
    out = _run_cli(["migrate", str(root), str(dst), "--dry-run", "--json"])
    assert out["rc"] == 0
    assert not dst.exists()
    planned = {p["source"]: p["method"] for p in out["json"]["planned"]}
    for e in migratable(manifest):
        if e.path in planned:
            assert planned[e.path] == EXPECTED_METHOD[e.layout]
    assert {e.path for e in migratable(manifest)} - set(planned) <= {
        "run canonical/checkpoint-300",   # young: in progress for the CLI's real clock
        "merged_hf/merged_model"}         # no DyLoRA marker and no --base-model: a full model
    (s,) = [s for s in out["json"]["skipped"] if s["source"] == "merged_hf/merged_model"]
    assert s["reason"].startswith("a full model: nothing to migrate")
    text = _run_cli(["migrate", str(root), str(dst), "--dry-run"])
    assert text["rc"] == 0 and not dst.exists()
    assert "Dry run" in text["stdout"]


@pytest.mark.parametrize("inside", ["dst-in-src", "src-in-dst", "same"])
def test_overlapping_roots_are_refused(tmp_path, inside):
    src = tmp_path / "a"
    src.mkdir()
    if inside == "dst-in-src":
        dst = src / "out"
    elif inside == "src-in-dst":
        dst = tmp_path
    else:
        dst = src
    out = _run_cli(["migrate", str(src), str(dst)])
    assert out["rc"] == 2
    assert "inside" in out["stderr"] or "is SRC" in out["stderr"]
    assert not (src / "out").exists()


def test_json_document_shape(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = copy_tree(root / "hybrid_v2", tmp_path / "src")
    out = _run_cli(["migrate", str(src), str(tmp_path / "dst"), "--json"])
    assert out["rc"] == 0
    doc = out["json"]
    assert set(doc) >= {"migrated", "skipped", "failed"}
    (m,) = doc["migrated"]
    assert set(m) >= {"source", "target", "method", "experts", "max_rel_error"}
    assert m["method"] == "exact" and m["max_rel_error"] == 0.0
    assert any("2·r" in w for w in m["warnings"])     # alpha was guessed, and said so


def test_lora_alpha_option_only_fills_a_gap(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = tmp_path / "src"
    copy_tree(root / "hybrid_v2", src / "hybrid_v2")     # no config records alpha
    copy_tree(root / "seed_v3", src / "seed_v3")         # config.json says 16
    dst = tmp_path / "dst"
    out = _run_cli(["migrate", str(src), str(dst), "--lora-alpha", "4", "--json"])
    assert out["rc"] == 0

    def alpha(rel):
        return json.loads((dst / rel / "peft_adapters/expert_0/adapter_config.json").read_text())["lora_alpha"]
    assert alpha("hybrid_v2/checkpoint-100") == 4
    assert alpha("seed_v3/checkpoint-100") == 16


def test_link_hard_links_canonical_checkpoints(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = copy_tree(root / "run canonical" / "checkpoint-100", tmp_path / "src" / "checkpoint-100")
    dst = tmp_path / "dst"
    out = _run_cli(["migrate", str(tmp_path / "src"), str(dst), "--link", "--json"])
    assert out["rc"] == 0, out
    a = src / "peft_adapters/expert_0/adapter_model.safetensors"
    b = dst / "checkpoint-100/peft_adapters/expert_0/adapter_model.safetensors"
    assert a.stat().st_ino == b.stat().st_ino


def test_verify_exact_passes_and_catches_a_wrong_base(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = copy_tree(root / "legacy_v1" / "checkpoint-100", tmp_path / "src" / "checkpoint-100")
    ok = _run_cli(["migrate", str(tmp_path / "src"), str(tmp_path / "ok"), "--verify", "--json",
                   "--base-model", str(manifest.base_model_dirs["llama"])])
    assert ok["rc"] == 0, ok
    v = ok["json"]["migrated"][0]["verify"]
    assert v["passed"] and v["max_rel_diff"] <= 1e-4
    bad = _run_cli(["migrate", str(tmp_path / "src"), str(tmp_path / "bad"), "--verify", "--json",
                    "--base-model", str(manifest.base_model_dirs["gemma"])])
    assert bad["rc"] == 1
    assert "base" in bad["json"]["failed"][0]["reason"]
    assert not (tmp_path / "bad" / "checkpoint-100").exists()
    assert src.exists()
    # a best_model/ carries its base config: the base is rebuilt from the merged weights
    best = copy_tree(root / "run_best", tmp_path / "best" / "run_best")
    rebuilt = _run_cli(["migrate", str(best.parent), str(tmp_path / "best-out"), "--verify",
                        "--json"])
    by_source = {m["source"]: m for m in rebuilt["json"]["migrated"]}
    assert by_source["run_best/best_model"]["verify"]["passed"]
    # checkpoint-100 (V2) holds no model config: --verify needs --base-model there
    assert [f["source"] for f in rebuilt["json"]["failed"]] == ["run_best/checkpoint-100"]


# --- resumability, replacement, foreign targets --------------------------------------------------

def test_changed_source_is_migrated_again_and_foreign_targets_are_kept(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = tmp_path / "src"
    copy_tree(root / "seed_v3", src / "seed_v3")
    copy_tree(root / "seed_v4", src / "seed_v4")
    dst = tmp_path / "dst"
    first = execute_migrate(plan_migrate(str(src), str(dst), MigrateOptions(min_age_s=0)))
    assert len(first.migrated) == 2
    # the source of one changes: its target is redone (replaced), the other one is kept
    state = src / "seed_v3/checkpoint-100/trainer_state.json"
    state.write_text(state.read_text().replace('"global_step": 100', '"global_step": 101'))
    second = execute_migrate(plan_migrate(str(src), str(dst), MigrateOptions(min_age_s=0)))
    assert [o.source for o in second.migrated] == ["seed_v3/checkpoint-100"]
    assert (dst / "seed_v3/checkpoint-100/trainer_state.json").read_bytes() == state.read_bytes()
    assert not list(dst.rglob(".ckpt-tools-old-*")) and not list(dst.rglob(".ckpt-tools-tmp-*"))
    # a target that ckpt-tools did not write is never overwritten
    foreign = dst / "seed_v4/checkpoint-100"
    shutil.rmtree(foreign)
    foreign.mkdir()
    (foreign / "mine.txt").write_text("keep me")
    third = execute_migrate(plan_migrate(str(src), str(dst), MigrateOptions(min_age_s=0)))
    assert [o.source for o in third.failed] == ["seed_v4/checkpoint-100"]
    assert "not written by ckpt-tools" in third.failed[0].reason
    assert (foreign / "mine.txt").read_text() == "keep me"


def _small_source(root: Path, into: Path) -> Path:
    for rel in ("legacy_v1/checkpoint-100", "legacy_v1/checkpoint-400", "hybrid_v2",
                "upstream_v5_naïve/checkpoint-200", "run canonical/checkpoint-100", "run_best"):
        copy_tree(root / rel, into / rel)
    return into


def _cli_process(src: Path, dst: Path, fault: str | None, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    cmd = fault_entry.command(fault) if fault else [sys.executable, "-m", "ckpt_tools.cli"]
    return subprocess.run([*cmd, "migrate", str(src), str(dst),
                           "--min-age", "0", "--json", *extra], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _complete_or_absent(dst: Path, targets: list[str]) -> int:
    """Every target is absent or a complete canonical checkpoint; returns how many exist."""
    audit = scan(str(dst), min_age_s=0) if dst.exists() else None
    found = {c.path: c for c in audit.checkpoints} if audit else {}
    present = 0
    for t in targets:
        if not (dst / t).exists():
            continue
        present += 1
        c = found[t]
        assert c.status == "healthy" and c.layout == "canonical" and not c.problems, (t, c)
        assert (dst / t / ".ckpt-tools-migrated.json").exists()
    for path, c in found.items():
        if path not in targets:   # only migrate's own temporary directories may be left over
            assert c.status == "in-progress" and ".ckpt-tools-tmp-" in path, (path, c.status)
    return present


@pytest.mark.slow
def test_sigkill_at_any_point_leaves_complete_or_absent_targets_and_rerun_finishes(
        results_tree, tmp_path):
    root, manifest, now = results_tree
    src = _small_source(root, tmp_path / "src")
    before = tree_hashes(src)
    targets = [c.path for c in scan(str(src), min_age_s=0).checkpoints]
    dst = tmp_path / "dst"
    seen_partial = False
    for fault in ("after_write:3", "after_write:25", "before_rename:2", "after_rename:1"):
        proc = _cli_process(src, dst, fault)
        assert proc.returncode == -signal.SIGKILL, (fault, proc.returncode, proc.stderr[-2000:])
        present = _complete_or_absent(dst, targets)
        seen_partial |= 0 < present < len(targets) or bool(list(dst.rglob(".ckpt-tools-tmp-*")))
    assert seen_partial
    done = _cli_process(src, dst, None, "--jobs", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    doc = json.loads(done.stdout)
    assert not doc["failed"]
    assert _complete_or_absent(dst, targets) == len(targets)
    assert not list(dst.rglob(".ckpt-tools-tmp-*"))
    assert tree_hashes(src) == before
    # what the killed runs finished is not redone
    assert {o["source"] for o in doc["skipped"] if o["reason"] == "already migrated"}


def test_partially_adapted_layers_get_exact_target_modules(results_tree, tmp_path):
    from peft import PeftModel
    from safetensors.torch import save_file
    root, manifest, now = results_tree
    e = manifest["legacy_v1/checkpoint-100"]
    ck = copy_tree(root / e.path, tmp_path / "src" / "checkpoint-100")
    sd = load_file(str(ck / "model.safetensors"))
    # layer 0 was never adapted: no LoRA tensors there, and a plain weight instead of base_layer
    sd = {k.replace(".base_layer.", ".") if ".layers.0." in k else k: v for k, v in sd.items()
          if not (".layers.0." in k and ".lora_" in k)}
    save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    dst = tmp_path / "dst"
    result = execute_migrate(plan_migrate(str(tmp_path / "src"), str(dst), MigrateOptions(min_age_s=0)))
    assert [o.source for o in result.migrated] == ["checkpoint-100"], result.failed
    adapter = dst / "checkpoint-100/peft_adapters/expert_1"
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    assert isinstance(cfg["target_modules"], str)   # leaf names would adapt layer 0 too
    base_dir = manifest.base_model_dirs["llama"]
    model = PeftModel.from_pretrained(load_base(base_dir), str(adapter), adapter_name="expert_1")
    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    assert peft_keys(model, "expert_1") == set(tensors)
    assert not any(".layers.0." in k for k in tensors)
    ids = random_ids()
    with torch.no_grad():
        out = model.eval()(input_ids=ids).logits
    ref = reference_logits(base_dir, source_experts(ck)[1], e.lora_r, e.lora_alpha, ids)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)
