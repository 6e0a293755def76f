"""Keep new ``transformers.Trainer`` checkpoints PEFT-only, and resume from them.

Why a callback cannot simply stop the merged save: ``Trainer._maybe_log_save_evaluate``
calls ``_save_checkpoint`` (which writes ``model.safetensors``, the optimizer, the RNG
states, ``trainer_state.json`` and rotates old checkpoints) and only then
``callback_handler.on_save``. So ``PeftOnlyCheckpointCallback.on_save`` writes the canonical
canonical PEFT tree next to what the Trainer wrote, validates it with the project's own
validator, and only then removes the merged weights, through the same plan/execute path
that ``ckpt-tools prune`` uses.

Resuming: for a model that is not a ``PreTrainedModel``, ``Trainer._load_from_checkpoint``
insists on ``model.safetensors``/``pytorch_model.bin`` (or their index) and raises
"Can't find a valid checkpoint" without one; ``_load_best_model`` only warns. The callback
therefore also writes ``trainable_state.safetensors``: the trainable tensors (LoRA of every
expert, the router, anything else with ``requires_grad``), keyed exactly as in
``model.state_dict()``. ``PeftOnlyResumeMixin`` (or the ready ``PeftOnlyTrainer``) loads that
file where the Trainer would load the merged weights and defers to the Trainer everywhere
else; the optimizer, scheduler, scaler and RNG states are the Trainer's own files, loaded by
the Trainer's own code. ``docs/callback.md`` tells the story for users.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import PreTrainedModel, Trainer, TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from .. import __version__, canonical, commit, layout, scanner
from ..errors import UsageError
from ..fs import FileOps, local_or
from ..problems import Problem
from ..prune.execute import Revalidator, execute_prune
from ..prune.plan import plan_prune
from ..records import Checkpoint
from ..validator import FULL, validate_checkpoint

logger = logging.getLogger("ckpt_tools")

# The checkpoint was written by this process a moment ago, so --min-age has nothing to protect
# it from; but a file server whose clock runs ahead of ours stamps mtimes in our future, which
# would make a fresh checkpoint look in progress. Judge it from a minute ahead.
_CLOCK_SKEW_S = 60.0
_ST_METADATA = {"format": "pt"}
# The order in which the parts of the tree are renamed into place; the root config.json,
# which tells readers "this is a PEFT-only checkpoint", comes last.
_TREE_ENTRIES = (layout.TRAINABLE_STATE, layout.MOE_STATE_DIR, layout.PEFT_DIR, layout.ROOT_CONFIG)


class PeftTreeWriteError(RuntimeError):
    """The PEFT tree of a checkpoint could not be written; the Trainer's merged weights stay."""


class UnsupportedModelError(UsageError):
    """The callback was given a model it does not serve; raised before any step or checkpoint."""


# --------------------------------------------------------------------------- model shape

def default_peft_model(model: nn.Module):
    """DyLoRA-MoE keeps its ``peft.PeftModel`` (one adapter per expert) in ``.foundation_model``."""
    return model.foundation_model


def default_router(model: nn.Module) -> nn.Module:
    return model.router


def default_skill_library(model: nn.Module):
    return getattr(model, "skill_library", None)


