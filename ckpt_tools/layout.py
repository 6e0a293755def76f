"""Everything ckpt-tools knows about how DyLoRA-MoE checkpoints are laid out.

This is the one module that names files, directories and state-dict key patterns: the
canonical layout and every variant found in the wild. The scanner, the validator, prune and
migrate ask it; none of them spells a file name of its own.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import lru_cache

from .kinds import Layout, MergedKind, TreeForm

# The lru_caches below memoise pure functions of one name (a path, a tensor key): their answer
# never depends on what was read before, unlike the scan's memos, which live in a ReadCache.

# --- directory and file names -------------------------------------------------

PEFT_DIR = "peft_adapters"
MOE_STATE_DIR = "dylo_moe_state"
EXPERT_DIR_PREFIX = "expert_"
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_WEIGHTS_BIN = "adapter_model.bin"
PEFT_README = "README.md"
MOE_CONFIG = "config.json"            # inside dylo_moe_state/
ROUTER_PT = "router.pt"               # inside dylo_moe_state/
SKILL_LIBRARY = "skill_library.pt"    # inside dylo_moe_state/
ROUTER_SAFETENSORS = "router.safetensors"   # V5: at the checkpoint root
ROOT_CONFIG = "config.json"
BEST_MODEL_DIR = "best_model"
TMP_CHECKPOINT_PREFIX = "tmp-checkpoint-"
PARENT_DIR = ".."
# A small state dict of the trainable tensors only (LoRA + router), written by
# ckpt-tools' own Trainer callback so that Trainer.resume finds a weights file.
TRAINABLE_STATE = "trainable_state.safetensors"

DYLORA_WEIGHTS = "dylo_moe_weights.pt"
MERGED_SINGLE = ("model.safetensors", "pytorch_model.bin", DYLORA_WEIGHTS)
MERGED_INDEX = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_MERGED_SHARD_RE = re.compile(r"^(model|pytorch_model)-(\d{5})-of-(\d{5})\.(safetensors|bin)$")

TRAINER_STATE_JSON = "trainer_state.json"
TRAINER_STATE_FILES = (TRAINER_STATE_JSON, "optimizer.pt", "scheduler.pt", "scaler.pt",
                       "training_args.bin")
_RNG_STATE_RE = re.compile(r"^rng_state(_\d+)?\.pth$")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json",
                   "chat_template.jinja", "generation_config.json")

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_TMP_CHECKPOINT_RE = re.compile(r"^tmp-checkpoint-(\d+)?")
_EXPERT_RE = re.compile(r"^expert_(\d+)$")
_FLAT_EXPERT_RE = re.compile(r"^expert_(\d+)\.pt$")

# --- bounds on numbers that names and configs state ---------------------------------

#: The most experts a checkpoint may have. A count above it (declared by a config, or the
#: router's rows) is a problem on the file that states it, and an expert index at or above it
#: in a file, directory or tensor name is a problem on that file: the work of judging a
#: checkpoint then stays in proportion to its files, whatever a few bytes claim.
MAX_EXPERTS = 4096
#: The most digits of a step in ``checkpoint-<step>``: the Trainer's global step is an int64.
MAX_STEP_DIGITS = 18


class BadIndex(ValueError):
    """A tensor name whose expert index is out of range; its message says which."""


def bounded_index(digits: str, limit: int) -> int | None:
    """``int(digits)`` where it is below ``limit``, else None. The digits are counted first:
    ``int()`` of thousands of digits raises (Python's 4300-digit limit) or costs quadratic time."""
    if len(digits) > len(str(limit)):
        return None
    value = int(digits)
    return value if value < limit else None


def _bad_index_message(key: str, digits: str) -> str:
    """Why ``key``, whose expert index is ``digits``, is refused; a long key is cut short."""
    shown = repr(key) if len(key) <= 120 else f"{key[:50]!r}...{key[-30:]!r} ({len(key)} characters)"
    index = f"an expert index of {len(digits)} digits" if len(digits) > 12 else f"expert {digits}"
    return f"tensor {shown} names {index}, beyond the {MAX_EXPERTS} experts a checkpoint may have"


# --- defaults -------------------------------------------------------------

DEFAULT_LORA_R = 16
DEFAULT_LORA_ALPHA = 32
DEFAULT_LORA_DROPOUT = 0.05
DYLORA_MODEL_TYPE = "dylora-moe"
PEFT_ONLY_TYPE = "peft_only"

# --- state-dict keys -------------------------------------------------------------

V0_PREFIX = "foundation_model.model."
V1_PREFIX = "foundation_model.base_model.model."
FOUNDATION_PREFIX = "foundation_model."
ROUTER_KEY_PREFIX = "router."
GATE_WEIGHT = "gate.weight"
GATE_BIAS = "gate.bias"
CANONICAL_KEY_PREFIX = "base_model.model."
# ...q_proj.lora_A.expert_3.weight  (merged state dicts and expert_<i>.pt files)
_MOE_LORA_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"\.expert_(?P<expert>\d+)(?:\.(?P<param>weight|bias))?$")
# ...q_proj.lora_A.weight  (PEFT adapter files; PEFT drops the adapter name when saving)
_PEFT_LORA_KEY_RE = re.compile(
    r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_embedding_A|lora_embedding_B|lora_magnitude_vector)"
    r"(?:\.(?P<param>weight|bias))?$")


