"""What a low-rank extraction produced (``lowrank.extract``): the adapter's tensors and config,
and how well it reproduces the fine-tune, module by module.

Plain records, importable without torch (the tensors are only carried).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import Wording

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Extraction:
    """A LoRA adapter that reproduces ``merged`` on top of ``base``, and how well it does.

    ``lora_state`` holds PEFT's saved-adapter keys (``base_model.model.<module>.lora_A.weight``,
    ``….lora_B.weight``, ``….lora_B.bias`` and the full tensors of ``modules_to_save``);
    ``adapter_config`` the keyword arguments of ``peft.LoraConfig``. ``errors`` and ``ranks``
    are per LoRA module: ‖D − B·A‖_F / ‖D‖_F with A and B as stored (in their dtype).
    ``skipped`` are modules whose weights did not change (or changed by exactly zero).
    """

    lora_state: dict[str, torch.Tensor]
    adapter_config: dict
    errors: dict[str, float]
    ranks: dict[str, int]
    max_rel_error: float
    skipped: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    exact_fallbacks: int
    missing: tuple[str, ...]          # in the base, not in the fine-tune
    extra: tuple[str, ...]            # in the fine-tune, not in the base (left out)
    notes: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    max_error: float | None = None    # the bound asked for (None: none)
    over_bound: tuple[OverBound, ...] = ()    # the modules above it, worst first
    complete: bool = True             # False: stopped at the first module over max_error

    @property
    def suggested_rank(self) -> int | None:
        """A ``rank`` that brings every module within the bound: the largest rank needed, and
        no lower than any module's rank now (None: some module meets it at no rank, or the
        extraction stopped before it saw every module)."""
        if (not self.over_bound or not self.complete
                or any(o.needed_rank is None for o in self.over_bound)):
            return None
        return max([o.needed_rank for o in self.over_bound] + list(self.ranks.values()))

    @property
    def suggested_energy(self) -> float | None:
        """``energy`` ≥ 1 − E² leaves a tail of at most E²·‖D‖²: error ≤ E on any spectrum."""
        if not self.over_bound or self.max_error is None or self.max_error >= 1.0:
            return None
        return float(f"{1.0 - self.max_error ** 2:.12g}")

    def over_bound_reason(self, shown: int = 3) -> Wording | None:
        """One line: the modules above ``max_error`` (worst first), and what would meet it."""
        if not self.over_bound:
            return None
        parts = []
        for o in self.over_bound[:shown]:
            if o.needed_rank is None:
                need = f"no rank meets it with A and B in {o.dtype}"
            elif o.needed_rank == o.full_rank:
                need = f"needs full rank {o.full_rank}"
            else:
                need = f"needs rank {o.needed_rank} of {o.full_rank}"
            parts.append(f"{o.module} {o.error:.3g} ({need})")
        more = len(self.over_bound) - shown
        line = (f"{len(self.over_bound)} of {len(self.errors)} LoRA module(s) above {{max_error}} "
                f"{{bound:g}}: {{modules}}")
        values = {"bound": self.max_error,
                  "modules": ", ".join(parts) + (f" and {more} more" if more > 0 else "")}
        rank, energy = self.suggested_rank, self.suggested_energy
        if rank is not None:
            line += "; {rank} {suggested_rank} or {energy} {suggested_energy:g} would meet it"
            values |= {"suggested_rank": rank, "suggested_energy": energy}
            if rank >= max(o.full_rank for o in self.over_bound):
                line += " (full rank: the delta is not low-rank, as a full fine-tune's is not)"
        else:
            line += "; {max_error} {worst:.3g} would accept it"
            values["worst"] = max(o.error for o in self.over_bound if o.needed_rank is None)
        return Wording(line, **values)

    def summary(self) -> dict:
        """Everything but the tensors, for JSON."""
        return {
            "modules": len(self.errors), "max_rel_error": self.max_rel_error,
            "errors": self.errors, "ranks": self.ranks, "skipped": list(self.skipped),
            "modules_to_save": list(self.modules_to_save),
            "exact_fallbacks": self.exact_fallbacks, "missing": list(self.missing),
            "extra": list(self.extra), "notes": list(self.notes),
            "adapter_config": self.adapter_config, "timings": self.timings,
            "device": self.device, "max_error": self.max_error,
            "over_bound": [o.to_dict() for o in self.over_bound],
            "suggested_rank": self.suggested_rank, "suggested_energy": self.suggested_energy,
            "complete": self.complete,
        }


@dataclass(frozen=True)
class OverBound:
    """A module whose relative error at the rank used is above the bound asked for."""

    module: str
    error: float                 # ‖D − B·A‖_F / ‖D‖_F, A and B as stored
    bound: float                 # max(max_error, the merged weight's rounding floor / ‖D‖_F)
    rank: int                    # the rank used
    needed_rank: int | None      # the smallest rank within the bound (None: no rank, in dtype)
    full_rank: int               # min(out, in)
    dtype: str                   # of A and B

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
