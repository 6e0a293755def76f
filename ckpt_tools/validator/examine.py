"""Decide what a checkpoint is: its layout, its problems and its status.

Three levels of scrutiny:

- ``headers`` (audit): every file of the PEFT tree and every merged-weight file is
  checked by its header (safetensors) or archive structure and pickle opcodes
  (torch.save); configs are parsed. Trainer state files are only looked at.
- ``full`` (validate): also the archive structure and pickle of every torch.save file of the
  checkpoint (``_pickle_check_of``).
- ``deep`` (validate --deep): also every tensor read (NaN/Inf), a content hash per file,
  ``adapter_config.json`` through ``peft.LoraConfig`` when peft is there, and the LoRA and
  router tensors of merged weights compared with the PEFT tree's (``merged-mismatch``, the
  comparison prune's ``prune.proof`` makes).

No tensor data is read and neither torch nor peft is imported below ``deep``: the config
checks that decide shapes and scaling (``_check_adapter_config``) are plain Python.
``redundant`` is structural: a complete, sound PEFT tree beside merged weights that hold
DyLoRA LoRA tensors (merged weights holding none are a merged export: ``healthy``,
``merged-export``).
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING, NamedTuple

from .. import layout, replay
from ..formats import safetensors_header as st
from ..formats import shard_index, torchsave
from ..kinds import Layout, MergedKind, ModelKind, TreeForm
from ..layout import Role
from ..problems import (BAD_CONFIG, BAD_JSON, BAD_NAME, COUNT_UNCONFIRMED, ERROR,
                        EXPERT_COUNT_MISMATCH, MERGED_EXPORT, MERGED_MISMATCH, MISSING_FILE,
                        IN_PROGRESS as IN_PROGRESS_CODE, MISSING_TENSOR, PERMISSION_DENIED, SHAPE_MISMATCH, SYMLINK_ESCAPE, WARNING,
                        FormatError, Problem)
from ..read_cache import ReadCache
from .. import trainer_state
from ..records import (BROKEN, IN_PROGRESS, LEGACY, HEALTHY, REDUNDANT, CheckpointDir,
                       FileRecord)
from .context import _Ctx, _count, _finite, _memoised
from .experts import (_ROUTER_ROWS, _check_expert_shapes, _compare_experts, _expert_count,
                      _load_dir_experts, _load_flat_experts, _ranges, _report_missing_experts,
                      _tree_form)
from .ordinary import NOTHING_FOUND, examine_ordinary
from .stripped import judge_strip_marker
from .verdict import DEEP, FULL, HEADERS, ExpertInfo, Tensor, Verdict, _Found

if TYPE_CHECKING:
    from ..storage.remote import ObjectStorage

# merged weights whose keys are DyLoRA-MoE's own (an expert index in each LoRA tensor's name)
_MOE_MERGED = (MergedKind.V0, MergedKind.V1)


def _router_shapes(ctx: _Ctx, rel: str) -> tuple[dict[str, Tensor] | None, object]:
    """(gate.weight / gate.bias of a router file, in any of its three forms; the number of
    experts the V2 router dict states beside its gate, as found, else None)."""
    if rel.endswith(".safetensors"):
        tensors = ctx.read_safetensors(rel)
        if tensors is None:
            return None, None
        return {(layout.router_key(k) or k): t for k, t in tensors.items()}, None
    info = ctx.read_torch(rel)
    if info is None:
        return None, None
    obj = info.obj
    meta = {}
    if isinstance(obj, dict) and isinstance(obj.get("gate_state_dict"), dict):
        meta = {k: v for k, v in obj.items() if k != "gate_state_dict"}
        obj = {f"gate.{k}": v for k, v in obj["gate_state_dict"].items()}
    flat = torchsave.flatten_tensors(obj) if isinstance(obj, dict) else {}
    out = {(layout.router_key(k) or k): Tensor(v.dtype, tuple(v.shape)) for k, v in flat.items()}
    return out, meta.get("num_experts")


def _pickle_check_of(name: str) -> bool | frozenset[str]:
    """How the pickle of a Trainer state file is judged (``inspect_torch_file``'s
    ``check_pickle``): as ``torch.load(weights_only=True)`` would, with what the Trainer allows
    besides for its RNG state, or not at all for ``training_args.bin``."""
    if layout.is_rng_state_name(name):
        return torchsave.TRAINER_RNG_GLOBALS
    return not layout.never_unpickle(name)


def _lenient_safetensors_names(ctx: _Ctx, relpath: str) -> dict[str, Tensor]:
    """Tensor names of a safetensors file whose data is damaged but whose header parses.

    Used only to name the layout of a broken merged file; never to trust it.
    """
    path = ctx.abspath(relpath)
    try:
        read_at = size = None
        if ctx.storage is not None:
            size, read_at = ctx.storage.reader(path, ctx.size_hint(relpath))
        # a FIFO or device is refused
        data, _ = st.read_header_bytes(path, file_size=size, read_at=read_at)
    except (OSError, FormatError):
        return {}
    unknown = Tensor("?", ())
    return dict.fromkeys(st.lenient_names(data), unknown)


def _merged_keys(ctx: _Ctx, merged: list[str]) -> tuple[dict[str, Tensor], bool]:
    """Keys (with shapes where known) of the merged weights; False when unreadable or when an
    index disagrees with its shards."""
    keys: dict[str, Tensor] = {}
    ok = True
    read: dict[str, dict[str, Tensor] | None] = {}
    for m in merged:
        if ctx.roles[m].role is not Role.MERGED or not ctx.readable(m, False):
            continue
        tensors = read[m] = ctx.read_tensors(m)
        if tensors is None:
            ok = False
            tensors = _lenient_safetensors_names(ctx, m) if m.endswith(".safetensors") else {}
        bad = _bad_expert_indices(ctx, m, tensors)
        if bad:
            tensors = {k: t for k, t in tensors.items() if k not in bad}
        keys.update(tensors)
    for idx in (m for m in merged if ctx.roles[m].role is Role.MERGED_INDEX):
        if not ctx.readable(idx, False):
            continue
        cfg = ctx.read_json(idx)
        if cfg is None:
            ok = False
            continue
        check = shard_index.check_shard_index(
            idx, cfg, {rel: read[rel] for rel in shard_index.shards_of(idx, cfg) if rel in read},
            ctx.by_path.__contains__, (m for m in merged if ctx.roles[m].role is Role.MERGED))
        for finding in check.problems:
            ctx.add(*finding)
            ok = ok and finding.severity != ERROR
    return keys, ok


def _bad_expert_indices(ctx: _Ctx, relpath: str, tensors: dict[str, Tensor]) -> frozenset[str]:
    """The tensor names whose expert index is out of range, each a problem on the file."""
    bad = set()
    for key in tensors:
        if ".expert_" in key:
            try:
                layout.parse_moe_lora_key(key)
            except layout.BadIndex as exc:
                bad.add(key)
                ctx.add(EXPERT_COUNT_MISMATCH, relpath, str(exc))
    return frozenset(bad)


def _check_merged_content(ctx: _Ctx, merged: list[str], tree_form: str, router_rel: str | None,
                          moe_dir: str) -> None:
    """Deep mode: the LoRA and router tensors of the merged weights must equal the PEFT
    tree's (prune's content proof, without its rule on symlinks)."""
    from ..prune.proof import ContentProof
    failure = ContentProof(cache=ctx.cache).check(ctx.ckpt, merged, tree_form=tree_form,
                                                  router=router_rel, moe_dir=moe_dir,
                                                  own_tree=False)
    if failure is not None and failure.mismatch:
        shown = next((m for m in merged if ctx.roles[m].role is Role.MERGED), merged[0])
        ctx.add(MERGED_MISMATCH, shown, failure.reason)


def _adopt_parent_moe_state(ctx: _Ctx) -> str:
    """best_model/ keeps its dylo_moe_state/ in the run directory.

    Returns the relative directory where this checkpoint's MoE state lives.
    """
    own = layout.MOE_STATE_DIR
    if ctx.ckpt.name != layout.BEST_MODEL_DIR or any(
            p.startswith(own + "/") for p in ctx.by_path):
        return own
    parent = os.path.join(os.path.dirname(ctx.base), own)
    try:
        entries = ctx.scandir(parent)
    except OSError:
        return own
    for e in entries:
        try:
            if not e.is_file(follow_symlinks=False):
                continue
            stt = e.stat(follow_symlinks=False)
        except OSError:
            continue
        rel = f"{layout.PARENT_DIR}/{own}/{e.name}"
        ctx.by_path[rel] = FileRecord(relpath=rel, size=stt.st_size, allocated=stt.st_blocks * 512,
                                      dev=stt.st_dev, ino=stt.st_ino, nlink=stt.st_nlink,
                                      mtime_ns=stt.st_mtime_ns)
    ctx.reshape()
    return f"{layout.PARENT_DIR}/{own}"


def validate_checkpoint(ckpt: CheckpointDir, *, level: str = HEADERS, min_age_s: float = 3600,
                        now: float | None = None, cache: ReadCache | None = None,
                        storage: ObjectStorage | None = None) -> Verdict:
    """Validate one checkpoint directory and classify it.

    ``cache``: the scan's ``ReadCache``, or None to read and judge every file afresh; the
    verdict is the same either way. ``storage``: the object storage ``ckpt`` was listed from
    (``storage.walk``), None for a local directory."""
    now = time.time() if now is None else now
    ctx = _Ctx(ckpt, level, cache, storage)
    # At 'headers' level a checkpoint's findings are a pure function of its signature and
    # what its files' reads returned (``replay``): a checkpoint whose reads return the very
    # objects an earlier one's did is concluded from that one's findings, after reading
    # every one of its own files again. best_model/ reads its parent's MoE state: not replayed.
    # In a bucket every read is a round trip: a replay that missed would have paid for each
    # file twice, so a checkpoint there is always examined afresh (one read per file).
    memo = (cache is not None and storage is None and level == HEADERS
            and ckpt.name != layout.BEST_MODEL_DIR)
    replayed = replay.replay(ctx, cache) if memo else None
    if replayed is not None:
        found, problems = replayed
        for code, rel, message, severity in problems:
            ctx.add(code, rel, message, severity)
    else:
        if memo:
            ctx.trace = []
        found = _examine(ctx)
        if memo and ctx.trace is not None:
            replay.remember(ctx, cache, ctx.trace, found, tuple(ctx.raw))
    if layout.step_out_of_range(ckpt.name):  # not part of the replay's signature: added here
        ctx.add(BAD_NAME, ".", f"the step in its name has more than {layout.MAX_STEP_DIGITS} "
                               "digits: the step is unknown", WARNING)
    judge_strip_marker(ctx)   # ckpt-tools' own bookkeeping: outside the replay's signature too
    return _conclude(ctx, found, now, min_age_s)


def _conclude(ctx: _Ctx, f: _Found, now: float, min_age_s: float) -> Verdict:
    ckpt = ctx.ckpt
    young = ckpt.newest_mtime_ns > (now - min_age_s) * 1e9
    merged = f.merged
    writing = _being_written(ckpt, young, ctx.shape.holds_temporary, ctx.storage)
    if writing:
        status = IN_PROGRESS
        # half-written is expected while it is written: say what is missing, as warnings
        ctx.problems = [Problem(p.code, p.path, p.message, WARNING) for p in ctx.problems]
        ctx.add(IN_PROGRESS_CODE, ".", writing, WARNING)
    elif any(p.is_error for p in ctx.problems):
        status = BROKEN
    elif f.model_kind is not ModelKind.DYLORA_MOE:
        status = HEALTHY if f.found_anything else BROKEN
        if not f.found_anything:
            ctx.add(MISSING_FILE, ".", NOTHING_FOUND)
    elif f.tree_complete:
        status = REDUNDANT if merged and not f.merged_export else HEALTHY
    elif merged:
        status = LEGACY
    elif f.tree_form == layout.TREE_FLAT and f.experts and f.router_ok:
        status = HEALTHY
    else:
        status = BROKEN
        ctx.add(MISSING_FILE, ".", "neither a complete PEFT tree nor merged weights")
    facts = f.verdict_facts(young)
    return Verdict(layout=f.layout, status=status, problems=tuple(ctx.problems), tree_form=f.tree_form,
                   merged_kind=f.merged_kind, merged_files=merged, num_experts=f.num_experts,
                   tree_complete=f.tree_complete, facts=facts, model_kind=f.model_kind)


def _being_written(ckpt: CheckpointDir, young: bool, holds_temporary: bool,
                   storage: ObjectStorage | None) -> str | None:
    """Why the checkpoint is in progress, or None where it is complete.

    A ``tmp-checkpoint-*`` (or migrate's temporary) directory always is, and so is one holding
    a temporary entry of ckpt-tools' own. The Trainer writes ``trainer_state.json`` last, so a
    ``checkpoint-N`` whose trainer_state.json parses and names step N is complete whatever its
    age, and so is a tree migrate finished (its marker is written last). Anything else younger
    than the minimum age may still be being written.
    """
    if ckpt.tmp_name:
        if ckpt.name.startswith(layout.TMP_CHECKPOINT_PREFIX):
            return ("being written: the Trainer saves into tmp-checkpoint-* and renames it "
                    "checkpoint-<step> once complete; if no run is writing it, an interrupted save "
                    "left it: rename it to checkpoint-<step> to have it judged")
        return "being written: a temporary directory of ckpt-tools (migrate, the Trainer callback)"
    if holds_temporary:
        return "being written: it holds a temporary entry of ckpt-tools"
    if not young or _complete_when_young(ckpt, storage):
        return None
    state = ("its trainer_state.json does not name its step" if ckpt.file(layout.TRAINER_STATE_JSON)
             else "it has no trainer_state.json, which the Trainer writes last")
    return (f"may still be being written: a file of it is younger than --min-age and {state}; "
            "to judge it as it is now, give --min-age 0")


def _complete_when_young(ckpt: CheckpointDir, storage: ObjectStorage | None) -> bool:
    if ckpt.file(layout.MIGRATED_MARKER) is not None:
        return True
    return trainer_state.names_its_step(ckpt, storage)


class _Configs(NamedTuple):
    """The checkpoint's configs, as read (None where missing or unreadable)."""

    root: dict | None
    moe: dict | None
    moe_dir: str          # relpath of dylo_moe_state/ (the run's for best_model/)
    moe_rel: str          # relpath of the MoE config in it
    dylora_root: bool     # the root config is a DyLoRA-MoE config


class _MergedWeights(NamedTuple):
    files: tuple[str, ...]            # merged-weight files and their indexes
    kind: MergedKind | None           # None where there are none
    tensors: dict[str, Tensor]        # every tensor name with its shape, where readable


class _RouterState(NamedTuple):
    rel: str | None                   # relpath of the router state, where one is expected
    shapes: dict[str, Tensor] | None  # gate.weight / gate.bias, where it could be read
    says: object                      # the expert count a V2 router dict states beside its gate


def _examine(ctx: _Ctx) -> _Found:
    """Every check of the checkpoint; what it found, its problems in ``ctx``. The steps read
    the files in this order, which a replay recipe records (``ckpt_tools.replay``)."""
    _check_entries(ctx)
    merged_files = tuple(ctx.shape.merged)  # before the run's MoE state is adopted
    cfgs = _read_configs(ctx)
    tree_form = _tree_form(ctx)
    merged = _read_merged(ctx, merged_files)
    if not _is_dylora(ctx, tree_form, cfgs, merged):
        return _examine_ordinary(ctx, cfgs, merged)
    experts = _read_experts(ctx, tree_form, cfgs)
    router = _read_moe_state(ctx, tree_form, cfgs)
    router_rows = _router_rows(ctx, tree_form, merged, router)
    num_experts = _count_experts(ctx, tree_form, cfgs, merged, experts, router, router_rows)
    hashes = _check_other_files(ctx)
    router_ok = router.shapes is not None and router_rows is not None
    tree_complete, merged_export = _judge_tree(ctx, tree_form, cfgs, merged, experts, router,
                                               router_ok, num_experts)
    return _Found(layout=_layout_of(tree_form, merged, cfgs), tree_form=tree_form,
                  merged_kind=merged.kind, merged=merged.files, num_experts=num_experts,
                  tree_complete=tree_complete, merged_export=merged_export,
                  experts=tuple(sorted(experts)), router_ok=router_ok, router=router.rel,
                  root_cfg=cfgs.root, moe_cfg=cfgs.moe, moe_dir=cfgs.moe_dir, hashes=hashes)


# Files only a DyLoRA-MoE checkpoint holds.
_DYLORA_ROLES = frozenset({Role.ROUTER, Role.SKILL_LIBRARY, Role.MOE_CONFIG, Role.TRAINABLE_STATE,
                           Role.FLAT_EXPERT})


def _is_dylora(ctx: _Ctx, tree_form: TreeForm, cfgs: _Configs, merged: _MergedWeights) -> bool:
    """Whether something says the checkpoint is DyLoRA-MoE's: its PEFT tree or MoE state, a
    DyLoRA config, merged weights with DyLoRA keys, or a best_model/ beside DyLoRA checkpoints.
    A plain model directory with none of these is a full model, not a merged export."""
    if tree_form != layout.TREE_NONE or cfgs.dylora_root or merged.kind in _MOE_MERGED:
        return True
    if any(r.role in _DYLORA_ROLES for r in ctx.roles.values()):
        return True
    if any(m.rsplit("/", 1)[-1] == layout.DYLORA_WEIGHTS for m in merged.files):
        return True
    return ctx.ckpt.name == layout.BEST_MODEL_DIR and _beside_dylora_checkpoints(ctx)


def _beside_dylora_checkpoints(ctx: _Ctx) -> bool:
    """A best_model/ whose run holds a dylo_moe_state/ or DyLoRA-MoE checkpoints."""
    run = os.path.dirname(ctx.base)
    if ctx.isdir(os.path.join(run, layout.MOE_STATE_DIR)):
        return True
    try:
        siblings = [e.path for e in ctx.scandir(run)
                    if layout.checkpoint_step(e.name) is not None and e.is_dir(follow_symlinks=False)]
    except OSError:
        return False
    return any(ctx.isdir(os.path.join(p, d)) for p in siblings[:64]
               for d in (layout.PEFT_DIR, layout.MOE_STATE_DIR))


def _examine_ordinary(ctx: _Ctx, cfgs: _Configs, merged: _MergedWeights) -> _Found:
    """An ordinary Trainer checkpoint: PEFT adapters, a full model, DeepSpeed/FSDP state."""
    found = examine_ordinary(ctx, cfgs.root, merged.files)
    hashes = _check_other_files(ctx)
    return _Found(layout=found.layout, tree_form=layout.TREE_NONE, merged_kind=merged.kind,
                  merged=merged.files, num_experts=None, tree_complete=False, merged_export=False,
                  experts=(), router_ok=False, router=None, root_cfg=cfgs.root, moe_cfg=None,
                  moe_dir=cfgs.moe_dir, hashes=hashes, model_kind=found.model_kind,
                  adapters=found.adapters, found_anything=found.found_anything)


def _check_entries(ctx: _Ctx) -> None:
    """What the scan saw without opening a file: entries it could not read, symlinks out of
    the root (a PEFT-tree file that points out of it is never opened), names with an expert
    index out of range."""
    for rel in ctx.ckpt.unreadable:
        ctx.add(PERMISSION_DENIED, rel, "cannot read this entry")
    for rec in ctx.ckpt.files:
        if rec.is_symlink and rec.escapes_root:
            in_tree = ctx.roles[rec.relpath].holds_model
            ctx.add(SYMLINK_ESCAPE, rec.relpath,
                    f"symlink to {rec.symlink_target or 'a missing target'} outside the root",
                    ERROR if in_tree else WARNING)
    for rel in ctx.shape.bad_indices:
        ctx.add(EXPERT_COUNT_MISMATCH, rel, f"its name holds an expert index beyond the "
                                            f"{layout.MAX_EXPERTS} experts a checkpoint may have")


def _read_configs(ctx: _Ctx) -> _Configs:
    """The root config and the MoE config (best_model/: the run's MoE state)."""
    root_cfg = None
    if layout.ROOT_CONFIG in ctx.by_path and ctx.readable(layout.ROOT_CONFIG, False):
        root_cfg = ctx.read_json(layout.ROOT_CONFIG)
    moe_dir = _adopt_parent_moe_state(ctx)
    moe_rel = f"{moe_dir}/{layout.MOE_CONFIG}"
    moe_cfg = None
    if moe_rel in ctx.by_path and ctx.readable(moe_rel, True):
        moe_cfg = ctx.read_json(moe_rel)
    return _Configs(root_cfg, moe_cfg, moe_dir, moe_rel, layout.is_dylora_config(root_cfg))


def _read_merged(ctx: _Ctx, files: tuple[str, ...]) -> _MergedWeights:
    """The merged weights' tensor names and whose keys they are."""
    if not files:
        return _MergedWeights(files, None, {})
    tensors, ok = _merged_keys(ctx, list(files))
    kind = layout.merged_key_kind(tensors) if tensors else MergedKind.UNREADABLE
    if not ok:
        tensors = {k: t for k, t in tensors.items() if t.dtype != "?"}
    return _MergedWeights(files, kind, tensors)


def _read_experts(ctx: _Ctx, tree_form: TreeForm, cfgs: _Configs) -> dict[int, ExpertInfo]:
    """The PEFT tree's experts, each checked against its config and against the others."""
    if tree_form == layout.TREE_CANONICAL:
        experts = _load_dir_experts(ctx, nested=False)
    elif tree_form == layout.TREE_NESTED:
        experts = _load_dir_experts(ctx, nested=True)
    elif tree_form == layout.TREE_FLAT:
        experts = _load_flat_experts(ctx)
    else:
        experts = {}
    cfg_for_r = cfgs.moe or (cfgs.root if cfgs.dylora_root else None)
    default_r = _count(layout.first_key(cfg_for_r, layout.LORA_R_KEYS))
    for ex in experts.values():
        r = default_r if ex.config is None else None
        _memoised(ctx, ("shapes", id(ex.modules), id(ex.config), r, ex.source, ex.loaded),
                  (ex.modules, ex.config), lambda rec: _check_expert_shapes(rec, ex, r))
    key = ("compare",) + tuple((i, id(e.modules), id(e.config), e.loaded, e.source, e.config_path)
                               for i, e in sorted(experts.items()))
    _memoised(ctx, key, [(e.modules, e.config) for e in experts.values()],
              lambda rec: _compare_experts(rec, experts))
    return experts


def _read_moe_state(ctx: _Ctx, tree_form: TreeForm, cfgs: _Configs) -> _RouterState:
    """The router state, the skill library and the callback's resume file. No MoE config
    is demanded: where the experts' adapter configs record the hyperparameters the tree is
    complete without one (README's rule; ``_judge_tree`` asks for some config)."""
    moe_dir = cfgs.moe_dir
    router_rel = None
    router: dict | None = None
    router_says = None
    if tree_form == layout.TREE_NESTED or layout.ROUTER_SAFETENSORS in ctx.by_path:
        router_rel = layout.ROUTER_SAFETENSORS
    if f"{moe_dir}/{layout.ROUTER_PT}" in ctx.by_path:
        router_rel = f"{moe_dir}/{layout.ROUTER_PT}"
    if router_rel is None and tree_form != layout.TREE_NONE:
        router_rel = (layout.ROUTER_SAFETENSORS if tree_form == layout.TREE_NESTED
                      else f"{moe_dir}/{layout.ROUTER_PT}")
    if router_rel is not None:
        if router_rel not in ctx.by_path:
            if tree_form != layout.TREE_NONE:
                ctx.add(MISSING_FILE, router_rel, "the router state is missing")
        elif ctx.readable(router_rel, True):
            router, router_says = _router_shapes(ctx, router_rel)
            if router is not None and layout.GATE_WEIGHT not in router:
                ctx.add(MISSING_TENSOR, router_rel, f"no {layout.GATE_WEIGHT} in the router state")
    skill = f"{moe_dir}/{layout.SKILL_LIBRARY}"
    if skill in ctx.by_path and ctx.readable(skill, True):
        ctx.read_torch(skill)
    # the callback's resume file: part of the PEFT tree (never merged weights), checked by its header
    if layout.TRAINABLE_STATE in ctx.by_path and ctx.readable(layout.TRAINABLE_STATE, True):
        ctx.read_safetensors(layout.TRAINABLE_STATE)
    return _RouterState(router_rel, router, router_says)


def _router_rows(ctx: _Ctx, tree_form: TreeForm, merged: _MergedWeights,
                 router: _RouterState) -> int | None:
    """The expert count the router's gate.weight has rows for (the merged weights' router
    where there is no PEFT tree); its shape and gate.bias's checked."""
    rows = None
    shapes = router.shapes
    if shapes and isinstance(shapes.get(layout.GATE_WEIGHT), Tensor):
        gw = shapes[layout.GATE_WEIGHT]
        if len(gw.shape) == 2:
            rows = _expert_count(ctx, router.rel, gw.shape[0], _ROUTER_ROWS)
        else:
            ctx.add(SHAPE_MISMATCH, router.rel, f"gate.weight has shape {list(gw.shape)}, expected [E, H]")
        gb = shapes.get(layout.GATE_BIAS)
        if isinstance(gb, Tensor) and rows is not None and gb.shape != (rows,):
            ctx.add(SHAPE_MISMATCH, router.rel,
                    f"gate.bias has shape {list(gb.shape)}, expected [{rows}]")
    if merged.kind in _MOE_MERGED:
        gw = merged.tensors.get(layout.ROUTER_KEY_PREFIX + layout.GATE_WEIGHT)
        if gw is not None and len(gw.shape) == 2 and rows is None and tree_form == layout.TREE_NONE:
            rows = _expert_count(ctx, merged.files[0], gw.shape[0], _ROUTER_ROWS)
    return rows


def _count_experts(ctx: _Ctx, tree_form: TreeForm, cfgs: _Configs, merged: _MergedWeights,
                   experts: dict[int, ExpertInfo], router: _RouterState,
                   router_rows: int | None) -> int | None:
    """The expert count: as the configs and the router declare it (they must agree), else
    the router's rows, else the experts present; experts missing or beyond it reported."""
    declared = [(cfgs.moe_rel, _expert_count(ctx, cfgs.moe_rel,
                                             layout.first_key(cfgs.moe, layout.NUM_EXPERTS_KEYS)))]
    declared.append((layout.ROOT_CONFIG, _expert_count(
        ctx, layout.ROOT_CONFIG, layout.first_key(cfgs.root, layout.NUM_EXPERTS_KEYS))))
    if router.shapes is not None:
        declared.append((router.rel, _expert_count(ctx, router.rel, router.says)))
    declared = [(p, n) for p, n in declared if n is not None]
    present = set(experts)
    if merged.kind in _MOE_MERGED and tree_form == layout.TREE_NONE:
        for key in merged.tensors:
            lk = layout.parse_moe_lora_key(key)  # out-of-range indices were dropped: _merged_keys
            if lk is not None:
                present.add(lk.expert)
    num_experts = None
    if declared:
        num_experts = declared[0][1]
        for p, n in declared[1:]:
            if n != num_experts:
                ctx.add(EXPERT_COUNT_MISMATCH, p,
                        f"says {n} experts, {declared[0][0]} says {num_experts}")
    elif router_rows is not None:
        num_experts = router_rows
    elif present:
        num_experts = max(present) + 1
        if tree_form != layout.TREE_NONE:
            ctx.add(COUNT_UNCONFIRMED, layout.PEFT_DIR,
                    f"no config or router states the expert count; assuming {num_experts}", WARNING)
    if num_experts is None:
        return None
    # at most layout.MAX_EXPERTS from here
    if router_rows is not None and router_rows != num_experts:
        if declared:
            ctx.add(EXPERT_COUNT_MISMATCH, declared[0][0],
                    f"says {num_experts} experts but the router has {router_rows} rows")
        else:
            ctx.add(EXPERT_COUNT_MISMATCH, router.rel,
                    f"router has {router_rows} rows for {num_experts} experts")
    if tree_form != layout.TREE_NONE or merged.kind in _MOE_MERGED:
        _report_missing_experts(ctx, [i for i in range(num_experts) if i not in present],
                                num_experts, tree_form, merged.files)
    extra = sorted(i for i in present if i >= num_experts)
    if extra:
        ctx.add(EXPERT_COUNT_MISMATCH, layout.PEFT_DIR,
                f"expert(s) {_ranges(extra)} beyond the {num_experts} declared")
    return num_experts


def _check_other_files(ctx: _Ctx) -> dict | None:
    """Files outside the PEFT tree: at 'full' level the archive structure and pickle of each
    Trainer state file; at 'deep' every tensor read (the content hash per file returned)."""
    if ctx.level in (FULL, DEEP):
        for rel, role in sorted(ctx.roles.items()):
            if role.role in (Role.TRAINER_STATE, Role.TRAINING_ARGS) and rel.endswith((".pt", ".pth", ".bin")):
                if ctx.readable(rel, False):
                    ctx.read_torch(rel, check_pickle=_pickle_check_of(rel.rsplit("/", 1)[-1]))
            elif role.role is Role.ENGINE_STATE and rel.endswith(".pt") and ctx.readable(rel, False):
                # DeepSpeed's states pickle its own classes: the archive is checked, never the pickle
                ctx.read_torch(rel, check_pickle=False)
            elif role.role in (Role.TRAINER_STATE,) and rel.endswith(".json") and ctx.readable(rel, False):
                ctx.read_json(rel)
    if ctx.level == DEEP:
        from ..deep import deep_check
        return deep_check(ctx)
    return None


def _judge_tree(ctx: _Ctx, tree_form: TreeForm, cfgs: _Configs, merged: _MergedWeights,
                experts: dict[int, ExpertInfo], router: _RouterState, router_ok: bool,
                num_experts: int | None) -> tuple[bool, bool]:
    """(whether the PEFT tree is complete, whether the merged weights beside it are a
    merged export); at 'deep' level a complete tree's merged weights compared with it."""
    tree_errors = [p for p in ctx.problems if p.is_error]
    has_config = (cfgs.moe is not None or cfgs.dylora_root
                  or (tree_form in (layout.TREE_CANONICAL, layout.TREE_NESTED)
                      and all(e.config is not None for e in experts.values())))
    if tree_form == layout.TREE_FLAT:
        # expert_<i>.pt files record no hyperparameters: once the merged weights are gone,
        # only a config saying lora_alpha would (r comes from the shapes)
        has_config = any(_finite(layout.first_key(cfg, layout.LORA_ALPHA_KEYS))
                         for cfg in (cfgs.moe, cfgs.root if cfgs.dylora_root else None))
    tree_complete = (tree_form != layout.TREE_NONE and bool(experts) and router_ok
                     and num_experts is not None and not tree_errors and has_config)
    files = list(merged.files)
    # A complete tree beside merged weights that hold no DyLoRA LoRA tensor (a truly merged
    # export): nothing to prove the tree by, and the export is no copy of it: not redundant.
    merged_export = (tree_complete and bool(files) and merged.kind != MergedKind.UNREADABLE
                     and not any(".lora_" in k and layout.parse_moe_lora_key(k)
                                 for k in merged.tensors))
    if merged_export:
        shown = next((m for m in files if ctx.roles[m].role is Role.MERGED), files[0])
        ctx.add(MERGED_EXPORT, shown, f"{shown.rsplit('/', 1)[-1]} holds no LoRA tensors: a merged "
                "export beside the PEFT tree, kept (not redundant)", WARNING)
    elif ctx.level == DEEP and tree_complete and files and not any(p.is_error for p in ctx.problems):
        _check_merged_content(ctx, files, tree_form, router.rel, cfgs.moe_dir)
    if tree_form == layout.TREE_FLAT and not has_config and files:
        ctx.add(BAD_CONFIG, layout.PEFT_DIR,
                "expert_<i>.pt files with no config recording lora_alpha or the base model: "
                "migrate this checkpoint before removing its merged weights", WARNING)
    return tree_complete, merged_export


def _layout_of(tree_form: TreeForm, merged: _MergedWeights, cfgs: _Configs) -> Layout:
    """Which variant of SPEC §3 the checkpoint is laid out as."""
    if layout.is_hf_model_config(cfgs.root) and tree_form == layout.TREE_NONE and merged.files:
        return layout.HF_MERGED
    if merged.kind == MergedKind.UNREADABLE:  # named as if it held V1 keys, when there is a tree
        if tree_form == layout.TREE_NONE:
            return layout.UNKNOWN
        return layout.layout_label(tree_form, MergedKind.V1, cfgs.dylora_root)
    return layout.layout_label(tree_form, merged.kind, cfgs.dylora_root)

