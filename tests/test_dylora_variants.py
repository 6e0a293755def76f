"""Two DyLoRA-MoE trees that were judged wrong (issue 15), judged, damaged and migrated right:

- flat ``peft_adapters/expert_<i>.pt`` files keyed as PEFT saves an adapter
  (``base_model.model.….lora_A.weight``, no ``.expert_<i>.`` segment): expert i's tensors;
- experts that each carry an ``adapter_config.json`` with the router as ``router.safetensors``
  at the root and no ``dylo_moe_state/``: complete, as README's rule says (its adapter configs
  record the hyperparameters).

Each is built by the fixture writers of ``fixtures/layouts.py``, audited and validated through
the CLI, broken in the ways that matter, and migrated; the target's tensors must equal the
source's and the target must audit healthy.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures.dylora import build_moe, expert_name
from fixtures.layouts import (write_adapters_root_router, write_best_model, write_canonical,
                              write_v3, write_v4, write_v5)

NUM_EXPERTS = 3


def _cli(*args: str) -> tuple[int, dict | None, str]:
    from click.testing import CliRunner

    from ckpt_tools.cli import cli
    res = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    doc = json.loads(res.stdout) if "--json" in args else None
    return res.exit_code, doc, res.stdout + res.stderr


def _audit(root: Path) -> tuple[int, dict[str, dict]]:
    rc, doc, _ = _cli("--json", "audit", "--min-age", "0", str(root))
    return rc, {c["path"]: c for c in doc["checkpoints"]}


def _codes(entry: dict) -> set[tuple[str, str]]:
    """(code, path relative to the checkpoint) of each error."""
    prefix = entry["path"] + "/"
    return {(p["code"], p["path"].removeprefix(prefix)) for p in entry["problems"]
            if p["severity"] == "error"}


@pytest.fixture(scope="module")
def moe():
    return build_moe(num_experts=NUM_EXPERTS, seed=3)


@pytest.fixture(scope="module")
def variants(moe, tmp_path_factory):
    """A read-only tree of the new variants: copy a run before changing it."""
    root = tmp_path_factory.mktemp("variants") / "results"
    write_v4(moe, root / "flat_peft" / "checkpoint-100", expert_keys="peft")
    write_v3(moe, root / "flat_peft_merged" / "checkpoint-100", expert_keys="peft")
    write_adapters_root_router(moe, root / "root_router" / "checkpoint-100")
    write_v5(moe, root / "nested_no_config" / "checkpoint-100", merged=False, config=False)
    run = root / "best_run"
    write_v4(moe, run / "checkpoint-100", expert_keys="peft")
    write_best_model(moe, run, weights="expert_pt", expert_keys="peft")
    return root


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst, symlinks=True)
    return dst


# --- judged right -----------------------------------------------------------------------------

def test_every_variant_audits_healthy_or_redundant_with_no_problem(variants):
    rc, found = _audit(variants)
    assert rc == 0
    expected = {"flat_peft/checkpoint-100": ("healthy", "v4"),
                "flat_peft_merged/checkpoint-100": ("redundant", "v3"),
                "root_router/checkpoint-100": ("healthy", "canonical"),
                "nested_no_config/checkpoint-100": ("healthy", "v5"),
                "best_run/checkpoint-100": ("healthy", "v4"),
                "best_run/best_model": ("healthy", "v4")}
    assert {p: (c["status"], c["layout"]) for p, c in found.items()} == expected
    assert all(c["problems"] == [] for c in found.values()), found


def test_validate_finds_nothing_wrong(variants):
    paths = [str(variants / p / "checkpoint-100") for p in ("flat_peft", "root_router")]
    rc, doc, out = _cli("--json", "validate", "--min-age", "0", *paths)
    assert rc == 0, out
    rc, _, out = _cli("validate", "--deep", "--min-age", "0", *paths)
    assert rc == 0, out


def test_flat_peft_keys_beside_merged_weights_are_proven_and_pruned(variants, tmp_path):
    """The content proof reads PEFT-keyed expert files as the validator does: prune frees the
    merged weights (and validate --deep sees no merged-mismatch)."""
    run = _copy(variants / "flat_peft_merged", tmp_path / "results" / "flat_peft_merged")
    ckpt = run / "checkpoint-100"
    rc, _, out = _cli("validate", "--deep", "--min-age", "0", str(ckpt))
    assert rc == 0 and "merged-mismatch" not in out, out
    rc, doc, out = _cli("--json", "prune", "--min-age", "0", "--yes", str(tmp_path / "results"))
    assert rc == 0, out
    assert [d["path"] for d in doc["deleted"]] == ["flat_peft_merged/checkpoint-100/model.safetensors"]
    assert not (ckpt / "model.safetensors").exists()
    _, found = _audit(tmp_path / "results")
    assert found["flat_peft_merged/checkpoint-100"]["status"] == "healthy"


def test_experts_may_mix_the_two_key_forms_across_files(moe, variants, tmp_path):
    """Each file is read in its own form; the experts then compare alike."""
    ckpt = _copy(variants / "flat_peft" / "checkpoint-100", tmp_path / "r" / "run" / "checkpoint-100")
    indexed = {k: v.detach().clone() for k, v in moe.expert_raw_state_dict(1).items()}
    torch.save(indexed, ckpt / "peft_adapters" / "expert_1.pt")
    rc, found = _audit(tmp_path / "r")
    (entry,) = found.values()
    assert rc == 0 and entry["status"] == "healthy" and entry["problems"] == [], entry


# --- damaged: the right problem on the right file ----------------------------------------------

def _flat_peft(variants, tmp_path) -> Path:
    return _copy(variants / "flat_peft" / "checkpoint-100", tmp_path / "r" / "run" / "checkpoint-100")


def _root_router(variants, tmp_path) -> Path:
    return _copy(variants / "root_router" / "checkpoint-100", tmp_path / "r" / "run" / "checkpoint-100")


def _judged(tmp_path) -> dict:
    rc, found = _audit(tmp_path / "r")
    (entry,) = found.values()
    assert rc == 1 and entry["status"] == "broken", entry
    return entry


def test_flat_expert_missing(variants, tmp_path):
    ckpt = _flat_peft(variants, tmp_path)
    (ckpt / "peft_adapters" / "expert_1.pt").unlink()
    assert _codes(_judged(tmp_path)) == {("expert-missing", "peft_adapters/expert_1.pt")}


def test_flat_expert_truncated(variants, tmp_path):
    ckpt = _flat_peft(variants, tmp_path)
    f = ckpt / "peft_adapters" / "expert_2.pt"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    codes = _codes(_judged(tmp_path))
    assert codes and {path for _, path in codes} == {"peft_adapters/expert_2.pt"}, codes
    assert {code for code, _ in codes} <= {"truncated", "bad-archive"}, codes


def test_flat_file_with_another_experts_keys(moe, variants, tmp_path):
    ckpt = _flat_peft(variants, tmp_path)
    other = {k: v.detach().clone() for k, v in moe.expert_raw_state_dict(0).items()}
    torch.save(other, ckpt / "peft_adapters" / "expert_1.pt")
    entry = _judged(tmp_path)
    assert ("expert-count-mismatch", "peft_adapters/expert_1.pt") in _codes(entry)
    assert any("of expert 0, not expert 1" in p["message"] for p in entry["problems"])


def test_flat_file_mixing_both_key_forms(moe, variants, tmp_path):
    ckpt = _flat_peft(variants, tmp_path)
    mixed = {k: v.detach().clone() for k, v in moe.expert_state_dict(1).items()}
    extra = next(iter(moe.expert_raw_state_dict(1).items()))
    mixed[extra[0]] = extra[1].detach().clone()
    torch.save(mixed, ckpt / "peft_adapters" / "expert_1.pt")
    entry = _judged(tmp_path)
    assert _codes(entry) == {("expert-count-mismatch", "peft_adapters/expert_1.pt")}
    assert "both forms" in entry["problems"][0]["message"]


def test_adapter_dir_expert_missing(variants, tmp_path):
    ckpt = _root_router(variants, tmp_path)
    shutil.rmtree(ckpt / "peft_adapters" / "expert_2")
    # no config states the count: the router's rows do
    assert _codes(_judged(tmp_path)) == {("expert-missing", "peft_adapters/expert_2")}


def test_adapter_config_missing_is_still_broken(variants, tmp_path):
    """Without the expert's adapter config nothing records its hyperparameters."""
    ckpt = _root_router(variants, tmp_path)
    (ckpt / "peft_adapters" / "expert_0" / "adapter_config.json").unlink()
    assert ("missing-file", "peft_adapters/expert_0/adapter_config.json") in _codes(_judged(tmp_path))


