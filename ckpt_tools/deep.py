"""Deep validation (``validate --deep``): read every tensor and hash every file.

The only validator code that imports torch, and only when deep mode is asked for.
"""

from __future__ import annotations

import hashlib

from . import layout
from .layout import Role
from .problems import NAN_OR_INF, WARNING

_CHUNK = 8 * 1024 * 1024
_TENSOR_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def _sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _iter_tensors(path: str):
    import torch
    if path.endswith(".safetensors"):
        from safetensors import safe_open
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
        return
    obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    stack = [("", obj)]
    while stack:
        prefix, value = stack.pop()
        if isinstance(value, torch.Tensor):
            yield prefix, value
        elif isinstance(value, dict):
            stack.extend((f"{prefix}.{k}" if prefix else str(k), v) for k, v in value.items())
        elif isinstance(value, (list, tuple)):
            stack.extend((f"{prefix}.{i}" if prefix else str(i), v) for i, v in enumerate(value))


def deep_check(ctx) -> dict[str, str]:
    """NaN/Inf problems for every tensor file that passed the structural checks; hashes of all."""
    from .tensor_io import non_finite
    hashes: dict[str, str] = {}
    flagged = {p.path for p in ctx.problems}
    for rec in ctx.ckpt.files:
        rel = rec.relpath
        if rec.is_symlink and (rec.escapes_root or rec.symlink_target is None):
            continue
        if ctx.rel(rel) in flagged:
            continue
        path = ctx.abspath(rel)
        try:
            hashes[rel] = _sha256(path)
        except OSError as exc:
            ctx.os_problem(rel, exc)
            continue
        role = ctx.roles[rel].role
        if layout.never_unpickle(rec.name) or not rel.endswith(_TENSOR_SUFFIXES):
            continue
        bad: list[str] = []
        try:
            for name, t in _iter_tensors(path):
                bad += non_finite({name: t})
        except Exception as exc:  # noqa: BLE001 - a file torch cannot read is a problem, not a crash
            ctx.add("unreadable", rel, f"torch cannot read it: {str(exc).splitlines()[0][:200]}")
            continue
        if bad:
            in_tree = ctx.roles[rel].in_peft_tree or role in (Role.MERGED,)
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            ctx.add(NAN_OR_INF, rel, f"NaN or Inf in {shown}",
                    "error" if in_tree else WARNING)
    return hashes