class Role(str, Enum):
    """What a file inside a checkpoint is for."""

    MERGED = "merged-weights"
    MERGED_INDEX = "merged-index"
    ADAPTER_CONFIG = "adapter-config"
    ADAPTER_WEIGHTS = "adapter-weights"
    FLAT_EXPERT = "flat-expert"
    PEFT_README = "peft-readme"
    ROUTER = "router"
    SKILL_LIBRARY = "skill-library"
    MOE_CONFIG = "moe-config"
    ROOT_CONFIG = "root-config"
    TRAINABLE_STATE = "trainable-state"
    TRAINER_STATE = "trainer-state"
    TRAINING_ARGS = "training-args"
    TOKENIZER = "tokenizer"
    # ordinary Trainer checkpoints
    PEFT_CONFIG = "peft-config"          # adapter_config.json of a PEFT adapter (root or <name>/)
    PEFT_WEIGHTS = "peft-weights"        # adapter_model.safetensors / .bin beside it
    ENGINE_STATE = "engine-state"        # DeepSpeed global_step*/, latest; FSDP optimizer_*/
    ENGINE_WEIGHTS = "engine-weights"    # FSDP pytorch_model_fsdp_*/ (the sharded model)
    OTHER = "other"


@dataclass(frozen=True)
class FileRole:
    role: Role
    expert: int | None = None
    nested: bool = False   # PEFT's expert_i/expert_i/ nesting (V5)
    # the leading part of the path that names an expert index >= MAX_EXPERTS (then the
    # role is OTHER): the validator reports it once, as a problem on that file or directory
    bad_index: str | None = None

    @property
    def in_peft_tree(self) -> bool:
        return self.role in PEFT_TREE_ROLES

    @property
    def holds_model(self) -> bool:
        """Part of the model the checkpoint holds (a link out of the root is then an error)."""
        return self.role in PEFT_TREE_ROLES or self.role in MODEL_ROLES


PEFT_TREE_ROLES = frozenset({Role.ADAPTER_CONFIG, Role.ADAPTER_WEIGHTS, Role.FLAT_EXPERT,
                             Role.ROUTER, Role.SKILL_LIBRARY, Role.MOE_CONFIG, Role.TRAINABLE_STATE})
# An ordinary checkpoint's model: its adapters, its FSDP-sharded weights.
MODEL_ROLES = frozenset({Role.PEFT_CONFIG, Role.PEFT_WEIGHTS, Role.ENGINE_WEIGHTS})


def is_rng_state_name(name: str) -> bool:
    return _RNG_STATE_RE.match(name) is not None


def never_unpickle(name: str) -> bool:
    """Trainer files whose pickles legitimately name non-tensor classes (TrainingArguments,
    numpy RNG state): never loaded by ckpt-tools. (The validator still judges an RNG state's
    pickle against what the Trainer's own loader allows; ``training_args.bin`` it checks as
    an archive only.)"""
    return name == "training_args.bin" or is_rng_state_name(name)


def is_merged_name(name: str) -> bool:
    return name in MERGED_SINGLE or name in MERGED_INDEX or _MERGED_SHARD_RE.match(name) is not None