def test_root_router_missing(variants, tmp_path):
    ckpt = _root_router(variants, tmp_path)
    (ckpt / "router.safetensors").unlink()
    assert ("missing-file", "dylo_moe_state/router.pt") in _codes(_judged(tmp_path))


def test_root_router_truncated(variants, tmp_path):
    ckpt = _root_router(variants, tmp_path)
    f = ckpt / "router.safetensors"
    f.write_bytes(f.read_bytes()[:-8])
    assert _codes(_judged(tmp_path)) == {("truncated", "router.safetensors")}


# --- migrated: exact tensors, a canonical target that audits healthy ----------------------------

def _router(moe) -> dict[str, torch.Tensor]:
    return {k: v.detach() for k, v in moe.router.state_dict().items()}


@pytest.mark.parametrize("run", ["flat_peft", "root_router", "flat_peft_merged"])
def test_migrate_writes_the_same_tensors_into_a_canonical_target(moe, variants, tmp_path, run):
    src = _copy(variants / run, tmp_path / "src" / run)
    dst = tmp_path / "dst"
    rc, doc, out = _cli("--json", "migrate", "--min-age", "0", str(tmp_path / "src"), str(dst))
    assert rc == 0, out
    (item,) = doc["migrated"]
    assert item["method"] == "exact" and item["experts"] == NUM_EXPERTS
    target = dst / run / "checkpoint-100"
    for i in range(NUM_EXPERTS):
        got = load_file(str(target / "peft_adapters" / expert_name(i) / "adapter_model.safetensors"))
        want = torch.load(src / "checkpoint-100" / "peft_adapters" / f"{expert_name(i)}.pt",
                          weights_only=True) if run.startswith("flat") else load_file(
            str(src / "checkpoint-100" / "peft_adapters" / expert_name(i) / "adapter_model.safetensors"))
        assert set(got) == set(want) == set(moe.expert_state_dict(i))
        assert all(torch.equal(got[k], want[k]) and got[k].dtype == want[k].dtype for k in want)
    router = torch.load(target / "dylo_moe_state" / "router.pt", weights_only=True)
    assert set(router) == set(_router(moe))
    assert all(torch.equal(router[k], v) for k, v in _router(moe).items())
    moe_cfg = json.loads((target / "dylo_moe_state" / "config.json").read_text())
    assert (moe_cfg["num_experts"], moe_cfg["lora_r"], moe_cfg["lora_alpha"]) == (
        NUM_EXPERTS, moe.hyper.r, moe.hyper.lora_alpha)
    assert not (target / "router.safetensors").exists()
    rc, found = _audit(dst)
    assert rc == 0
    entry = found[f"{run}/checkpoint-100"]
    assert (entry["status"], entry["layout"], entry["problems"]) == ("healthy", "canonical", [])


