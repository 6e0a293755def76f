"""The closed sets of names that records, plans and logs carry: statuses, layouts, actions.

Each is a ``StrEnum`` whose values are the strings the README documents, so a member is
equal to its string, hashes like it (a dict keyed by strings finds it) and goes into JSON
and f-strings as that string: the output does not change with the type.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """What a checkpoint is, for prune and migrate (SPEC §1)."""

    PEFT_ONLY = "peft-only"
    REDUNDANT = "redundant"
    LEGACY = "legacy"
    BROKEN = "broken"
    IN_PROGRESS = "in-progress"


class Layout(StrEnum):
    """Which variant of SPEC §3 a checkpoint is laid out as."""

    CANONICAL = "canonical"
    CANONICAL_MERGED = "canonical+merged"
    V0 = "v0"
    V1 = "v1"
    V2 = "v2"
    V3 = "v3"
    V4 = "v4"
    V5 = "v5"
    HF_MERGED = "hf-merged"
    UNKNOWN = "unknown"


class TreeForm(StrEnum):
    """The form of a checkpoint's PEFT tree."""

    DIRS = "dirs"          # peft_adapters/expert_i/adapter_*
    NESTED = "nested"      # peft_adapters/expert_i/expert_i/adapter_* (PEFT's own nesting)
    FLAT = "flat"          # peft_adapters/expert_i.pt
    NONE = "none"


class MergedKind(StrEnum):
    """Whose keys a merged state dict holds."""

    V0 = "v0"              # foundation_model.model.*
    V1 = "v1"              # foundation_model.base_model.model.*
    HF = "hf"              # a plain Hugging Face model
    HF_LORA = "hf-lora"    # a plain model whose keys still name LoRA tensors
    UNREADABLE = "unreadable"   # merged files whose tensor names could not be read


class PruneAction(StrEnum):
    """What a prune log line or ``on_event`` says happened."""

    PLAN = "plan"
    DELETE = "delete"
    SKIP = "skip"
    FAIL = "fail"


class MigrateAction(StrEnum):
    """What a migrate plan does with one checkpoint."""

    MIGRATE = "migrate"
    SKIP = "skip"
    DONE = "done"


class MigrateMethod(StrEnum):
    """How migrate builds the PEFT tree (SPEC §5.5)."""

    COPY = "copy"
    EXACT = "exact"
    SVD = "svd"