@lru_cache(maxsize=1 << 14)
def role_of(relpath: str) -> FileRole:
    """The role of a file given its path relative to its checkpoint directory."""
    parts = relpath.split("/")
    name = parts[-1]
    if len(parts) == 1:
        if name == ADAPTER_CONFIG:
            return FileRole(Role.PEFT_CONFIG)
        if name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
            return FileRole(Role.PEFT_WEIGHTS)
        if name in DEEPSPEED_FILES:
            return FileRole(Role.ENGINE_STATE)
        if name in MERGED_SINGLE or _MERGED_SHARD_RE.match(name):
            return FileRole(Role.MERGED)
        if name in MERGED_INDEX:
            return FileRole(Role.MERGED_INDEX)
        if name == ROOT_CONFIG:
            return FileRole(Role.ROOT_CONFIG)
        if name == ROUTER_SAFETENSORS:
            return FileRole(Role.ROUTER)
        if name == TRAINABLE_STATE:
            return FileRole(Role.TRAINABLE_STATE)
        if name == "training_args.bin":
            return FileRole(Role.TRAINING_ARGS)
        if name in TRAINER_STATE_FILES or _RNG_STATE_RE.match(name):
            return FileRole(Role.TRAINER_STATE)
        if name in TOKENIZER_FILES:
            return FileRole(Role.TOKENIZER)
        m = _FLAT_EXPERT_RE.match(name)
        if m:  # best_model/ keeps its expert_<i>.pt files at its top level
            return _flat_expert(m, relpath)
        return FileRole(Role.OTHER)
    if parts[0] == PARENT_DIR and len(parts) == 3 and parts[1] == MOE_STATE_DIR:
        parts = parts[1:]  # a run's dylo_moe_state/ seen from its best_model/
    top = parts[0]
    if top == MOE_STATE_DIR and len(parts) == 2:
        if name == ROUTER_PT:
            return FileRole(Role.ROUTER)
        if name == SKILL_LIBRARY:
            return FileRole(Role.SKILL_LIBRARY)
        if name == MOE_CONFIG:
            return FileRole(Role.MOE_CONFIG)
        return FileRole(Role.OTHER)
    engine = engine_dir_role(top)
    if engine is not None:
        return FileRole(engine)
    if len(parts) == 2 and top not in CHECKPOINT_SUBDIRS:
        # a named adapter: PEFT saves each adapter but "default" in <name>/
        if name == ADAPTER_CONFIG:
            return FileRole(Role.PEFT_CONFIG)
        if name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
            return FileRole(Role.PEFT_WEIGHTS)
        return FileRole(Role.OTHER)
    if top == PEFT_DIR:
        if len(parts) == 2:
            m = _FLAT_EXPERT_RE.match(name)
            if m:
                return _flat_expert(m, relpath)
            return FileRole(Role.OTHER)
        m = _EXPERT_RE.match(parts[1])
        if not m:
            return FileRole(Role.OTHER)
        expert = bounded_index(m.group(1), MAX_EXPERTS)
        if expert is None:
            return FileRole(Role.OTHER, bad_index=f"{parts[0]}/{parts[1]}")
        nested = len(parts) == 4 and parts[2] == parts[1]
        if len(parts) == 3 or nested:
            if name == ADAPTER_CONFIG:
                return FileRole(Role.ADAPTER_CONFIG, expert, nested)
            if name in (ADAPTER_WEIGHTS, ADAPTER_WEIGHTS_BIN):
                return FileRole(Role.ADAPTER_WEIGHTS, expert, nested)
            if name == PEFT_README:
                return FileRole(Role.PEFT_README, expert, nested)
        return FileRole(Role.OTHER, expert)
    return FileRole(Role.OTHER)


def _flat_expert(m: re.Match, relpath: str) -> FileRole:
    expert = bounded_index(m.group(1), MAX_EXPERTS)
    if expert is None:
        return FileRole(Role.OTHER, bad_index=relpath)
    return FileRole(Role.FLAT_EXPERT, expert)


# --- directories -------------------------------------------------------------------

def _step_digits(name: str) -> str | None:
    m = _CHECKPOINT_RE.match(name) or _TMP_CHECKPOINT_RE.match(name)
    return m.group(1) if m else None


