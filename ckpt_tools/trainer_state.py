"""The Trainer's own record of a run: ``trainer_state.json``, read once per run.

Every checkpoint of a Trainer run repeats the log history so far, so the newest one that parses
says everything: the eval metrics logged at each checkpoint's step (a checkpoint's step is in its
name, so no other file is opened), and ``best_model_checkpoint`` / ``best_metric``. The Trainer
records the best checkpoint as the path it had at training time; runs get moved and copied, so it
is found within the run by its last path component.

A trainer_state.json that is malformed or too large is the Trainer's file, not part of what a
checkpoint needs to load: it never makes its checkpoint broken here (``validate`` reports its JSON
at the full level). It is passed over for the next older one and reported as a warning on the run.
Torch-free: ``audit`` runs this.
"""

from __future__ import annotations

import math
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from . import checkpoint_reads
from .formats.safetensors_header import NotRegularFile
from .layout import TRAINER_STATE_JSON
from .problems import BAD_JSON, PERMISSION_DENIED, UNREADABLE, WARNING, Problem

if TYPE_CHECKING:
    from .records import Checkpoint, CheckpointDir
    from .storage.remote import ObjectStorage

# What the Trainer prefixes every metric of ``evaluate`` with (``metric_key_prefix="eval"``).
_EVAL_PREFIX = "eval_"


@dataclass(frozen=True)
class Evaluation:
    """The eval metrics logged at ``step`` (several eval sets log separately: merged)."""

    step: int
    metrics: tuple[tuple[str, float | None], ...]   # name → value; None where it was NaN or ±inf

    def as_dict(self) -> dict[str, float | None]:
        return dict(self.metrics)


@dataclass(frozen=True)
class TrainerState:
    """What ckpt-tools uses of one parsed trainer_state.json."""

    global_step: int
    best_model_checkpoint: str | None   # as the Trainer recorded it (a path of training time)
    best_metric: float | None
    best_global_step: int | None
    metric_for_best_model: str | None   # as recorded, else inferred (``_metric_named``)
    evaluations: tuple[Evaluation, ...]  # ascending steps, one per step

    @property
    def best_name(self) -> str | None:
        """The directory name of the best checkpoint: what survives a move or a copy."""
        if not self.best_model_checkpoint:
            return None
        name = posixpath.basename(self.best_model_checkpoint.replace("\\", "/").rstrip("/"))
        return name or None

    def evaluation_at(self, step: int | None) -> Evaluation | None:
        """The eval logged at ``step``, else the last one before it; None where the history
        does not reach ``step`` (a checkpoint newer than this state) or holds no eval before it."""
        if step is None or step > self.global_step:
            return None
        found = None
        for e in self.evaluations:
            if e.step > step:
                break
            found = e
        return found


