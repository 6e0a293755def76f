"""Which checkpoints of a run a retention policy keeps whole, strips or deletes, and why.

Pure functions over the records of a scan: nothing here touches storage. The rules combine as a
union, like restic's ``forget`` and Orbax: a checkpoint that any rule keeps is kept, and every
rule that keeps it is named with its rank (``last #1``, ``best eval_loss #1 (4.88)``). What the
rules rank (``keep_last``, ``keep_best``, and the reference time of ``keep_within``) are the
*complete* checkpoints of the run, healthy or redundant (and in a Trainer run holding the
trainer_state.json the Trainer writes last): broken, legacy and in-progress ones are
pinned anyway, and counting them would let ``--keep-last 2`` keep one usable checkpoint where
the newest save is still being written.

Pins keep a checkpoint whole whatever the rules say: the newest complete checkpoint (a run is
never left without one), the run's best_model_checkpoint, anything in progress, broken, legacy,
fresh (younger than the minimum age), linked into by another checkpoint, or pinned by the user.

Checkpoints without a step (``save_model`` outputs such as ``final/`` or ``best_model/``) are
never subject to retention: ``decide`` leaves them out, so nothing downstream can act on them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from .. import layout
from ..errors import UsageError, Wording
from ..kinds import RetentionAction, Status
from ..records import Checkpoint, Run
from .decision import (NOT_KEPT, PINNED_BEST, PINNED_BROKEN, PINNED_FRESH, PINNED_IN_PROGRESS,
                       PINNED_LEGACY, PINNED_LINKED, PINNED_NEWEST, PINNED_USER, Decision)

DEFAULT_METRIC = "eval_loss"

# What a policy may do with what one of its tiers keeps, and with what no tier keeps.
TIER_ACTIONS = (RetentionAction.KEEP, RetentionAction.STRIP)
REST_ACTIONS = (RetentionAction.STRIP, RetentionAction.DELETE)

# The statuses the rules rank: complete checkpoints a policy may act on.
_COMPLETE = (Status.HEALTHY, Status.REDUNDANT)
# Pinned by status, with their reason.
_STATUS_PINS = {Status.IN_PROGRESS: PINNED_IN_PROGRESS, Status.BROKEN: PINNED_BROKEN,
                Status.LEGACY: PINNED_LEGACY}


class RetentionUsageError(UsageError):
    """A retention policy that cannot be applied as given (exit 2): one line saying why."""


@dataclass(frozen=True)
class Rules:
    """What one tier of a policy keeps. Counts of 0 and ``None`` are rules not asked for.

    ``keep_best`` ranks by ``metric`` as logged in trainer_state.json at the checkpoint's own
    step (lower is better unless ``higher_is_better``); a checkpoint whose step has no eval of
    the metric is kept while ``keep_without_metric`` holds (reason ``no eval_loss: kept``). A
    metric that was logged as NaN or infinity ranks after every finite value and is no reason to
    keep. ``keep_within`` is seconds back from the newest file of the run's newest complete
    checkpoint (restic's ``--keep-within``), so a run that stopped a year ago keeps its last days
    and not nothing. ``keep_steps`` are the user's pins (``--keep-step``): kept whole by any tier.
    """

    keep_last: int = 0
    keep_best: int = 0
    metric: str = DEFAULT_METRIC
    higher_is_better: bool = False
    keep_without_metric: bool = True
    keep_every: int | None = None
    keep_within: float | None = None
    keep_steps: frozenset[int] = field(default_factory=frozenset)

    def __post_init__(self):
        object.__setattr__(self, "keep_steps", frozenset(self.keep_steps))
        for name in ("keep_last", "keep_best"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise RetentionUsageError(f"{name}: {value!r} is not a count (0 or more)")
        if self.keep_every is not None and (isinstance(self.keep_every, bool)
                                            or not isinstance(self.keep_every, int)
                                            or self.keep_every < 1):
            raise RetentionUsageError(f"keep_every: {self.keep_every!r} is not a number of steps "
                                      "(1 or more)")
        if self.keep_within is not None and not 0 <= self.keep_within < float("inf"):
            raise RetentionUsageError(f"keep_within: {self.keep_within!r} is not a duration")
        if not isinstance(self.metric, str) or not self.metric:
            raise RetentionUsageError(f"metric: {self.metric!r} is not a metric name")
        if any(isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in self.keep_steps):
            raise RetentionUsageError("keep_steps: every pinned step must be a step number (0 or more)")

    @property
    def keeps_anything(self) -> bool:
        """Whether a rule is asked for (pins alone are not rules: they keep, they decide nothing)."""
        return bool(self.keep_last or self.keep_best or self.keep_every or self.keep_within is not None)


@dataclass(frozen=True)
class Tier:
    """What ``rules`` keep gets ``action``: kept whole (KEEP) or stripped of its training state."""

    rules: Rules
    action: RetentionAction = RetentionAction.KEEP

    def __post_init__(self):
        action = _action(self.action, TIER_ACTIONS, "a tier's action")
        object.__setattr__(self, "action", action)
        if not self.rules.keeps_anything:
            raise RetentionUsageError(f"a tier that would {action} has no rule: give keep_last, "
                                      "keep_best, keep_every or keep_within")


@dataclass(frozen=True)
class Policy:
    """Tiers in order, and what no tier keeps gets: ``rest`` (strip or delete).

    The first tier whose rules keep a checkpoint decides its action; pins are kept whole. The
    command line's flags make one tier: what ``--keep-*`` keep stays whole, the rest gets
    ``--strip`` or ``--delete`` (``from_flags``)."""

    tiers: tuple[Tier, ...]
    rest: RetentionAction

    def __post_init__(self):
        object.__setattr__(self, "tiers", tuple(self.tiers))
        object.__setattr__(self, "rest", _action(self.rest, REST_ACTIONS, "what no rule keeps"))
        if not self.tiers:
            raise RetentionUsageError(_needs_a_rule(self.rest))

    @classmethod
    def from_flags(cls, rules: Rules, action: RetentionAction | str | None) -> Policy | None:
        """The policy of ``prune --keep-* --strip|--delete``; None where neither a rule nor an
        action is given (prune does what it did before retention). A rule without an action, an
        action without a rule, or ``--keep-step`` alone is a usage error."""
        if action is None:
            if rules.keeps_anything:
                raise RetentionUsageError(Wording("a {keep_*} rule needs an action for the rest: "
                                                  "give {strip} or {delete}"))
            if rules.keep_steps:
                raise RetentionUsageError(Wording(
                    "{keep_steps} pins checkpoints against a retention policy: give a {keep_*} "
                    "rule and {strip} or {delete}"))
            return None
        if not rules.keeps_anything:
            raise RetentionUsageError(_needs_a_rule(RetentionAction(action)))
        return cls((Tier(rules, RetentionAction.KEEP),), action)

    @property
    def pinned_steps(self) -> frozenset[int]:
        return frozenset().union(*(t.rules.keep_steps for t in self.tiers))


def _needs_a_rule(action: RetentionAction) -> Wording:
    """What no rule keeps would be stripped or deleted, but there is no rule."""
    return Wording("{%s} needs a rule: give {keep_last}, {keep_best}, {keep_every} or "
                   "{keep_within}" % action)


def _action(value, allowed: Sequence[RetentionAction], what: str) -> RetentionAction:
    try:
        action = RetentionAction(value)
    except ValueError:
        action = None
    if action not in allowed:
        names = " or ".join(str(a) for a in allowed)
        raise RetentionUsageError(f"{what} must be {names}, not {value!r}")
    return action


# --- links between checkpoints --------------------------------------------------------------

@dataclass(frozen=True)
class LinkIndex:
    """Which checkpoints another checkpoint links into: a file of it shares an inode with a file
    of another checkpoint (a hard link), or a symbolic link of another checkpoint leads into it.
    Built once per scan (``link_index``) from the files with more than one link and the
    symlinks, so its cost is that of the links, not of the tree."""

    linked_checkpoints: frozenset[tuple[str, str]]   # (root, path) of each checkpoint linked into

    def linked(self, ckpt: Checkpoint) -> bool:
        return (ckpt.dir.root, ckpt.dir.path) in self.linked_checkpoints


def link_index(checkpoints: Iterable[Checkpoint]) -> LinkIndex:
    """The links among ``checkpoints`` (a whole scan's: ``ScanResult.checkpoints``)."""
    checkpoints = list(checkpoints)
    first_holder: dict[tuple[int, int], tuple[str, str]] = {}   # (dev, ino) → (root, path)
    linked: set[tuple[str, str]] = set()
    symlinks: list[tuple[tuple[str, str], str]] = []
    for c in checkpoints:
        me = (c.dir.root, c.dir.path)
        for f in c.dir.files:
            if f.is_symlink:
                if f.symlink_target is not None:
                    symlinks.append((me, f.symlink_target))
            elif f.nlink > 1:
                held = first_holder.setdefault((f.dev, f.ino), me)
                if held != me:
                    linked.update((held, me))
    if symlinks:
        linked |= _symlink_targets(checkpoints, symlinks)
    return LinkIndex(frozenset(linked))


def _symlink_targets(checkpoints: list[Checkpoint],
                     symlinks: list[tuple[tuple[str, str], str]]) -> set[tuple[str, str]]:
    """The checkpoints (root, path) that a symlink of another checkpoint leads into. The scanner
    records a symlink's target resolved (``realpath``), so each root is resolved here too, once
    (the only look at storage in this module, and only where the scan found symlinks)."""
    real_roots = {root: os.path.realpath(root) for root in {c.dir.root for c in checkpoints}}
    by_real = {os.path.normpath(os.path.join(real_roots[c.dir.root], c.dir.path)):
               (c.dir.root, c.dir.path) for c in checkpoints}
    found = set()
    for source, target in symlinks:
        here = os.path.normpath(target)
        while True:
            owner = by_real.get(here)
            if owner is not None:
                if owner != source:
                    found.add(owner)
                break
            parent = os.path.dirname(here)
            if parent == here:
                break
            here = parent
    return found


# --- the decision ---------------------------------------------------------------------------

def decide(run: Run, policy: Policy, *, now: float, min_age_s: float,
           links: LinkIndex | None = None) -> tuple[Decision, ...]:
    """One Decision per checkpoint of ``run`` that has a step, in numeric step order.

    ``now`` and ``min_age_s`` pin what a file younger than the minimum age is in (beside what
    the scan judged fresh: a plan is never wider than either). ``links`` is the scan's
    ``link_index``; without it only links within this run are seen."""
    stepped = sorted((c for c in run.checkpoints if c.step is not None), key=lambda c: (c.step, c.path))
    if not stepped:
        return ()
    links = link_index(run.checkpoints) if links is None else links
    complete = _complete(stepped)
    tier_reasons = [_kept_by(t.rules, stepped, complete) for t in policy.tiers]
    pins = _pins(run, stepped, complete, policy, links, now, min_age_s)
    decisions = []
    for c in stepped:
        reasons: list[str] = []
        action = None
        for tier, kept in zip(policy.tiers, tier_reasons):
            mine = kept.get(c.path)
            if mine:
                reasons += [r for r in mine if r not in reasons]
                action = action or tier.action
        pinned = pins.get(c.path, ())
        if pinned:
            reasons += pinned
            action = RetentionAction.KEEP
        if action is None:
            action, reasons = policy.rest, [NOT_KEPT]
        decisions.append(Decision(root=run.root, run=run.path, path=c.path, action=action,
                                  reasons=tuple(reasons)))
    return tuple(decisions)


def _complete(stepped: list[Checkpoint]) -> list[Checkpoint]:
    """The complete checkpoints of a run: healthy or redundant and, in a run of the Trainer
    (one of its checkpoints holds trainer_state.json), holding the trainer_state.json the
    Trainer writes last. Without it a checkpoint may be a save still being written even where
    --min-age 0 judges it by content: it must not count as the run's newest complete one."""
    trainer_run = any(c.dir.file(layout.TRAINER_STATE_JSON) is not None for c in stepped)
    return [c for c in stepped if c.status in _COMPLETE
            and (not trainer_run or c.dir.file(layout.TRAINER_STATE_JSON) is not None)]


def _kept_by(rules: Rules, stepped: list[Checkpoint],
             complete: list[Checkpoint]) -> dict[str, list[str]]:
    """path → the reasons ``rules`` keep it for, in the order of the rules."""
    kept: dict[str, list[str]] = {}

    def keep(c: Checkpoint, reason: str) -> None:
        kept.setdefault(c.path, []).append(reason)

    for rank, c in enumerate(reversed(complete[-rules.keep_last:] if rules.keep_last else []), 1):
        keep(c, f"last #{rank}")
    if rules.keep_best:
        _keep_best(rules, stepped, complete, keep)
    if rules.keep_every:
        for c in stepped:
            if c.step % rules.keep_every == 0:
                keep(c, f"every {rules.keep_every}")
    if rules.keep_within is not None and complete:
        newest_ns = max(c.dir.newest_mtime_ns for c in complete)
        oldest_kept_ns = newest_ns - rules.keep_within * 1e9
        shown = f"within {format_duration(rules.keep_within)}"
        for c in stepped:
            if c.dir.newest_mtime_ns >= oldest_kept_ns:
                keep(c, shown)
    return kept


def _keep_best(rules: Rules, stepped: list[Checkpoint], complete: list[Checkpoint], keep) -> None:
    metric = rules.metric
    scored: list[tuple[float, int, Checkpoint]] = []
    for c in complete:
        found, value = _metric_at(c, metric)
        if found and value is not None:
            scored.append((-value if rules.higher_is_better else value, c.step, c))
    # Ties go to the earlier step, as the Trainer's best_model_checkpoint does (strictly better only).
    scored.sort(key=lambda s: (s[0], s[1]))
    best = {c.path: (rank, c) for rank, (_, _, c) in enumerate(scored[:rules.keep_best], 1)}
    for c in stepped:
        if c.path in best:
            rank, _ = best[c.path]
            keep(c, f"best {metric} #{rank} ({_metric_at(c, metric)[1]:.4g})")
        elif rules.keep_without_metric and not _metric_at(c, metric)[0]:
            keep(c, f"no {metric}: kept")


def _metric_at(c: Checkpoint, metric: str) -> tuple[bool, float | None]:
    """(whether ``metric`` was logged at the checkpoint's own step, its value or None where it
    was not finite). An eval logged before the step judged other weights: it does not count."""
    e = c.evaluation
    if e is None or e.step != c.step:
        return False, None
    metrics = e.as_dict()
    return (metric in metrics), metrics.get(metric)


def _pins(run: Run, stepped: list[Checkpoint], complete: list[Checkpoint], policy: Policy,
          links: LinkIndex, now: float, min_age_s: float) -> dict[str, list[str]]:
    """path → why it is pinned, in the order of decision.py's pins."""
    newest = complete[-1].path if complete else None
    complete_paths = {c.path for c in complete}
    best = run.trainer.best_checkpoint if run.trainer is not None else None
    user_steps = policy.pinned_steps
    young_ns = (now - min_age_s) * 1e9
    pins: dict[str, list[str]] = {}
    for c in stepped:
        why = []
        if c.path == newest:
            why.append(PINNED_NEWEST)
        if c.path == best or c.best_of_run:
            why.append(PINNED_BEST)
        if c.status in _STATUS_PINS:
            why.append(_STATUS_PINS[c.status])
        elif c.status in _COMPLETE and c.path not in complete_paths:
            why.append(PINNED_IN_PROGRESS)   # a Trainer save without its trainer_state.json yet
        if links.linked(c):
            why.append(PINNED_LINKED)
        if c.step in user_steps or c.dir.file(layout.KEEP_FILE) is not None:
            why.append(PINNED_USER)
        if c.status is not Status.IN_PROGRESS and (c.fresh or c.dir.newest_mtime_ns > young_ns):
            why.append(PINNED_FRESH)
        if why:
            pins[c.path] = why
    return pins


def format_duration(seconds: float) -> str:
    """``keep_within`` as people write it: the largest of d, h, m, s that divides it (7d, 36h)."""
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"