def checkpoint_step(name: str) -> int | None:
    """The step of ``checkpoint-<step>`` (or ``tmp-checkpoint-<step>``); None for other names
    and for a step of more than MAX_STEP_DIGITS digits (``step_out_of_range``)."""
    digits = _step_digits(name)
    if digits is None or len(digits) > MAX_STEP_DIGITS:
        return None
    return int(digits)


def step_out_of_range(name: str) -> bool:
    """Whether the name is ``checkpoint-<step>`` with a step of more than MAX_STEP_DIGITS digits."""
    digits = _step_digits(name)
    return digits is not None and len(digits) > MAX_STEP_DIGITS


def expert_index(name: str) -> int | None:
    """``i`` of an adapter or directory named ``expert_<i>``; None for any other name."""
    m = _EXPERT_RE.match(name)
    return int(m.group(1)) if m else None


def is_checkpoint_name(name: str) -> bool:
    return bool(_CHECKPOINT_RE.match(name)) or name == BEST_MODEL_DIR or is_tmp_checkpoint_name(name)


def is_tmp_checkpoint_name(name: str) -> bool:
    # migrate's own temporary and replaced directories are always in progress too
    return name.startswith((TMP_CHECKPOINT_PREFIX, MIGRATE_TMP_PREFIX, MIGRATE_OLD_PREFIX))


# ckpt-tools' own lock file: never part of a checkpoint's content or age.
LOCK_FILE = ".ckpt-tools.lock"
# In a bucket: prune's intent records (what a run is about to delete), under each root.
INTENT_DIR = ".ckpt-tools-intent"


def is_own_bookkeeping(name: str) -> bool:
    return name in (LOCK_FILE, INTENT_DIR)


# --- retention (prune --keep-* --strip|--delete) ----------------------------------------

# A run's trash: whole checkpoints deleted by a policy wait here until purged. Never walked.
TRASH_DIR = ".ckpt-tools-trash"
# A checkpoint holding this file is pinned: no policy strips or deletes it.
KEEP_FILE = ".ckpt-tools-keep"
# Written into a checkpoint before its training state is stripped, and completed after.
STRIP_MARKER = ".ckpt-tools-stripped.json"
# The marker is written as <marker>.tmp-<pid>, then renamed onto its name.
STRIP_MARKER_TMP_PREFIX = STRIP_MARKER + ".tmp-"


def is_strip_bookkeeping(name: str) -> bool:
    """The strip marker (or its temporary) at a checkpoint's top level: ckpt-tools' record of
    a strip, which says nothing about when the Trainer last wrote the checkpoint (its age)."""
    return name == STRIP_MARKER or name.startswith(STRIP_MARKER_TMP_PREFIX)
# A policy file inside a run: it may only add keeps and pins to the policy of the command line.
RUN_POLICY = ".ckpt-tools-policy.toml"


def marks_checkpoint(names: set[str]) -> bool:
    """Whether a directory holding entries ``names`` is a checkpoint whatever its name: a
    DyLoRA-MoE tree, model weights, or a PEFT adapter (a ``save_model`` output)."""
    if PEFT_DIR in names or ROUTER_SAFETENSORS in names:
        return True
    if ADAPTER_CONFIG in names and (ADAPTER_WEIGHTS in names or ADAPTER_WEIGHTS_BIN in names):
        return True
    return any(is_merged_name(n) for n in names)


# Directories that belong to the checkpoint that holds them; never a checkpoint of their own.
CHECKPOINT_SUBDIRS = frozenset({PEFT_DIR, MOE_STATE_DIR})

# --- DeepSpeed and FSDP state (the names transformers, DeepSpeed and accelerate document) ---

# DeepSpeed's save_checkpoint: <checkpoint>/global_step<N>/ holding mp_rank_XX_model_states.pt
# (ZeRO-3: zero_pp_rank_X_mp_rank_XX_model_states.pt) and *_optim_states.pt, the tag in
# ``latest``, and its zero_to_fp32.py copied beside them.
DEEPSPEED_LATEST = "latest"
DEEPSPEED_FILES = (DEEPSPEED_LATEST, "zero_to_fp32.py")
_DEEPSPEED_DIR_RE = re.compile(r"^global_step\d+$")
_DEEPSPEED_MODEL_STATES_RE = re.compile(r"^(zero_pp_rank_\d+_)?mp_rank_\d+_model_states\.pt$")
# accelerate's save_fsdp_model / save_fsdp_optimizer with SHARDED_STATE_DICT
# (torch.distributed.checkpoint): pytorch_model_fsdp_<i>/ and optimizer_<i>/, each a
# ``.metadata`` file and ``__<rank>_0.distcp`` shards.
_FSDP_MODEL_DIR_RE = re.compile(r"^pytorch_model_fsdp_\d+$")
_FSDP_OPTIMIZER_DIR_RE = re.compile(r"^optimizer_\d+$")
FSDP_METADATA = ".metadata"
FSDP_SHARD_SUFFIX = ".distcp"


