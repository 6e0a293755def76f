"""Render records and plans for people (tables) and machines (JSON). Decides nothing."""

from __future__ import annotations

import json
import os

from .names import json_text, shown, shown_lines
from .records import BROKEN, IN_PROGRESS, LEGACY, PEFT_ONLY, REDUNDANT, STATUSES, ScanResult


def size_str(n: int) -> str:
    import humanize  # only tables need it: not imported for --json
    return humanize.naturalsize(n)


def _refuse(value):
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


try:
    from json.encoder import c_make_encoder as _c_make_encoder
except ImportError:  # another Python: the json module's own way
    _c_make_encoder = None
if _c_make_encoder is not None:
    # json.dumps(value, ensure_ascii=False) without building an encoder for every value
    _c_encoder = _c_make_encoder({}, _refuse, json.encoder.encode_basestring, None, ": ", ", ",
                                 False, False, True)

    def _encode(value) -> str:
        return "".join(_c_encoder(value, 0))
else:
    def _encode(value) -> str:
        return json.dumps(value, ensure_ascii=False)


def dumps(doc) -> str:
    """A JSON document with one top-level key, and one list item, per line.

    Readable and grep-able, and written by the C encoder (``indent`` would force the slow
    pure-Python one, which costs seconds on an audit of tens of thousands of checkpoints).
    Always valid UTF-8 once encoded: a name that is not UTF-8 is written as ``json_safe``
    says (U+FFFD, and its bytes in a ``<field>_bytes_b64`` field); see ``names.json_text``.
    """
    return json_text(_layout, doc)


def _layout(doc) -> str:
    if not isinstance(doc, dict):
        return _encode(doc)
    parts = []
    for key, value in doc.items():
        k = _encode(key)
        if isinstance(value, list) and value:
            items = ",\n    ".join(map(_encode, value))
            parts.append(f"  {k}: [\n    {items}\n  ]")
        else:
            parts.append(f"  {k}: {_encode(value)}")
    return "{\n" + ",\n".join(parts) + "\n}" if parts else "{}"


def _table(rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for row in rows:
        cells = [c.rjust(widths[i]) if i in right else c.ljust(widths[i]) for i, c in enumerate(row)]
        out.append("  " + "  ".join(cells).rstrip())
    return out


def _run_title(root: str, run: str, multi_root: bool) -> str:
    title = run if run != "." else os.path.basename(os.path.abspath(root)) or root
    if multi_root:
        title = f"{root.rstrip('/')}/{run}" if run != "." else root
    return title


def render_audit(result: ScanResult, *, verbose: bool = False, quiet: bool = False) -> str:
    lines: list[str] = []
    multi_root = len(result.roots) > 1
    if not quiet:
        for run in result.runs:
            n = len(run.checkpoints)
            lines.append(f"{_run_title(run.root, run.path, multi_root)}  "
                         f"({n} checkpoint{'s' if n != 1 else ''}, {size_str(run.size_bytes)})")
            rows = [["CHECKPOINT", "STEP", "STATUS", "LAYOUT", "SIZE", "RECLAIMABLE", "PROBLEMS"]]
            for c in run.checkpoints:
                name = c.path if c.run == "." else os.path.relpath(c.path, c.run) if c.path != "." else "."
                name = shown(name)   # before the widths are measured: the table stays aligned
                errors = [p for p in c.problems if p.is_error]
                warnings = [p for p in c.problems if not p.is_error]
                probs = ", ".join(sorted({p.code for p in errors}))
                if warnings and (verbose or not errors):
                    probs = (probs + "; " if probs else "") + \
                        ", ".join(sorted({p.code for p in warnings})) + " (warning)"
                rows.append([name, "" if c.step is None else str(c.step), c.status, c.layout,
                             size_str(c.size_bytes),
                             size_str(c.reclaimable_bytes) if c.reclaimable_bytes else "-",
                             probs or "-"])
            lines.extend(_table(rows, right={1, 4, 5}))
            details = [(c, p) for c in run.checkpoints for p in c.problems
                       if p.is_error or verbose]
            for c, p in details:
                lines.append("    " + p.line())
            lines.append("")
        for p in result.problems:
            lines.append(p.line())
        if result.problems:
            lines.append("")
    lines.append(footer(result))
    return shown_lines(lines)


def footer(result: ScanResult) -> str:
    counts = result.by_status()
    n = len(result.checkpoints)
    runs = len(result.runs)
    parts = [f"{n} checkpoint{'s' if n != 1 else ''} in {runs} run{'s' if runs != 1 else ''}",
             f"{size_str(result.size_bytes)} on disk",
             f"{size_str(result.reclaimable_bytes)} reclaimable by prune"]
    for status, label in ((BROKEN, "broken"), (LEGACY, "legacy"), (REDUNDANT, "redundant"),
                          (IN_PROGRESS, "in progress")):
        if counts[status]:
            parts.append(f"{counts[status]} {label}")
    return ", ".join(parts)


def render_validate(result: ScanResult, *, verbose: bool = False, quiet: bool = False) -> str:
    lines = []

    def full(root: str, rel: str) -> str:
        return root if rel == "." else os.path.join(root, rel)

    for c in result.checkpoints:
        where = full(c.dir.root, c.path)
        errors = sum(1 for p in c.problems if p.is_error)
        warns = len(c.problems) - errors
        head = f"{where}: {c.status} ({c.layout})"
        if errors or warns:
            head += f", {errors} error{'s' if errors != 1 else ''}"
            if warns:
                head += f", {warns} warning{'s' if warns != 1 else ''}"
        if not quiet or errors:
            lines.append(head)
        for p in c.problems:
            if p.is_error or verbose or not quiet:
                lines.append("  " + p.line(full(c.dir.root, p.path)))
        hashes = c.facts.get("hashes") if verbose else None
        if hashes:
            for rel, digest in sorted(hashes.items()):
                lines.append(f"  sha256 {digest}  {rel}")
    for p in result.problems:
        lines.append(p.line())
    return shown_lines(lines)


def validate_doc(result: ScanResult) -> dict:
    out = []
    for c in result.checkpoints:
        d = c.to_dict()
        d["valid"] = not c.errors
        d["num_experts"] = c.num_experts
        if "hashes" in c.facts:
            d["hashes"] = c.facts["hashes"]
        out.append(d)
    return {"checkpoints": out, "valid": all(not c.errors for c in result.checkpoints)
            and not any(p.is_error for p in result.problems),
            "problems": [p.to_dict() for p in result.problems]}


__all__ = ["render_audit", "render_validate", "footer", "size_str", "dumps", "validate_doc",
           "STATUSES", "PEFT_ONLY"]