def _unwrap(model: nn.Module) -> nn.Module:
    """The module under DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def expert_adapter_names(peft_model) -> list[str]:
    """The adapters named ``expert_0 .. expert_{E-1}``, in expert order; an error on a gap."""
    found = {}
    for name in peft_model.peft_config:
        index = layout.expert_index(name)
        if index is not None:
            found[index] = name
    if not found:
        raise ValueError(f"the PEFT model has no adapters named expert_<i> "
                         f"(it has {sorted(peft_model.peft_config)})")
    if sorted(found) != list(range(len(found))):
        raise ValueError(f"expert adapters are not numbered 0..{len(found) - 1} without gaps: "
                         f"{sorted(found)}")
    return [found[i] for i in range(len(found))]


def check_model_served(model: nn.Module, *, get_peft_model: Callable = default_peft_model,
                       get_router: Callable = default_router) -> None:
    """Raise ``UnsupportedModelError`` unless ``write_peft_tree`` can write ``model``'s tree.

    One line for the user: what the callback serves, what it was given, and what to do
    instead. The getter's own exception is not chained: for a plain model it is an
    ``AttributeError`` deep in the model's ``__getattr__`` that names the wrong class (a
    ``PeftModel`` forwards to its base model); for any other model its text is in the line.
    """
    model = _unwrap(model)
    try:
        peft_model = get_peft_model(model)
        expert_adapter_names(peft_model)
        _prefix_of(model, get_router(model), "router")
        _prefix_of(model, peft_model, "PEFT model")
    except Exception as exc:  # noqa: BLE001 - whatever the getters raise, the model is not one served
        raise UnsupportedModelError(_not_served_message(model, exc)) from None


def _not_served_message(model: nn.Module, cause: Exception) -> str:
    served = ("PeftOnlyCheckpointCallback serves a DyLoRA-MoE model: get_peft_model(model) "
              "(default model.foundation_model) must be a peft.PeftModel holding the expert adapters "
              "expert_0..expert_<E-1>, and get_router(model) (default model.router) a submodule of it")
    given = type(model).__name__
    # "plain": no PeftModel inside it, so it cannot be a DyLoRA-MoE model with a fault to name
    plain = not any(isinstance(m, PeftModel) for m in model.modules() if m is not model)
    if plain and isinstance(model, PeftModel):
        return (f"{served}; it was given a {given}, a plain PeftModel, whose checkpoints are already "
                "adapter-only (the Trainer saves only the adapter): no callback is needed, use the Trainer alone")
    if plain and isinstance(model, PreTrainedModel):
        return (f"{served}; it was given a {given}, a plain PreTrainedModel, which has no expert adapters "
                "to write (the Trainer saves it whole, as a full model): use the Trainer alone")
    reason = " ".join(str(cause).split()) or type(cause).__name__
    return f"{served}; it was given a {given}, which is not one: {reason}"


def _prefix_of(model: nn.Module, sub: nn.Module, what: str) -> str:
    """The state-dict prefix under which ``model`` holds ``sub`` (``""`` when it is ``model``)."""
    for name, module in model.named_modules(remove_duplicate=False):
        if module is sub:
            return f"{name}." if name else ""
    raise ValueError(f"the {what} is not a submodule of the model passed to the Trainer")


def trainable_state_dict(model: nn.Module, peft_model, router: nn.Module,
                         expert_names: list[str]) -> dict[str, torch.Tensor]:
    """The tensors that training changes, keyed exactly as in ``model.state_dict()``.

    Every parameter with ``requires_grad``, plus the LoRA tensors of every expert and the
    router's whole state dict even where they are frozen at this moment (DyLoRA-MoE
    freezes and unfreezes experts as it goes).
    """
    full = model.state_dict()
    keys = {n for n, p in model.named_parameters() if p.requires_grad}
    router_prefix = _prefix_of(model, router, "router")
    keys |= {router_prefix + k for k in router.state_dict()}
    peft_prefix = _prefix_of(model, peft_model, "PEFT model")
    tags = tuple(f".{n}." for n in expert_names)
    keys |= {k for k in full
             if k.startswith(peft_prefix) and ".lora_" in k and any(t in k for t in tags)}
    return {k: full[k].detach() for k in sorted(keys) if k in full}


def _safe_tensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no shared storage: what ``safetensors`` accepts."""
    seen: set = set()
    out = {}
    for k, t in state.items():
        t = t.detach()
        ptr = (t.device, t.untyped_storage().data_ptr()) if t.numel() else None
        if ptr is not None and ptr in seen:
            t = t.clone()
        elif ptr is not None:
            seen.add(ptr)
        out[k] = t.contiguous()
    return out


# --------------------------------------------------------------------------- writers

def write_expert_adapter(peft_model, adapter_name: str, dest: str, *,
                         save_embedding_layers: bool = False,
                         fs: FileOps | None = None) -> dict[str, torch.Tensor]:
    """One adapter as PEFT serialises it, straight into ``dest/`` (no ``name/name`` nesting).

    Returns the tensors written, for the read-back check.
    """
    fs = local_or(fs)
    state = _safe_tensors(get_peft_model_state_dict(peft_model, adapter_name=adapter_name,
                                                    save_embedding_layers=save_embedding_layers))
    fs.makedirs(dest)
    fs.write_file(os.path.join(dest, layout.ADAPTER_WEIGHTS),
                  lambda path: save_file(state, path, metadata=_ST_METADATA))
    config = copy.deepcopy(peft_model.peft_config[adapter_name])
    config.inference_mode = True   # as PeftModel.save_pretrained writes it
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = _base_model_name(peft_model)
    auto_mapping = None
    if config.task_type is None:   # PEFT records the base class of a custom model the same way
        base_cls = type(peft_model.get_base_model())
        auto_mapping = {"base_model_class": base_cls.__name__, "parent_library": base_cls.__module__}
    fs.write_file(os.path.join(dest, layout.ADAPTER_CONFIG),
                  lambda path: config.save_pretrained(os.path.dirname(path), auto_mapping_dict=auto_mapping))
    return state