def engine_dir_role(name: str) -> Role | None:
    """The role of the files under a top-level directory of DeepSpeed or FSDP state."""
    if _DEEPSPEED_DIR_RE.match(name) or _FSDP_OPTIMIZER_DIR_RE.match(name):
        return Role.ENGINE_STATE
    if _FSDP_MODEL_DIR_RE.match(name):
        return Role.ENGINE_WEIGHTS
    return None


def is_deepspeed_dir(name: str) -> bool:
    return _DEEPSPEED_DIR_RE.match(name) is not None


def is_fsdp_dir(name: str) -> bool:
    return _FSDP_MODEL_DIR_RE.match(name) is not None or _FSDP_OPTIMIZER_DIR_RE.match(name) is not None


def is_deepspeed_model_states(name: str) -> bool:
    return _DEEPSPEED_MODEL_STATES_RE.match(name) is not None


def belongs_to_checkpoint(name: str) -> bool:
    """Whether a top-level subdirectory ``name`` of a checkpoint is part of it by its name
    alone (never a checkpoint of its own)."""
    return name in CHECKPOINT_SUBDIRS or engine_dir_role(name) is not None


# Files the Trainer writes only to resume training: what a checkpoint is without them is
# still usable for evaluation and inference (``training_state_bytes``).
OPTIMIZER_STATE = "optimizer.pt"
RESUME_ONLY_FILES = (OPTIMIZER_STATE, "scheduler.pt", "scaler.pt")


@lru_cache(maxsize=1 << 14)   # a relpath repeats in every checkpoint of a run
def is_resume_only(relpath: str) -> bool:
    """Training state that only resuming needs: optimizer, scheduler, scaler and RNG state,
    DeepSpeed's global_step*/ and FSDP's optimizer_*/ (not trainer_state.json, not weights)."""
    parts = relpath.split("/")
    if len(parts) == 1:
        return parts[0] in RESUME_ONLY_FILES or is_rng_state_name(parts[0])
    return _DEEPSPEED_DIR_RE.match(parts[0]) is not None or _FSDP_OPTIMIZER_DIR_RE.match(parts[0]) is not None


# --- migrate --------------------------------------------------------

# A target checkpoint is written as <parent>/.ckpt-tools-tmp-<name>-<pid>, then renamed into
# place; a finished target being replaced is parked at .ckpt-tools-old-<name>-<pid> first.
MIGRATE_TMP_PREFIX = ".ckpt-tools-tmp-"
MIGRATE_OLD_PREFIX = ".ckpt-tools-old-"
# Written last into every migrated target: where it came from and what was read.
MIGRATED_MARKER = ".ckpt-tools-migrated.json"
# Roles of the files that migrate carries over byte for byte (so that training can resume).
CARRIED_ROLES = frozenset({Role.TRAINER_STATE, Role.TRAINING_ARGS, Role.TOKENIZER})
# The legacy router.pt of V2: {"gate_state_dict": {"weight", "bias"}, "num_experts", ...}
LEGACY_ROUTER_STATE = "gate_state_dict"
LORA_TASK_TYPE = "CAUSAL_LM"          # DyLoRA-MoE adapts a causal LM


# --- state-dict keys -------------------------------------------------------------

@dataclass(frozen=True)
class LoraKey:
    module: str      # e.g. model.layers.0.self_attn.q_proj (prefix removed)
    part: str        # lora_A | lora_B | ...
    expert: int | None
    param: str | None


def _key_expert(key: str, m: re.Match) -> int:
    expert = bounded_index(m.group("expert"), MAX_EXPERTS)
    if expert is None:
        raise BadIndex(_bad_index_message(key, m.group("expert")))
    return expert