def test_a_complete_canonical_tree_is_still_copied(moe, tmp_path):
    """A tree keeping its router and MoE config in dylo_moe_state/ is copied as before."""
    write_canonical(moe, tmp_path / "src" / "run" / "checkpoint-100")
    rc, doc, out = _cli("--json", "migrate", "--min-age", "0", str(tmp_path / "src"), str(tmp_path / "dst"))
    assert rc == 0, out
    assert [m["method"] for m in doc["migrated"]] == ["copy"]


def test_migrate_refuses_a_flat_file_mixing_both_key_forms(moe, variants, tmp_path):
    """migrate plans only what audits sound; the extraction itself refuses the ambiguity too."""
    from ckpt_tools.migrate import MigrateOptions
    from ckpt_tools.migrate.errors import CheckpointFailure
    from ckpt_tools.migrate.extract import build_conversion, open_source
    ckpt = _flat_peft(variants, tmp_path)
    src = open_source(str(ckpt))
    mixed = {k: v.detach().clone() for k, v in moe.expert_state_dict(1).items()}
    extra = next(iter(moe.expert_raw_state_dict(1).items()))
    mixed[extra[0]] = extra[1].detach().clone()
    torch.save(mixed, ckpt / "peft_adapters" / "expert_1.pt")
    with pytest.raises(CheckpointFailure, match="expert_1.pt: holds LoRA keys of both forms"):
        build_conversion(src, "exact", MigrateOptions())

