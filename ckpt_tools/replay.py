"""Replaying a whole examination: a checkpoint judged from an earlier one's findings.

**The invariant.** At level ``headers`` the validator's examination of a checkpoint
(``validator.examine._examine``) is a pure function of

1. its signature: the level, the set of relpaths (``_Shape``: every role and form derived from
   them), the entries it could not list (``ckpt.unreadable``), and per symlink its relpath,
   whether it escapes the root and its resolved target; and
2. the value of each read it makes, in order: a parsed JSON object, a parsed safetensors
   header, a torch.save inspection (by its ``checkpoint_reads.torch_token``).

Which files it reads, and in which order, depends only on (1) and on the values of the reads
before (never on what a successful read cost or where it came from), and every read that fails
ends the recording (a failure is a problem whose wording depends on the error). So the first
examination of a signature records its reads as a ``ReplayRecipe``; a later checkpoint with
that signature performs the very same reads, every one of them, afresh from its own files, and
when each returns an object identical (``is``) to the one an examination recorded (the readers
share, through the ``ReadCache``, the objects they parse from identical bytes) it takes that
examination's findings and problems. A read that fails or returns an object no examination saw
means a full examination. What is outside the signature and the reads (the checkpoint's name:
its step, whether it is ``best_model``; its age) is applied by the caller after the replay.

A reader's result stands for its file's bytes only as far as the reader itself is exact about
which bytes decide it: ``formats.torchsave`` memoises whole small archives by every byte but
the ranges it proves unread, so a new byte range read by the torch.save reader must be outside
those ranges, part of what the memo (and so the replay) compares, or two archives differing
only there share a verdict. The invariant is stated where the ranges are decided
(``formats/torchsave/zip_archive.py``, ``_unread_ranges``);
tests/test_read_cache_differential.py mutates sibling checkpoints to catch a breach.
"""

from __future__ import annotations

from . import checkpoint_reads as reads
from .problems import FormatError
from .read_cache import ReadCache, bounded_put

_MAX_FINDINGS_PER_RECIPE = 64


class ReplayRecipe:
    """The reads one signature's examinations make, and what each distinct outcome found."""

    __slots__ = ("reads", "steps", "found")

    def __init__(self, recorded: tuple, position: dict[str, int]):
        self.reads = recorded                    # ((kind, relpath, arg), ...)
        # the same reads ready to run: (reader, relpath, index of its FileRecord row, arg)
        self.steps = tuple((_QUIET_READERS[kind], rel, position.get(rel), arg)
                           for kind, rel, arg in recorded)
        self.found: dict[tuple, tuple] = {}      # ids of the reads' values → (values, findings, problems)


def signature(ctx) -> tuple:
    """What, besides its reads, an examination at level ``headers`` depends on."""
    links = tuple((r[reads.ROW_RELPATH], r[reads.ROW_ESCAPES_ROOT], r[reads.ROW_SYMLINK_TARGET])
                  for r in ctx.rows if r[reads.ROW_IS_SYMLINK])
    return (ctx.level, ctx.shape, ctx.ckpt.unreadable, links)


def remember(ctx, cache: ReadCache, trace: list, findings, problems: tuple) -> None:
    """Record an examination that read ``trace`` ((kind, relpath, arg, value), ...) and
    found ``findings`` and ``problems`` ((code, relpath, message, severity), ...)."""
    recorded = tuple((kind, rel, arg) for kind, rel, arg, _ in trace)
    values = [v for _, _, _, v in trace]
    sig = signature(ctx)
    recipe = cache.recipes.get(sig)
    if recipe is None or recipe.reads != recorded:
        recipe = ReplayRecipe(recorded, ctx.shape.position)
        bounded_put(cache.recipes, sig, recipe)
    if len(recipe.found) >= _MAX_FINDINGS_PER_RECIPE:
        recipe.found.clear()
    recipe.found[tuple(map(id, values))] = (values, findings, problems)


def replay(ctx, cache: ReadCache):
    """(findings, problems) of an earlier examination whose reads this checkpoint's own
    reads return identically, else None."""
    recipe = cache.recipes.get(signature(ctx))
    if recipe is None:
        return None
    rows = ctx.rows  # the signature holds the shape: the rows are where the recipe says
    values: list = []  # alive until the lookup: no id of theirs can be another object's
    append = values.append
    for read, rel, at, arg in recipe.steps:
        size = None if at is None else reads.regular_size(rows[at])
        value = read(ctx.abspath(rel), rel, size, arg, cache, ctx.storage)
        if value is None:
            return None
        append(value)
    hit = recipe.found.get(tuple(map(id, values)))
    if hit is None:
        return None
    return hit[1], hit[2]


# What each reader of the validator records for a file; None where it would find a problem.

def _quiet_json(path: str, rel: str, size: int | None, _, cache: ReadCache, storage):
    try:
        raw = reads.read_json_bytes(path, size, storage)
    except OSError:
        return None
    if len(raw) > reads.MAX_JSON_BYTES:
        return None
    value = reads.parse_json(raw, cache)
    return None if isinstance(value, str) else value


def _quiet_safetensors(path: str, rel: str, size: int | None, _, cache: ReadCache, storage):
    try:
        return reads.read_header(path, rel, size, cache, storage)
    except (FormatError, OSError):
        return None


def _quiet_torch(path: str, rel: str, size: int | None, check_pickle, cache: ReadCache,
                 storage):
    try:
        return reads.torch_token(reads.inspect_torch(path, check_pickle, size, cache, storage),
                                 cache)
    except (FormatError, OSError):
        return None


_QUIET_READERS = {"json": _quiet_json, "st": _quiet_safetensors, "torch": _quiet_torch}