def _base_model_name(peft_model) -> str | None:
    base = peft_model.get_base_model()
    name = getattr(base, "name_or_path", None) or getattr(getattr(base, "config", None), "_name_or_path", None)
    return name or None


def _skill_library_state(lib) -> dict:
    if lib is None:
        return {}
    if hasattr(lib, "state_dict") and callable(lib.state_dict):
        return lib.state_dict()
    if isinstance(lib, Mapping):
        return dict(lib)
    raise TypeError(f"the skill library is a {type(lib).__name__}, which has no state_dict(); "
                    "pass get_skill_library= returning a dict of tensors and plain values")


@dataclass(frozen=True)
class WrittenTree:
    """What ``write_peft_tree`` put into a checkpoint."""

    directory: str
    num_experts: int
    entries: tuple[str, ...]                                      # top-level names installed
    tensors: dict = field(compare=False, repr=False)              # relpath → tensors written


def write_peft_tree(model: nn.Module, directory: str, *,
                    get_peft_model: Callable = default_peft_model,
                    get_router: Callable = default_router,
                    get_skill_library: Callable = default_skill_library,
                    config_extra: Mapping | Callable | None = None,
                    save_embedding_layers: bool = False,
                    fs: FileOps | None = None) -> WrittenTree:
    """Write the canonical PEFT tree of ``model`` into the existing ``directory``.

    Through ``commit.EntriesCommit``: everything is written under
    ``directory/.ckpt-tools-tmp-peft-tree-<pid>/``, fsynced, then renamed into place part by
    part (replacing any previous version of those parts), the root ``config.json`` last.
    Raises on any failure, leaving no temporary directory behind where it can remove it;
    files other than the tree's are never touched. ``verify_and_prune`` checks the result.
    """
    fs = local_or(fs)
    model = _unwrap(model)
    peft_model = get_peft_model(model)
    router = get_router(model)
    names = expert_adapter_names(peft_model)
    extra = dict(config_extra(model) if callable(config_extra) else (config_extra or {}))
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory}: the checkpoint directory does not exist")
    tensors: dict[str, dict[str, torch.Tensor]] = {}

    def write(tmp: str) -> None:
        for i, name in enumerate(names):
            rel = f"{layout.PEFT_DIR}/{layout.EXPERT_DIR_PREFIX}{i}"
            tensors[f"{rel}/{layout.ADAPTER_WEIGHTS}"] = write_expert_adapter(
                peft_model, name, os.path.join(tmp, *rel.split("/")),
                save_embedding_layers=save_embedding_layers, fs=fs)

        first = peft_model.peft_config[names[0]]
        hyper = canonical.hyper(r=first.r, alpha=first.lora_alpha, dropout=first.lora_dropout,
                                base=first.base_model_name_or_path or _base_model_name(peft_model))
        moe_dir = os.path.join(tmp, layout.MOE_STATE_DIR)
        fs.mkdir(moe_dir)
        fs.write_bytes(os.path.join(moe_dir, layout.MOE_CONFIG), canonical.json_bytes(
            canonical.moe_config(len(names), hyper, first.target_modules,
                                 under=_router_facts(router), over=extra)))
        router_state = {k: v.detach().cpu().clone() for k, v in router.state_dict().items()}
        fs.write_file(os.path.join(moe_dir, layout.ROUTER_PT), lambda p: torch.save(router_state, p))
        tensors[f"{layout.MOE_STATE_DIR}/{layout.ROUTER_PT}"] = router_state
        skills = _skill_library_state(get_skill_library(model))
        fs.write_file(os.path.join(moe_dir, layout.SKILL_LIBRARY), lambda p: torch.save(skills, p))

        trainable = _safe_tensors(trainable_state_dict(model, peft_model, router, names))
        fs.write_file(os.path.join(tmp, layout.TRAINABLE_STATE), lambda p: save_file(
            trainable, p, metadata={**_ST_METADATA, "ckpt_tools": "trainable_state"}))
        tensors[layout.TRAINABLE_STATE] = trainable

        fs.write_bytes(os.path.join(tmp, layout.ROOT_CONFIG), canonical.json_bytes(
            canonical.root_config(len(names), hyper,
                                  extra={"written_by": f"ckpt-tools {__version__}", **extra})))

    staging = commit.EntriesCommit(directory, _TREE_ENTRIES, fs, tmp_prefix=layout.PEFT_TREE_TMP_PREFIX)
    try:
        commit.commit(staging, write)
    finally:
        error = staging.cleanup()
        if error is not None:
            # it is named as in progress, so audit and prune leave it (and its checkpoint) alone
            logger.error("%s: could not remove the temporary PEFT tree: %s", staging.tmp, error)
    return WrittenTree(os.path.abspath(directory), len(names), _TREE_ENTRIES, tensors)