@lru_cache(maxsize=1 << 16)  # key names repeat across every checkpoint of a run
def parse_moe_lora_key(key: str) -> LoraKey | None:
    """A LoRA key of a merged state dict or flat expert file (``….lora_A.expert_3.weight``).
    Raises ``BadIndex`` for an expert index of MAX_EXPERTS or more."""
    m = _MOE_LORA_KEY_RE.match(key)
    if not m:
        return None
    return LoraKey(strip_foundation_prefix(m.group("module")), m.group("part"),
                   _key_expert(key, m), m.group("param"))


@lru_cache(maxsize=1 << 16)
def parse_peft_lora_key(key: str) -> LoraKey | None:
    """A LoRA key of a PEFT adapter file (``base_model.model.….lora_A.weight``)."""
    m = _PEFT_LORA_KEY_RE.match(key)
    if not m:
        return None
    module = m.group("module")
    if module.startswith(CANONICAL_KEY_PREFIX):
        module = module[len(CANONICAL_KEY_PREFIX):]
    return LoraKey(module, m.group("part"), None, m.group("param"))


class MixedKeyForms(ValueError):
    """An ``expert_<i>.pt`` file holding LoRA keys of both forms; its message names one of each."""


def flat_expert_peft_form(keys) -> bool:
    """Whether the LoRA keys of an ``expert_<i>.pt`` file are PEFT's own form
    (``base_model.model.….lora_A.weight``, as ``get_peft_model_state_dict`` writes them: only
    the file's name says whose they are) rather than the expert-indexed form of the
    PeftModel's state dict (``….lora_A.expert_<i>.weight``). Raises ``MixedKeyForms`` where the
    file holds both: which of its tensors are expert i's would then be a guess."""
    peft = indexed = None
    for key in keys:
        if _MOE_LORA_KEY_RE.match(key):
            indexed = indexed or key
        elif _PEFT_LORA_KEY_RE.match(key):
            peft = peft or key
    if peft is not None and indexed is not None:
        raise MixedKeyForms(f"holds LoRA keys of both forms: {peft!r} (no expert index) and "
                            f"{indexed!r} (expert-indexed)")
    return peft is not None


def strip_foundation_prefix(key: str) -> str:
    for prefix in (V1_PREFIX, V0_PREFIX):
        if key.startswith(prefix):
            return key[len(prefix):]
    if key.startswith(FOUNDATION_PREFIX):
        return key[len(FOUNDATION_PREFIX):]
    return key


def module_path(module: str) -> str:
    """A LoRA module's path inside the Hugging Face model, from any of the key forms.

    ``foundation_model.base_model.model.model.layers.0.q_proj`` (V1) → ``model.layers.0.q_proj``;
    ``foundation_model.model.layers.0.q_proj`` (V0: the HF model itself was ``foundation_model``,
    so only that segment goes) → ``model.layers.0.q_proj``; ``base_model.model.…`` (PEFT and
    ``expert_<i>.pt`` keys) loses ``base_model.model.``.
    """
    if module.startswith(V1_PREFIX):
        return module[len(V1_PREFIX):]
    if module.startswith(FOUNDATION_PREFIX):
        module = module[len(FOUNDATION_PREFIX):]
    if module.startswith(CANONICAL_KEY_PREFIX):
        module = module[len(CANONICAL_KEY_PREFIX):]
    return module


def moe_lora_parts(key: str) -> tuple[str, str, int, str | None] | None:
    """(HF module path, part, expert, param) of a ``….lora_A.expert_<i>.weight`` key, or None.
    Raises ``BadIndex`` as ``parse_moe_lora_key``."""
    m = _MOE_LORA_KEY_RE.match(key)
    if not m:
        return None
    return module_path(m.group("module")), m.group("part"), _key_expert(key, m), m.group("param")


def peft_lora_parts(key: str) -> tuple[str, str, str | None] | None:
    """(HF module path, part, param) of a PEFT adapter key ``base_model.model.….lora_A.weight``."""
    m = _PEFT_LORA_KEY_RE.match(key)
    if not m:
        return None
    return module_path(m.group("module")), m.group("part"), m.group("param")


def canonical_adapter_key(module: str, part: str, param: str | None = "weight") -> str:
    return f"{CANONICAL_KEY_PREFIX}{module}.{part}" + (f".{param}" if param else "")


