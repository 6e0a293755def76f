"""The scanner: what counts as a checkpoint, symlinks, hard links, odd names."""

from __future__ import annotations

import json
import os
import shutil
import struct

import pytest

import ckpt_tools
from ckpt_tools import scanner
from ckpt_tools.scanner import ScanError


def _safetensors(path, tensors):
    header, off = {}, 0
    for name, shape in tensors.items():
        n = 4
        for d in shape:
            n *= d
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * off)


def test_missing_root_is_an_error(tmp_path):
    with pytest.raises(ScanError, match="no such"):
        scanner.find_checkpoints(str(tmp_path / "absent"))
    f = tmp_path / "file"
    f.write_text("x")
    with pytest.raises(ScanError, match="not a directory"):
        scanner.find_checkpoints(str(f))


def test_root_that_is_a_checkpoint(results_tree):
    root, manifest, now = results_tree
    path = next(p for p, e in manifest.items() if e.status == "healthy")
    result = ckpt_tools.scan(str(root / path), now=now)
    assert [c.path for c in result.checkpoints] == ["."]
    assert result.checkpoints[0].status == "healthy"


def test_output_dir_with_a_final_model_and_checkpoints(tmp_path):
    run = tmp_path / "run"
    _safetensors(run / "model.safetensors", {"lm_head.weight": (4, 4)})
    (run / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    _safetensors(run / "checkpoint-5" / "model.safetensors", {"lm_head.weight": (4, 4)})
    dirs, problems = scanner.find_checkpoints(str(tmp_path))
    assert sorted(d.path for d in dirs) == ["run", "run/checkpoint-5"]
    final = next(d for d in dirs if d.path == "run")
    assert {f.relpath for f in final.files} == {"model.safetensors", "config.json"}


def test_symlinks_are_recorded_never_followed(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "big.bin").write_bytes(b"x" * 10000)
    ck = root / "checkpoint-1"
    ck.mkdir(parents=True)
    os.symlink(outside, ck / "linked_dir")
    os.symlink(outside / "big.bin", ck / "model.safetensors")
    os.symlink(ck / "loop", ck / "loop")  # a loop
    (root / "elsewhere").symlink_to(outside)  # a directory symlink at run level
    dirs, problems = scanner.find_checkpoints(str(root))
    assert [d.path for d in dirs] == ["checkpoint-1"]
    files = {f.relpath: f for f in dirs[0].files}
    assert files["model.safetensors"].is_symlink and files["model.safetensors"].escapes_root
    assert files["linked_dir"].is_symlink and files["linked_dir"].escapes_root
    assert files["loop"].is_symlink and files["loop"].symlink_target is None
    assert all(f.size < 1000 for f in files.values())  # a symlink counts as its own size


def test_merged_symlink_out_of_root_is_a_warning_and_never_opened(tmp_path):
    root = tmp_path / "root"
    ck = root / "checkpoint-1"
    ck.mkdir(parents=True)
    outside = tmp_path / "secret.safetensors"
    outside.write_bytes(b"garbage that would be a bad-header")
    os.symlink(outside, ck / "model.safetensors")
    c = ckpt_tools.scan(str(root), now=10**10).checkpoints[0]
    codes = {(p.code, p.severity) for p in c.problems}
    assert ("symlink-escape", "warning") in codes
    assert "bad-header" not in {p.code for p in c.problems}


def test_spaces_and_non_ascii_names(results_tree, tmp_path):
    root, manifest, now = results_tree
    src = next(p for p, e in manifest.items() if e.status == "healthy" and e.run == "run canonical")
    dest = tmp_path / "rün with spaces" / "checkpoint-7 ünïcode"
    shutil.copytree(root / src, dest, symlinks=True)
    result = ckpt_tools.scan(str(tmp_path), now=now)
    assert [(c.path, c.status) for c in result.checkpoints] == [
        ("rün with spaces/checkpoint-7 ünïcode", "healthy")]


def test_unlistable_directory_is_a_problem_not_a_crash(tmp_path, private_unlistable):
    root = tmp_path / "root"
    (root / "run" / "private").mkdir(parents=True)
    dirs, problems = scanner.find_checkpoints(str(root))
    assert dirs == []
    assert [(p.code, p.path) for p in problems] == [("permission-denied", "run/private")]


def test_hard_link_counted_once(tmp_path):
    root = tmp_path / "root"
    _safetensors(root / "a" / "checkpoint-1" / "model.safetensors", {"w": (256, 256)})
    (root / "a" / "checkpoint-2").mkdir()
    os.link(root / "a" / "checkpoint-1" / "model.safetensors", root / "a" / "checkpoint-2" / "model.safetensors")
    result = ckpt_tools.scan(str(root), now=10**10)
    one = result.checkpoints[0].size_bytes
    assert result.checkpoints[1].size_bytes == one
    assert result.size_bytes == one
