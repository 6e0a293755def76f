"""What a validation concludes: the levels of scrutiny, the tensors and experts found, the
verdict and its facts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from ..kinds import Layout, MergedKind, ModelKind, Status, TreeForm
from ..problems import Problem


# The levels of scrutiny (examine's docstring says what each checks).
HEADERS, FULL, DEEP = "headers", "full", "deep"


@dataclass(frozen=True)
class Tensor:
    """A tensor's name, dtype and shape as a header or a pickle declares them."""

    dtype: str
    shape: tuple[int, ...]


@dataclass
class ExpertInfo:
    index: int
    source: str                        # relpath of the weights file
    loaded: bool = False               # its tensors could be read
    modules: dict[str, dict[str, Tensor]] = field(default_factory=dict)  # module → part → tensor
    config: dict | None = None
    config_path: str | None = None


@dataclass(frozen=True)
class VerdictFacts:
    """What a verdict found besides its status, for the commands that act on it: where the
    PEFT tree and the MoE state are, the parsed configs, the experts present; ``hashes``
    (a content hash per file) only in deep mode, else None. The configs are shared with other
    verdicts: never mutate them."""

    tree_form: TreeForm
    merged_kind: MergedKind | None
    router: str | None            # relpath of the router state, where one is expected
    experts: tuple[int, ...]      # indices of the experts present
    root_config: dict | None
    moe_config: dict | None
    moe_dir: str                  # relpath of dylo_moe_state/ (the run's for best_model/)
    young: bool                   # written within the minimum age
    hashes: dict | None = None    # relpath → sha256, in deep mode only
    adapters: tuple = ()          # ordinary.Adapter (name, peft_type) of each PEFT adapter


@dataclass(frozen=True)
class Verdict:
    """What the validator concluded about one checkpoint."""

    layout: Layout
    status: Status
    problems: tuple[Problem, ...]
    tree_form: TreeForm
    merged_kind: MergedKind | None
    merged_files: tuple[str, ...]
    num_experts: int | None
    tree_complete: bool
    facts: VerdictFacts
    model_kind: ModelKind = ModelKind.DYLORA_MOE

    @property
    def fresh(self) -> bool:
        """Complete, and judged by what it holds, although a file of it is younger than the
        minimum age: prune and migrate still leave it alone."""
        return self.facts.young and self.status is not Status.IN_PROGRESS


class _Found(NamedTuple):
    """What ``_examine`` found, before the checkpoint's age is taken into account; a
    replayed finding serves many checkpoints, so it is immutable."""

    layout: Layout
    tree_form: TreeForm
    merged_kind: MergedKind | None
    merged: tuple[str, ...]
    num_experts: int | None
    tree_complete: bool
    merged_export: bool
    experts: tuple[int, ...]
    router_ok: bool
    router: str | None
    root_cfg: dict | None
    moe_cfg: dict | None
    moe_dir: str
    hashes: dict | None
    model_kind: ModelKind = ModelKind.DYLORA_MOE
    adapters: tuple = ()
    found_anything: bool = True    # ordinary checkpoints: weights, an adapter or engine state

    def verdict_facts(self, young: bool) -> VerdictFacts:
        return VerdictFacts(tree_form=self.tree_form, merged_kind=self.merged_kind,
                            router=self.router, experts=self.experts, root_config=self.root_cfg,
                            moe_config=self.moe_cfg, moe_dir=self.moe_dir, young=young,
                            hashes=self.hashes, adapters=self.adapters)