def _router_facts(router: nn.Module) -> dict:
    """What the MoE config records of the router besides the hyperparameters."""
    facts = {}
    gate = getattr(router, "gate", None)
    if isinstance(gate, nn.Linear):
        facts["hidden_size"] = gate.in_features
    for attr in ("top_k", "temperature"):
        value = getattr(router, attr, None)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            facts[attr] = value
    return facts


# --------------------------------------------------------------------------- verification

def _read_back(directory: str, written: WrittenTree) -> list[str]:
    """Every tensor file of the tree, read back and compared with what was written."""
    reasons = []
    for rel, expected in written.tensors.items():
        path = os.path.join(directory, *rel.split("/"))
        try:
            if rel.endswith(".safetensors"):
                got = load_file(path, device="cpu")
            else:
                got = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except Exception as exc:  # noqa: BLE001 - any failure to read back is a verification failure
            reasons.append(f"{rel}: cannot be read back: {type(exc).__name__}: {exc}")
            continue
        if not isinstance(got, dict) or set(got) != set(expected):
            reasons.append(f"{rel}: does not hold the tensors written")
            continue
        differ = [k for k, t in expected.items()
                  if got[k].dtype != t.dtype or not torch.equal(got[k], t.detach().cpu())]
        if differ:
            reasons.append(f"{rel}: {len(differ)} tensor(s) differ from the model's, e.g. {differ[0]}")
    return reasons


@dataclass(frozen=True)
class SaveOutcome:
    """What the callback did to one checkpoint."""

    checkpoint: str                       # absolute path
    step: int
    written: bool                         # the PEFT tree was written and installed
    verified: bool                        # it validated with no error, complete, and read back equal
    status: str = ""                      # the validator's status before the merged weights went
    problems: tuple[Problem, ...] = ()
    removed: tuple[str, ...] = ()         # merged-weight files deleted (relative to the checkpoint)
    freed_bytes: int = 0
    kept: tuple[str, ...] = ()            # merged-weight files left in place
    error: str = ""


def verify_and_prune(directory: str, written: WrittenTree, step: int = -1) -> SaveOutcome:
    """Validate the checkpoint in ``directory`` and, if its PEFT tree is sound, delete its merged weights.

    The checkpoint is scanned with ``scanner.find_checkpoints`` and validated at level
    ``full`` with ``min_age 0``; the tree must be complete, hold the experts written, have
    no error anywhere, and every tensor file must read back equal to what was written.
    Deletion then goes through ``plan_prune`` / ``execute_prune``: re-validated, identity
    checked, symlinks unlinked themselves.
    """
    directory = os.path.abspath(directory)
    dirs, _ = scanner.find_checkpoints(directory)
    found = [d for d in dirs if d.path == "."]
    if not found:
        return SaveOutcome(directory, step, True, False, error="the scanner does not see a checkpoint here")
    ckpt = found[0]
    verdict = validate_checkpoint(ckpt, level=FULL, min_age_s=0, now=time.time() + _CLOCK_SKEW_S)
    reasons = [f"{p.code} {p.path}: {p.message}" for p in verdict.problems if p.is_error]
    if not verdict.tree_complete:
        reasons.append("the PEFT tree is not complete")
    if verdict.layout not in (layout.CANONICAL, layout.CANONICAL_MERGED):
        reasons.append(f"layout is {verdict.layout!r}, not the canonical one")
    if verdict.num_experts != written.num_experts:
        reasons.append(f"{verdict.num_experts} experts found, {written.num_experts} written")
    if not reasons:
        reasons = _read_back(directory, written)
    merged = tuple(verdict.merged_files)
    if reasons:
        return SaveOutcome(directory, step, True, False, verdict.status, tuple(verdict.problems),
                           kept=merged, error="; ".join(reasons))
    record = Checkpoint.from_verdict(ckpt, verdict)
    result = execute_prune(plan_prune([record]), revalidate=Revalidator(
        min_age_s=0, level=FULL, clock=lambda: time.time() + _CLOCK_SKEW_S))
    removed = tuple(d.path for d in result.deleted)
    kept = tuple(m for m in merged if m not in removed)
    error = "; ".join([f"{f.path}: {f.reason}" for f in result.failed]
                      + [f"{s.path}: {s.reason}" for s in result.changed])
    return SaveOutcome(directory, step, True, True, verdict.status, tuple(verdict.problems),
                       removed, result.freed_bytes, kept, error)


