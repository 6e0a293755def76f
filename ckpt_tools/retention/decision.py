"""What a retention policy decided about one checkpoint, and why."""

from __future__ import annotations

from dataclasses import dataclass

from ..kinds import RetentionAction

# The reasons a checkpoint is pinned: kept whatever the rules say.
PINNED_NEWEST = "pinned: newest"
PINNED_BEST = "pinned: best_model_checkpoint"
PINNED_IN_PROGRESS = "pinned: in-progress"
PINNED_BROKEN = "pinned: broken"
PINNED_LEGACY = "pinned: legacy"
PINNED_LINKED = "pinned: linked"
PINNED_USER = "pinned: user"
PINNED_FRESH = "pinned: fresh"
NOT_KEPT = "not kept by any rule"


@dataclass(frozen=True)
class Decision:
    """``action`` for the checkpoint at ``path`` (relative to ``root``) of ``run``, with every
    reason that applies, in the order of the rules (``last #1``, ``best eval_loss #1 (4.88)``,
    ``every 1000``, ``within 7d``, then pins); ``NOT_KEPT`` alone where nothing keeps it."""

    root: str
    run: str
    path: str
    action: RetentionAction
    reasons: tuple[str, ...]

    def __post_init__(self):
        if type(self.action) is not RetentionAction:
            object.__setattr__(self, "action", RetentionAction(self.action))

    @property
    def pinned(self) -> bool:
        return any(r.startswith("pinned: ") for r in self.reasons)

    def to_dict(self) -> dict:
        return {"path": self.path, "run": self.run, "action": self.action,
                "reasons": list(self.reasons)}
