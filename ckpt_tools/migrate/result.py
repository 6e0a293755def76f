"""What migrate did: one outcome a checkpoint, the run's result, and progress events."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from .plan import MigrateItem


@dataclass(frozen=True)
class MigrateOutcome:
    source: str
    target: str
    outcome: str                        # migrated | skipped | failed
    method: str | None = None
    experts: int | None = None
    max_rel_error: float | None = None  # svd: worst module reconstruction error; exact/copy: 0.0
    reason: str | None = None
    module_errors: dict = field(default_factory=dict)
    verify: dict | None = None          # {"max_abs_diff", "max_rel_diff", "tolerance", "passed"}
    max_error: float | None = None      # svd: the bound each module's error was held to
    over_bound: tuple[dict, ...] = ()   # svd, failed: modules above it (lowrank.OverBound), worst first
    suggested_rank: int | None = None   # svd, failed: a --rank that meets the bound
    suggested_energy: float | None = None   # svd, failed: an --energy that meets the bound
    warnings: tuple[str, ...] = ()
    seconds: float = 0.0
    detail: str | None = field(default=None, compare=False)   # a traceback, for -v

    def to_dict(self) -> dict:
        d = {"source": self.source, "target": self.target}
        if self.outcome == "migrated":
            d |= {"method": self.method, "experts": self.experts,
                  "max_rel_error": self.max_rel_error}
            if self.max_error is not None:
                d["max_error"] = self.max_error
            if self.module_errors:
                d["module_errors"] = self.module_errors
            if self.verify is not None:
                d["verify"] = self.verify
            if self.warnings:
                d["warnings"] = list(self.warnings)
        else:
            d |= {"method": self.method, "reason": self.reason}
            if self.verify is not None:
                d["verify"] = self.verify
            if self.over_bound:
                d |= {"max_rel_error": self.max_rel_error, "max_error": self.max_error,
                      "module_errors": self.module_errors,
                      "over_bound": [dict(o) for o in self.over_bound],
                      "suggested_rank": self.suggested_rank,
                      "suggested_energy": self.suggested_energy}
        return d


@dataclass(frozen=True)
class MigrateResult:
    migrated: tuple[MigrateOutcome, ...]
    skipped: tuple[MigrateOutcome, ...]
    failed: tuple[MigrateOutcome, ...]

    def reworded(self, say: Callable[[str], str]) -> MigrateResult:
        """The same result with each outcome's reason and warnings as ``say`` puts them (the
        command line names the arguments they name by their flags: ``errors.Wording``)."""
        def one(o: MigrateOutcome) -> MigrateOutcome:
            return dataclasses.replace(o, reason=None if o.reason is None else say(o.reason),
                                       warnings=tuple(map(say, o.warnings)))
        return MigrateResult(*(tuple(map(one, outcomes))
                               for outcomes in (self.migrated, self.skipped, self.failed)))

    def to_dict(self) -> dict:
        return {"migrated": [o.to_dict() for o in self.migrated],
                "skipped": [o.to_dict() for o in self.skipped],
                "failed": [o.to_dict() for o in self.failed]}


@dataclass(frozen=True)
class MigrateEvent:
    kind: str                        # start | done
    item: MigrateItem
    outcome: MigrateOutcome | None = None