def merged_key_kind(keys) -> MergedKind:
    """Which variant a merged state dict's keys belong to: v0, v1, or a plain model's (hf,
    hf-lora when its keys still name LoRA tensors)."""
    v0 = v1 = lora = 0
    for k in keys:
        if k.startswith(V1_PREFIX):
            v1 += 1
        elif k.startswith(V0_PREFIX):
            v0 += 1
        if ".lora_" in k:
            lora += 1
    if v1:
        return MergedKind.V1
    if v0:
        return MergedKind.V0
    return MergedKind.HF_LORA if lora else MergedKind.HF


def router_key(key: str) -> str | None:
    """``router.gate.weight`` → ``gate.weight``; None for a key that is not the router's."""
    if key.startswith(ROUTER_KEY_PREFIX):
        return key[len(ROUTER_KEY_PREFIX):]
    return None


# --- configs ------------------------------------------------------------------------

NUM_EXPERTS_KEYS = ("num_experts", "_dylora_num_experts")
LORA_R_KEYS = ("lora_r", "_dylora_lora_r")
LORA_ALPHA_KEYS = ("lora_alpha", "_dylora_lora_alpha")
LORA_DROPOUT_KEYS = ("lora_dropout", "_dylora_lora_dropout")


def first_key(config: dict | None, keys) -> object | None:
    if not isinstance(config, dict):
        return None
    for k in keys:
        if k in config and config[k] is not None:
            return config[k]
    return None


def is_dylora_config(config: dict | None) -> bool:
    """A root config.json written for a DyLoRA-MoE checkpoint (including benchmark rewrites)."""
    if not isinstance(config, dict):
        return False
    return (config.get("model_type") == DYLORA_MODEL_TYPE
            or config.get("_dylora_original_type") == DYLORA_MODEL_TYPE
            or config.get("checkpoint_type") == PEFT_ONLY_TYPE
            or any(k.startswith("_dylora_") for k in config))


def is_hf_model_config(config: dict | None) -> bool:
    return isinstance(config, dict) and bool(config.get("architectures")) and not is_dylora_config(config)


# --- layout labels --------------------------------------------------------------------

# The enums are kinds.Layout and kinds.TreeForm; these names are what the modules that
# ask this one spell.
CANONICAL = Layout.CANONICAL
CANONICAL_MERGED = Layout.CANONICAL_MERGED
V0, V1, V2, V3, V4, V5 = Layout.V0, Layout.V1, Layout.V2, Layout.V3, Layout.V4, Layout.V5
HF_MERGED = Layout.HF_MERGED
UNKNOWN = Layout.UNKNOWN
LAYOUTS = tuple(Layout)

# forms of the PEFT tree
TREE_CANONICAL = TreeForm.DIRS       # peft_adapters/expert_i/adapter_*
TREE_NESTED = TreeForm.NESTED        # peft_adapters/expert_i/expert_i/adapter_* (PEFT's own nesting)
TREE_FLAT = TreeForm.FLAT            # peft_adapters/expert_i.pt
TREE_NONE = TreeForm.NONE


def layout_label(tree_form: TreeForm, merged_kind: MergedKind | None,
                 has_dylora_root_config: bool) -> Layout:
    """Name the layout variant from the PEFT tree's form and the merged weights' keys."""
    if tree_form == TreeForm.DIRS:
        return Layout.CANONICAL_MERGED if merged_kind else Layout.CANONICAL
    if tree_form == TreeForm.NESTED:
        return Layout.V5
    if tree_form == TreeForm.FLAT:
        if merged_kind is None:
            return Layout.V4
        return Layout.V3 if has_dylora_root_config else Layout.V2
    if merged_kind == MergedKind.V0:
        return Layout.V0
    if merged_kind == MergedKind.V1:
        return Layout.V1
    if merged_kind in (MergedKind.HF, MergedKind.HF_LORA):
        return Layout.HF_MERGED
    return Layout.UNKNOWN


# --- the Trainer callback (ckpt_tools.integrations.transformers) --------------------------

# It writes a checkpoint's PEFT tree into <checkpoint>/.ckpt-tools-tmp-peft-tree-<pid>/, then
# renames the parts into place; the shared prefix makes that directory in progress
# (is_tmp_checkpoint_name), so audit and prune leave it and a half-written tree alone.
PEFT_TREE_TMP_PREFIX = MIGRATE_TMP_PREFIX + "peft-tree-"
