"""Deep validation (``validate --deep``): read every tensor and hash every file.

The only validator code that imports torch, and only when deep mode is asked for.
"""

from __future__ import annotations

import hashlib
import os
import stat

from . import layout
from .formats import safetensors_header as st
from .layout import Role
from .problems import NAN_OR_INF, WARNING

_CHUNK = 8 * 1024 * 1024
_TENSOR_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


def _sha256(fd: int) -> str:
    h = hashlib.sha256()
    offset = 0
    while chunk := st.pread_full(fd, _CHUNK, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _held_path(fd: int, path: str) -> str:
    """A name for the file open at ``fd`` for readers that take a path (torch, safetensors):
    where /proc/self/fd exists it opens that very file, so nothing that took ``path``'s
    place since it was checked can be read instead."""
    held = f"/proc/self/fd/{fd}"
    return held if os.path.exists(held) else path


def _iter_tensors(path: str, relpath: str):
    import torch
    if relpath.endswith(".safetensors"):
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
    hashes: dict[str, str] = {}
    flagged = {p.path for p in ctx.problems}
    for rec in ctx.ckpt.files:
        rel = rec.relpath
        if rec.is_symlink and (rec.escapes_root or rec.symlink_target is None):
            continue
        if ctx.rel(rel) in flagged:
            continue
        try:
            # a FIFO, socket or device is refused unopened (reading it blocks or never ends)
            fd, _ = st.open_regular(ctx.abspath(rel))
        except st.NotRegularFile as exc:
            if not (rec.is_symlink and stat.S_ISDIR(exc.mode)):  # a directory link: no file
                ctx.os_problem(rel, exc)
            continue
        except OSError as exc:
            ctx.os_problem(rel, exc)
            continue
        try:
            bad = _check_file(ctx, rel, rec, fd, hashes)
        finally:
            os.close(fd)
        if bad:
            role = ctx.roles[rel].role
            in_tree = ctx.roles[rel].in_peft_tree or role in (Role.MERGED,)
            shown = ", ".join(bad[:3]) + (f" and {len(bad) - 3} more" if len(bad) > 3 else "")
            ctx.add(NAN_OR_INF, rel, f"NaN or Inf in {shown}",
                    "error" if in_tree else WARNING)
    return hashes


def _check_file(ctx, rel: str, rec, fd: int, hashes: dict[str, str]) -> list[str]:
    """Hash the file open at ``fd`` into ``hashes``; the names of its tensors that hold NaN or
    Inf (none when it is no tensor file, or one torch cannot read: then a problem)."""
    from .tensor_io import non_finite
    try:
        hashes[rel] = _sha256(fd)
    except OSError as exc:
        ctx.os_problem(rel, exc)
        return []
    if layout.never_unpickle(rec.name) or not rel.endswith(_TENSOR_SUFFIXES):
        return []
    bad: list[str] = []
    try:
        for name, t in _iter_tensors(_held_path(fd, ctx.abspath(rel)), rel):
            bad += non_finite({name: t})
    except Exception as exc:  # noqa: BLE001 - a file torch cannot read is a problem, not a crash
        ctx.add("unreadable", rel, f"torch cannot read it: {str(exc).splitlines()[0][:200]}")
        return []
    return bad
