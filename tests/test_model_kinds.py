"""A plain model directory is a DyLoRA-MoE export only where something says so (issue 15, item
2), and what ckpt-tools wrote itself is complete when written (item 5)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

import ckpt_tools
from ckpt_tools.migrate import MigrateOptions, execute_migrate, plan_migrate


def _plain(results_tree) -> tuple[Path, object]:
    root, manifest, _ = results_tree
    (e,) = [e for e in manifest.values() if e.path == "merged_hf/merged_model"]
    return root / e.path, e


def _judge(path: Path):
    (c,) = ckpt_tools.scan(str(path), min_age_s=0).checkpoints
    return c.status, c.model_kind, c.layout


def _mark(ckpt: Path, **fields) -> None:
    cfg_path = ckpt / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps(cfg | fields))


def test_an_unmarked_plain_model_directory_is_a_healthy_full_model(results_tree):
    path, _ = _plain(results_tree)
    assert _judge(path) == ("healthy", "full-model", "model")


@pytest.mark.parametrize("marker", [
    {"_dylora_original_type": "dylora-moe"},
    {"_dylora_num_experts": 1, "_dylora_lora_r": 4},
    {"checkpoint_type": "peft_only"},
])
def test_a_marked_plain_model_directory_is_a_legacy_dylora_export(results_tree, tmp_path, marker):
    path, _ = _plain(results_tree)
    ckpt = tmp_path / "merged_model"
    shutil.copytree(path, ckpt)
    _mark(ckpt, **marker)
    assert _judge(ckpt) == ("legacy", "dylora-moe", "hf-merged")


def test_a_best_model_is_a_dylora_export_only_beside_dylora_checkpoints(results_tree, tmp_path):
    root, manifest, _ = results_tree
    plain, _ = _plain(results_tree)
    dylora = next(e for e in manifest.values()
                  if e.layout == "canonical" and e.status == "healthy" and not e.flags)
    full = next(e for e in manifest.values() if e.layout == "model")

    beside_dylora = tmp_path / "dylora-run"
    shutil.copytree(root / dylora.path, beside_dylora / "checkpoint-100")
    shutil.copytree(plain, beside_dylora / "best_model")
    beside_full = tmp_path / "full-run"
    shutil.copytree(root / full.path, beside_full / "checkpoint-100")
    shutil.copytree(plain, beside_full / "best_model")

    assert _judge(beside_dylora / "best_model") == ("legacy", "dylora-moe", "hf-merged")
    assert _judge(beside_full / "best_model") == ("healthy", "full-model", "model")
    # the same directory under another name is judged by what it holds alone
    shutil.move(beside_dylora / "best_model", beside_dylora / "exported")
    assert _judge(beside_dylora / "exported") == ("healthy", "full-model", "model")


def test_a_migrated_target_is_complete_when_written(results_tree, tmp_path):
    root, manifest, _ = results_tree
    e = next(e for e in manifest.values() if e.layout == "v4" and e.status == "healthy" and not e.flags)
    src = tmp_path / "src" / "run"
    shutil.copytree(root / e.path, src / "checkpoint-1")
    dst = tmp_path / "dst"
    result = execute_migrate(plan_migrate(str(src.parent), str(dst), MigrateOptions(min_age_s=0)))
    assert [o.source for o in result.migrated] == ["run/checkpoint-1"]
    # judged at once, at the default --min-age: what it is, not in progress
    (c,) = ckpt_tools.scan(str(dst), now=time.time()).checkpoints
    assert (c.status, c.layout, c.fresh) == ("healthy", "canonical", True)
    assert not c.errors
