"""The closed sets of names that records, plans and logs carry: statuses, layouts, actions.

Each is a ``StrEnum`` whose values are the strings the README documents, so a member is
equal to its string, hashes like it (a dict keyed by strings finds it) and goes into JSON
and f-strings as that string: the output does not change with the type.
"""

from __future__ import annotations

from enum import StrEnum


class Status(StrEnum):
    """What a checkpoint is, for prune and migrate; the same words for every model kind.

    ``healthy``: complete and sound, nothing to do (a DyLoRA-MoE PEFT tree without merged
    weights, a PEFT adapter, a full model). Called ``peft-only`` in ckpt-tools 0.1 (README, "Changes to the JSON in 0.2").
    ``redundant``: something in it is provably reproducible from the rest (merged weights
    beside the PEFT tree they were merged from). ``legacy``: a DyLoRA-MoE checkpoint that must
    be migrated. ``broken``: something present is missing, unreadable or inconsistent.
    ``in-progress``: being written.
    """

    HEALTHY = "healthy"
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
    # ordinary Trainer checkpoints
    ADAPTER = "adapter"          # one PEFT adapter at the checkpoint's root
    ADAPTERS = "adapters"        # several: PEFT saves each non-default one in <name>/
    MODEL = "model"              # model.safetensors / pytorch_model.bin
    SHARDED = "sharded"          # model-0000i-of-0000n.* plus the index
    DEEPSPEED = "deepspeed"      # the model only in DeepSpeed's global_step*/ state
    FSDP = "fsdp"                # the model only in FSDP's sharded state (pytorch_model_fsdp_*)
    UNKNOWN = "unknown"


class ModelKind(StrEnum):
    """What model a checkpoint holds, beside how it is laid out."""

    DYLORA_MOE = "dylora-moe"        # LoRA experts and a router (SPEC §2, §3)
    PEFT_ADAPTER = "peft-adapter"    # one or several PEFT adapters of any type
    FULL_MODEL = "full-model"        # every weight of the model, in one file or shards
    DEEPSPEED = "deepspeed"          # only DeepSpeed's partitioned state
    FSDP = "fsdp"                    # only FSDP's sharded state
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
    STRIP = "strip"      # a retention policy stripped a checkpoint's training state
    TRASH = "trash"      # a retention policy moved a checkpoint into its run's trash
    PURGE = "purge"      # an entry of a run's trash was removed


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


class RetentionAction(StrEnum):
    """What a retention policy does with one checkpoint (``prune --keep-* --strip|--delete``)."""

    KEEP = "keep"
    STRIP = "strip"      # its training state removed, its weights or adapters kept
    DELETE = "delete"    # moved to its run's trash, purged after the grace period


class SpaceRole(StrEnum):
    """What the bytes of a file are for, in audit's space by role (``space.py``)."""

    WEIGHTS = "weights"                  # the model's weights (merged, shards, engine state as the only copy)
    ADAPTERS = "adapters"                # PEFT adapters, the DyLoRA-MoE PEFT tree and MoE state
    REDUNDANT_MERGED = "redundant_merged"  # merged weights of a redundant checkpoint: prune frees them
    TRAINING_STATE = "training_state"    # what only resuming needs: strip frees it
    TRASH = "trash"                      # checkpoints deleted by a policy, in their run's trash
    OTHER = "other"                      # configs, tokenizer, trainer_state.json, anything else
