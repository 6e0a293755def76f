"""migrate and plain Hugging Face model directories: a question of content, not layout.

A plain model directory (``config.json`` with ``architectures``, plain weights) is a DyLoRA-MoE
export to migrate only where its config says so. Any other is a full model: without
``--base-model`` there is nothing to migrate; with it, migrate asks whether the model is a LoRA
merged into that base, keeps it where every module meets ``--max-error`` and skips the rest as
full fine-tunes, writing nothing for them (exit 0). The errors expected here are computed from
the files with ``torch.linalg.svdvals``, never with ``ckpt_tools.migrate.lowrank``.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from ckpt_tools import scan
from ckpt_tools.kinds import Layout, ModelKind, Status
from ckpt_tools.migrate import (ACTION_MIGRATE, ACTION_SKIP, DEFAULT_MAX_ERROR, MigrateOptions,
                                execute_migrate, plan_migrate)
from ckpt_tools.migrate.plan import FULL_MODEL_REASON, method_for
from test_migrate import _run_cli, copy_tree, needs_lowrank
from test_migrate_max_error import LINEAR, dst_entries, full_fine_tune, mark_dylora_export

LOCK = ".ckpt-tools.lock"
NOT_LOW_RANK = "a full fine-tune, not a low-rank delta: "


def migrate(src: Path, dst: Path, *args: str) -> dict:
    return _run_cli(["migrate", str(src), str(dst), "--min-age", "0", "--device", "cpu", *args])


def exact_error(base_dir: Path, ft_dir: Path, module: str, rank: int) -> float:
    """‖D − D_rank‖_F / ‖D‖_F of one module, from the saved weights' exact singular values."""
    from safetensors.torch import load_file
    name = module + ".weight"
    d = (load_file(str(ft_dir / "model.safetensors"))[name].double()
         - load_file(str(base_dir / "model.safetensors"))[name].double())
    s2 = torch.linalg.svdvals(d) ** 2
    return float((s2[rank:].sum() / s2.sum()).sqrt())


@pytest.fixture(scope="module")
def plain(results_tree, tmp_path_factory):
    """SRC with the fixture's merged LoRA (``merged_hf/merged_model``, expert 0 of a rank-4 MoE
    merged into the llama base by PEFT) and a full fine-tune of the same base (every linear
    weight perturbed by Gaussian noise), both unmarked plain model directories."""
    root, manifest, now = results_tree
    base_dir = manifest.base_model_dirs["llama"]
    src = tmp_path_factory.mktemp("plain") / "src"
    copy_tree(root / "merged_hf", src / "merged_hf")
    full_fine_tune(base_dir, src / "ft" / "final", seed=5)
    return base_dir, src


# --- with --base-model: the content question -------------------------------------------------

@needs_lowrank
@pytest.mark.parametrize("rank", [4, 8])
def test_a_merged_lora_is_migrated_at_its_rank_and_a_full_fine_tune_is_skipped(plain, tmp_path,
                                                                               rank):
    base_dir, src = plain
    dst = tmp_path / "dst"
    out = migrate(src, dst, "--base-model", str(base_dir), "--rank", str(rank), "--json")
    assert out["rc"] == 0, out
    (m,) = out["json"]["migrated"]
    assert m["source"] == "merged_hf/merged_model" and m["method"] == "svd"
    assert m["max_rel_error"] < 1e-4 and m["max_error"] == DEFAULT_MAX_ERROR
    (c,) = scan(str(dst), min_age_s=0).checkpoints
    assert c.path == "merged_hf/merged_model"
    assert c.status == Status.HEALTHY and c.layout == Layout.CANONICAL and not c.problems

    (s,) = out["json"]["skipped"]
    assert s["source"] == "ft/final" and s["method"] == "svd"
    assert s["reason"].startswith(NOT_LOW_RANK) and "\n" not in s["reason"]
    assert out["json"]["failed"] == []
    (o,) = s["over_bound"]          # the extraction stopped at the first module over the bound
    assert o["rank"] == rank and o["bound"] == DEFAULT_MAX_ERROR and o["full_rank"] == 32
    assert o["needed_rank"] == 32
    assert o["error"] == pytest.approx(exact_error(base_dir, src / "ft" / "final", o["module"],
                                                   rank), rel=0.02)
    assert s["max_error"] == DEFAULT_MAX_ERROR and s["max_rel_error"] == o["error"] > 0.5
    assert f"relative error {o['error']:.3g} at rank {rank} is above --max-error 0.01" in s["reason"]
    assert not (dst / "ft").exists()          # no target, no temporary directory