# --------------------------------------------------------------------------- loading

def has_trainable_state_only(checkpoint: str) -> bool:
    """A checkpoint to resume from ``trainable_state.safetensors``: it has one and no merged weights.

    Where the merged weights are still there (the callback kept them because the tree did
    not validate), the Trainer's own loading of them is used instead.
    """
    try:
        names = os.listdir(checkpoint)
    except OSError:
        return False
    return layout.TRAINABLE_STATE in names and not any(layout.is_merged_name(n) for n in names)


def load_trainable_state(model: nn.Module, checkpoint: str) -> list[str]:
    """Load ``checkpoint/trainable_state.safetensors`` into ``model``; returns the keys loaded.

    Raises ``ValueError`` when the file holds a tensor the model does not have, or lacks a
    parameter the model trains: either means it belongs to another model, and resuming
    from it would silently train something else.
    """
    model = _unwrap(model)
    path = os.path.join(checkpoint, layout.TRAINABLE_STATE)
    state = load_file(path, device="cpu")
    own = model.state_dict()
    unexpected = sorted(set(state) - set(own))
    if unexpected:
        raise ValueError(f"{path}: {len(unexpected)} tensor(s) the model does not have, "
                         f"e.g. {unexpected[0]!r}")
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in state)
    if missing:
        raise ValueError(f"{path}: lacks {len(missing)} trainable parameter(s) of the model, "
                         f"e.g. {missing[0]!r}")
    model.load_state_dict(state, strict=False)   # the frozen base is not in the file, by design
    return sorted(state)


class PeftOnlyResumeMixin:
    """Lets a ``Trainer`` resume from, and load the best model of, PEFT-only checkpoints.

    Put it before the Trainer class: ``class MyTrainer(PeftOnlyResumeMixin, Trainer)``, or use
    ``PeftOnlyTrainer``. It overrides the two places where the Trainer loads model weights;
    optimizer, scheduler, scaler, RNG and trainer state are still loaded by the Trainer.
    Single process and DDP; not DeepSpeed, FSDP or SageMaker MP.
    """

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        if has_trainable_state_only(resume_from_checkpoint):
            keys = load_trainable_state(model if model is not None else self.model, resume_from_checkpoint)
            logger.info("%s: resumed %d trainable tensors from %s", resume_from_checkpoint, len(keys),
                        layout.TRAINABLE_STATE)
            return
        super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_best_model(self) -> None:
        best = self.state.best_model_checkpoint
        if best and has_trainable_state_only(best):
            load_trainable_state(self.model, best)
            logger.info("loaded the best model from %s (score: %s)", best, self.state.best_metric)
            return
        super()._load_best_model()


class PeftOnlyTrainer(PeftOnlyResumeMixin, Trainer):
    """``transformers.Trainer`` that resumes from PEFT-only checkpoints."""


# --------------------------------------------------------------------------- the callback