def _number(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) else None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _evaluations(history: list) -> tuple[Evaluation, ...]:
    by_step: dict[int, dict[str, float | None]] = {}
    for entry in history:
        if not isinstance(entry, dict):
            continue
        step = _int(entry.get("step"))
        metrics = {k: _number(v) for k, v in entry.items()
                   if isinstance(k, str) and k.startswith(_EVAL_PREFIX)
                   and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if step is not None and metrics:
            by_step.setdefault(step, {}).update(metrics)
    return tuple(Evaluation(s, tuple(m.items())) for s, m in sorted(by_step.items()))


def _metric_named(doc: dict, best_metric: float | None, best_step: int | None,
                  evaluations: tuple[Evaluation, ...]) -> str | None:
    """``metric_for_best_model`` as recorded; transformers 5 does not record it, so else the one
    eval metric logged at the best step whose value is exactly ``best_metric`` (the Trainer
    copies it from those metrics), else None."""
    named = doc.get("metric_for_best_model")
    if isinstance(named, str):
        return named
    if best_metric is None or best_step is None:
        return None
    at = [e for e in evaluations if e.step == best_step]
    names = [k for k, v in at[0].metrics if v == best_metric] if at else []
    return names[0] if len(names) == 1 else None


def parse_trainer_state(raw: bytes) -> TrainerState | str:
    """The state in ``raw`` (a trainer_state.json's bytes, parsed as every JSON read is), or
    what is wrong with it."""
    if len(raw) > checkpoint_reads.MAX_JSON_BYTES:
        return f"larger than {checkpoint_reads.MAX_JSON_BYTES} bytes"
    doc = checkpoint_reads.parse_json(raw, None)
    if isinstance(doc, str):
        return doc
    global_step = _int(doc.get("global_step"))
    history = doc.get("log_history", [])
    best = doc.get("best_model_checkpoint")
    if global_step is None or global_step < 0:
        return "not a Trainer state: no global_step"
    if not isinstance(history, list):
        return "not a Trainer state: log_history is not a list"
    if best is not None and not isinstance(best, str):
        return "not a Trainer state: best_model_checkpoint is not a path"
    evaluations = _evaluations(history)
    best_metric = _number(doc.get("best_metric"))
    best_step = _int(doc.get("best_global_step"))
    return TrainerState(global_step, best or None, best_metric, best_step,
                        _metric_named(doc, best_metric, best_step, evaluations), evaluations)


@dataclass(frozen=True)
class RunTrainerState:
    """A run's trainer_state.json as ckpt-tools reads it: the newest that parses (``source``,
    relative to the root; None when no checkpoint has one), the best checkpoint found in the
    run by name (``best_checkpoint``, its path), and warnings on the ones passed over."""

    source: str | None = None
    state: TrainerState | None = None
    best_checkpoint: str | None = None
    problems: tuple[Problem, ...] = ()

    @property
    def best_missing(self) -> bool:
        """The state names a best checkpoint that is not in the run (rotated away, deleted)."""
        return self.state is not None and self.state.best_name is not None and self.best_checkpoint is None

    def annotated(self, ckpt: Checkpoint) -> Checkpoint:
        """``ckpt`` with whether it is the best of its run and the eval at (or before) its step."""
        if self.state is None:
            return ckpt
        best, evaluation = ckpt.path == self.best_checkpoint, self.state.evaluation_at(ckpt.step)
        if not best and evaluation is None and not ckpt.best_of_run and ckpt.evaluation is None:
            return ckpt   # nothing to add: no new record
        return replace(ckpt, best_of_run=best, evaluation=evaluation)

    def to_dict(self) -> dict:
        s = self.state
        return {
            "trainer_state": self.source,
            "global_step": None if s is None else s.global_step,
            "best_model_checkpoint": None if s is None else s.best_model_checkpoint,
            "best_checkpoint": self.best_checkpoint,
            "best_checkpoint_missing": self.best_missing,
            "best_metric": None if s is None else s.best_metric,
            "metric_for_best_model": None if s is None else s.metric_for_best_model,
            "problems": [p.to_dict() for p in self.problems],
        }


def _read(ckpt: Checkpoint, storage: ObjectStorage | None) -> TrainerState | Problem | None:
    return read_state(ckpt.dir, storage)


def names_its_step(d: CheckpointDir, storage: ObjectStorage | None = None) -> bool:
    """Whether the checkpoint's own trainer_state.json parses and says the step in its name:
    the Trainer writes that file last, so the checkpoint is complete."""
    state = read_state(d, storage) if d.step is not None else None
    return isinstance(state, TrainerState) and state.global_step == d.step


def read_state(d: CheckpointDir, storage: ObjectStorage | None = None
               ) -> TrainerState | Problem | None:
    """The state of the checkpoint's own trainer_state.json, a warning on it, or None when it has
    none that is a regular file (a symlink is not followed: it may lead out of the root).
    ``storage``: the object storage ``d`` was listed from; None for a local directory."""
    row = d.file(TRAINER_STATE_JSON)
    size = None if row is None else checkpoint_reads.regular_size(row)
    if size is None:
        return None
    rel = TRAINER_STATE_JSON if d.path == "." else f"{d.path}/{TRAINER_STATE_JSON}"
    try:
        base = d.abspath if storage is None else storage.path_of(d)
        raw = checkpoint_reads.read_json_bytes(os.path.join(base, TRAINER_STATE_JSON), size,
                                               storage)
    except NotRegularFile:
        return None
    except PermissionError as exc:
        return Problem(PERMISSION_DENIED, rel, f"cannot read the Trainer state: {exc.strerror}", WARNING)
    except OSError as exc:
        return Problem(UNREADABLE, rel, f"cannot read the Trainer state: {exc.strerror or exc}", WARNING)
    state = parse_trainer_state(raw)
    if isinstance(state, str):
        return Problem(BAD_JSON, rel, f"Trainer state passed over: {state}", WARNING)
    return state


def read_run_state(checkpoints: Sequence[Checkpoint], storage: ObjectStorage | None = None
                   ) -> RunTrainerState:
    """The trainer state of the run whose checkpoints are ``checkpoints``: the newest
    trainer_state.json that parses (highest step first; one file read in the usual case).
    ``storage`` as for ``read_state``."""
    problems: list[Problem] = []
    stepped = sorted((c for c in checkpoints if c.step is not None and not c.dir.tmp_name),
                     key=lambda c: c.step, reverse=True)
    for c in stepped:
        found = _read(c, storage)
        if isinstance(found, Problem):
            problems.append(found)
        elif found is not None:
            name = found.best_name
            best = next((b.path for b in checkpoints if name is not None and b.dir.name == name), None)
            source = TRAINER_STATE_JSON if c.path == "." else f"{c.path}/{TRAINER_STATE_JSON}"
            return RunTrainerState(source, found, best, tuple(problems))
    return RunTrainerState(problems=tuple(problems))