@needs_lowrank
def test_a_trainer_full_fine_tune_is_skipped_at_any_rank_below_full(ordinary_runs, tmp_path):
    """``full/checkpoint-6`` of a real Trainer run: its delta needs full rank everywhere (the
    worst module is 0.80 at rank 4 and still 0.048 at rank 31). Nothing of it is written."""
    from fixtures.dylora import build_base
    root, manifest = ordinary_runs
    base_dir = tmp_path / "base"
    build_base(base_seed=0).save_pretrained(str(base_dir))   # the runs' base (seed 0)
    src = root / "full" / "checkpoint-6"
    for rank in (4, 31):
        dst = tmp_path / f"dst{rank}"
        out = migrate(src, dst, "--base-model", str(base_dir), "--rank", str(rank))
        assert out["rc"] == 0, out["stdout"]
        assert f"skipped   {src}: {NOT_LOW_RANK}" in out["stdout"]
        assert "Done: 0 migrated, 1 skipped, 0 failed." in out["stdout"]
        assert not dst.exists()              # SRC is the checkpoint: DST would be its target
        assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".ckpt-tools-tmp")]


@needs_lowrank
def test_an_explicit_max_error_skips_an_unmarked_model_and_fails_a_marked_export(plain, tmp_path):
    """Where the config says DyLoRA-MoE export, the user asked for a migration: a copy over
    the bound is a failure (exit 1), with the full report; unmarked, the same weights are a
    full fine-tune: skipped (exit 0). Nothing is written for either."""
    base_dir, src = plain
    marked = tmp_path / "marked"
    copy_tree(src / "ft", marked / "ft")
    mark_dylora_export(marked / "ft" / "final")
    out = migrate(marked, tmp_path / "dst-marked", "--base-model", str(base_dir), "--rank", "4",
                  "--max-error", "0.05", "--json")
    assert out["rc"] == 1
    (f,) = out["json"]["failed"]
    assert f["source"] == "ft/final" and f["reason"].startswith("svd: the low-rank copy would lose")
    assert f["max_error"] == 0.05 and len(f["over_bound"]) == len(f["module_errors"]) == 14
    assert dst_entries(tmp_path / "dst-marked") <= {LOCK}

    out = migrate(src / "ft", tmp_path / "dst-plain", "--base-model", str(base_dir), "--rank", "4",
                  "--max-error", "0.05", "--json")
    assert out["rc"] == 0
    (s,) = out["json"]["skipped"]
    assert s["reason"].startswith(NOT_LOW_RANK) and "--max-error 0.05" in s["reason"]
    assert dst_entries(tmp_path / "dst-plain") <= {LOCK}


# --- without --base-model ----------------------------------------------------------------------

def test_without_base_model_plain_models_are_skipped_as_full_models(plain, tmp_path):
    base_dir, src = plain
    dst = tmp_path / "dst"
    out = migrate(src, dst, "--json")
    assert out["rc"] == 0
    assert out["json"]["migrated"] == out["json"]["failed"] == []
    reasons = {s["source"]: s["reason"] for s in out["json"]["skipped"]}
    assert reasons == {"merged_hf/merged_model": FULL_MODEL_REASON, "ft/final": FULL_MODEL_REASON}
    assert dst_entries(dst) <= {LOCK}

    text = migrate(src, tmp_path / "dst-text", "--dry-run")
    assert text["rc"] == 0
    assert f"  ft/final: {FULL_MODEL_REASON}" in text["stdout"].splitlines()
    assert not (tmp_path / "dst-text").exists()


# --- the dry run: the question is stated, not answered ------------------------------------------