class PeftOnlyCheckpointCallback(TrainerCallback):
    """Make every Trainer checkpoint PEFT-only, safely.

    In ``on_save`` (which the Trainer calls after it has written its checkpoint) it writes the
    PEFT tree with ``write_peft_tree``, validates the checkpoint with the project's validator
    and reads every tensor back, and only then deletes the Trainer's merged weights. If the
    tree does not validate, the merged weights stay and an error is logged; training goes on.
    If the tree cannot be written at all, ``PeftTreeWriteError`` is raised (unless
    ``raise_on_write_error=False``); the merged weights are still there.

    The defaults fit DyLoRA-MoE (``model.foundation_model`` a ``PeftModel`` whose adapters
    ``expert_<i>`` are the experts, ``model.router`` the router, ``model.skill_library``
    optional); pass getters for other shapes. A model they do not fit (a plain ``PeftModel``,
    a plain ``PreTrainedModel``) raises ``UnsupportedModelError`` when the Trainer is built,
    or, for a callback added later, when training begins. ``config_extra`` (a dict, or a
    function of the model returning one) is added to both config files.

    It also loads the best model at the end of training (``load_best_model_at_end``), which
    the Trainer cannot do once the merged weights are gone. ``outcomes`` lists what was done
    to each checkpoint. Only the process that saves (world process zero, or each node's
    local zero with ``save_on_each_node``) writes.
    """

    def __init__(self, *, get_peft_model: Callable = default_peft_model,
                 get_router: Callable = default_router,
                 get_skill_library: Callable = default_skill_library,
                 config_extra: Mapping | Callable | None = None,
                 save_embedding_layers: bool = False, raise_on_write_error: bool = True):
        self.get_peft_model = get_peft_model
        self.get_router = get_router
        self.get_skill_library = get_skill_library
        self.config_extra = config_extra
        self.save_embedding_layers = save_embedding_layers
        self.raise_on_write_error = raise_on_write_error
        self.outcomes: list[SaveOutcome] = []

    @staticmethod
    def _is_writer(args, state) -> bool:
        return bool(state.is_world_process_zero or (args.save_on_each_node and state.is_local_process_zero))

    # A model of the wrong shape fails when the Trainer is built (the Trainer calls on_init_end at
    # the end of its __init__), or, for a callback added later with add_callback, when training
    # begins: never at the first save, hours in, with a merged checkpoint already written.
    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_model(model)
        return control

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_model(model)
        return control

    def _check_model(self, model) -> None:
        if model is not None:   # without one there is nothing to check; on_save says so if it still has none
            check_model_served(model, get_peft_model=self.get_peft_model, get_router=self.get_router)

    def on_save(self, args, state, control, model=None, **kwargs):
        if not self._is_writer(args, state):
            return control
        directory = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        step = state.global_step
        try:
            if model is None:
                raise ValueError("the Trainer passed no model to on_save")
            written = write_peft_tree(model, directory, get_peft_model=self.get_peft_model,
                                      get_router=self.get_router, get_skill_library=self.get_skill_library,
                                      config_extra=self.config_extra,
                                      save_embedding_layers=self.save_embedding_layers)
        except Exception as exc:
            message = f"{directory}: could not write the PEFT tree ({type(exc).__name__}: {exc}); " \
                      "the Trainer's merged weights are kept"
            self.outcomes.append(SaveOutcome(os.path.abspath(directory), step, False, False, error=message))
            if self.raise_on_write_error:
                raise PeftTreeWriteError(message) from exc
            logger.error(message, exc_info=True)
            return control
        try:
            outcome = verify_and_prune(directory, written, step)
        except Exception as exc:  # noqa: BLE001 - cleanup never kills training (log instead)
            outcome = SaveOutcome(written.directory, step, True, False,
                                  error=f"validation failed to run: {type(exc).__name__}: {exc}")
            logger.error("%s: %s; the Trainer's merged weights are kept", directory, outcome.error,
                         exc_info=True)
        else:
            if not outcome.verified:
                logger.error("%s: the PEFT tree did not validate, the Trainer's merged weights are kept: %s",
                             directory, outcome.error)
            elif outcome.error:
                logger.error("%s: could not remove every merged-weight file: %s", directory, outcome.error)
            else:
                logger.info("%s: PEFT-only checkpoint written (%d experts); removed %s, freeing %d bytes",
                            directory, written.num_experts, ", ".join(outcome.removed) or "nothing",
                            outcome.freed_bytes)
        self.outcomes.append(outcome)
        return control

    def on_train_end(self, args, state, control, model=None, **kwargs):
        # Trainer._load_best_model finds no weights file in a PEFT-only checkpoint and only warns;
        # a PeftOnlyResumeMixin trainer has loaded it already, and loading it twice is harmless.
        best = state.best_model_checkpoint
        if args.load_best_model_at_end and best and model is not None and has_trainable_state_only(best):
            load_trainable_state(model, best)
        return control


__all__ = ["PeftOnlyCheckpointCallback", "PeftOnlyResumeMixin", "PeftOnlyTrainer", "PeftTreeWriteError",
           "UnsupportedModelError", "check_model_served",
           "SaveOutcome", "WrittenTree", "write_peft_tree", "write_expert_adapter", "verify_and_prune",
           "trainable_state_dict", "load_trainable_state", "has_trainable_state_only",
           "expert_adapter_names"]
