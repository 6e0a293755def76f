"""A checkpoint whose training state ckpt-tools stripped (``prune --strip``): judged by what it
holds, and a strip that did not finish said so.

Applied after the examination (and its replay): the marker is ckpt-tools' bookkeeping, outside
the replay's signature, like the checkpoint's name and age.
"""

from __future__ import annotations

from .. import layout
from ..problems import MISSING_FILE, STRIP_INTERRUPTED, WARNING
from ..retention.strip_marker import read_marker
from .context import _Ctx


def judge_strip_marker(ctx: _Ctx) -> None:
    """Where the checkpoint holds a strip marker: the engine state the strip removes (DeepSpeed's
    global_step*/ that ``latest`` still names) is expected to be gone, so its absence is no
    problem; a marker that does not say ``stripped`` is a ``strip-interrupted`` warning."""
    rec = ctx.by_path.get(layout.STRIP_MARKER)
    if rec is None:
        return
    keep = [i for i, (code, rel, _, _) in enumerate(ctx.raw)
            if not (code == MISSING_FILE and layout.is_resume_only(rel))]
    if len(keep) != len(ctx.raw):
        ctx.raw = [ctx.raw[i] for i in keep]
        ctx.problems = [ctx.problems[i] for i in keep]
    if rec.is_symlink or not rec.is_regular:
        said = "it is not a regular file"
    else:
        try:
            marker = read_marker(ctx.abspath(layout.STRIP_MARKER), rec.size, ctx.storage)
        except OSError as exc:
            marker = f"cannot read it: {exc.strerror or exc}"
        if not isinstance(marker, str) and marker.finished_strip:
            return
        said = marker if isinstance(marker, str) else "it says the strip was still removing files"
    ctx.add(STRIP_INTERRUPTED, layout.STRIP_MARKER,
            f"a strip of the training state did not finish ({said}); the next prune that strips "
            "this checkpoint finishes it, and until then it cannot be resumed", WARNING)