def test_a_dry_run_says_what_decides_and_that_it_cannot_tell(plain, tmp_path, monkeypatch):
    from ckpt_tools.migrate import lowrank
    base_dir, src = plain
    extracted = []
    monkeypatch.setattr(lowrank, "extract", lambda *a, **k: extracted.append(a))
    dst = tmp_path / "dst"
    out = migrate(src, dst, "--base-model", str(base_dir), "--rank", "4", "--dry-run", "--json")
    assert out["rc"] == 0 and not dst.exists() and not extracted
    planned = {p["source"]: p for p in out["json"]["planned"]}
    assert set(planned) == {"merged_hf/merged_model", "ft/final"}
    for p in planned.values():
        assert p["method"] == "svd"
        (note,) = [n for n in p["notes"] if "cannot tell without extracting" in n]
        assert "--max-error 0.01 at --rank 4" in note and "skipped as a full fine-tune" in note
    text = migrate(src, dst, "--base-model", str(base_dir), "--rank", "4", "--dry-run")
    assert sum("a dry run cannot tell without extracting" in line
               for line in text["stdout"].splitlines()) == 2


# --- ordinary Trainer checkpoints that hold nothing to migrate -----------------------------------

def test_the_ordinary_runs_are_skipped_whole_and_nothing_is_written(ordinary_runs, tmp_path):
    """Whatever the classifier calls them, no checkpoint of ordinary Trainer runs is migrated
    without --base-model: full models, PEFT adapters, DeepSpeed and FSDP state are skipped."""
    root, manifest = ordinary_runs
    dst = tmp_path / "dst"
    out = migrate(root, dst, "--json")
    assert out["rc"] == 0
    assert out["json"]["migrated"] == out["json"]["failed"] == []
    skipped = {s["source"]: s["reason"] for s in out["json"]["skipped"]}
    for path, e in manifest.items():
        if e.model_kind == "full-model" and e.damage is None:
            assert skipped[path] == FULL_MODEL_REASON, path
    assert dst_entries(dst) <= {LOCK}


@pytest.mark.parametrize("kind, words", [
    (Layout.ADAPTER, "a PEFT adapter already holds only the adapter: nothing to migrate"),
    (Layout.ADAPTERS, "PEFT adapters already hold only the adapters: nothing to migrate"),
    (Layout.DEEPSPEED, "DeepSpeed's partitioned training state"),
    (Layout.FSDP, "FSDP's sharded training state"),
])
def test_adapters_and_sharded_training_state_have_nothing_to_migrate(ordinary_runs, kind, words):
    """The reason given for each ordinary layout the classifier names (a healthy checkpoint of
    that layout, holding no plain model weights), with or without --base-model."""
    root, manifest = ordinary_runs
    source = {Layout.ADAPTER: "peft-lora", Layout.ADAPTERS: "peft-lora",
              Layout.DEEPSPEED: "fsdp", Layout.FSDP: "fsdp"}[kind]
    (c,) = scan(str(root / source / "checkpoint-6"), min_age_s=0).checkpoints
    healthy = dataclasses.replace(c, layout=kind, status=Status.HEALTHY)
    assert healthy.facts.merged_kind is None
    for given in (False, True):
        method, why = method_for(healthy, base_model_given=given)
        assert method is None and why.startswith(words)


def test_a_plain_model_is_asked_only_with_a_base_and_a_marked_one_always(plain):
    """The plan's rule, library side: with a base the unmarked directory is tried (svd, with
    the content note), without it skipped; a marked export is planned either way."""
    base_dir, src = plain
    for options, action in (
            (MigrateOptions(min_age_s=0), ACTION_SKIP),
            (MigrateOptions(base_model=str(base_dir), rank=4, min_age_s=0), ACTION_MIGRATE)):
        plan = plan_migrate(str(src), str(src.parent / "unused-dst"), options)
        assert {i.source: i.action for i in plan.items} == {
            "merged_hf/merged_model": action, "ft/final": action}
    (c,) = [c for c in scan(str(src), min_age_s=0).checkpoints if c.path == "ft/final"]
    marked = dataclasses.replace(c, model_kind=ModelKind.DYLORA_MOE)   # what a marker makes it
    assert method_for(marked, base_model_given=False) == ("svd", None)
    assert method_for(c, base_model_given=False) == (None, FULL_MODEL_REASON)
