"""The PEFT tree's checks: adapter configs, each expert's tensors against its config, the
experts against each other, the expert count and the experts missing."""

from __future__ import annotations

from .. import layout, peft_types
from ..kinds import TreeForm
from ..patterns import ModuleMatch, PatternTooCostly, match_modules
from ..problems import (BAD_CONFIG, EXPERT_COUNT_MISMATCH, EXPERT_MISSING, MISSING_FILE,
                        MISSING_TENSOR, RANK_MISMATCH, SHAPE_MISMATCH, TARGET_MISMATCH)
from .context import _Ctx, _count, _memoised, _short
from .verdict import DEEP, ExpertInfo, Tensor


_ROUTER_ROWS = "the router's gate.weight has rows for"


def _expert_count(ctx: _Ctx, relpath: str, value, what: str = "says") -> int | None:
    """The number of experts a file states (a positive integer), else None. A number above
    ``layout.MAX_EXPERTS`` is a problem on that file, and no count: every check after it
    then costs what the checkpoint's files cost, not what a number in them claims."""
    n = _count(value)
    if n is not None and n > layout.MAX_EXPERTS:
        ctx.add(EXPERT_COUNT_MISMATCH, relpath, f"{what} {_short(n)} experts; a checkpoint may "
                                                f"have at most {layout.MAX_EXPERTS}")
        return None
    return n


def _ranges(indices: list[int], most: int = 8) -> str:
    """Sorted indices as ranges: ``0-3, 5, 7-9``; past ``most`` ranges, how many more."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and i == runs[-1][1] + 1:
            runs[-1][1] = i
        else:
            runs.append([i, i])
    shown = ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in runs[:most])
    if len(runs) > most:
        shown += f" and {sum(b - a + 1 for a, b in runs[most:])} more"
    return shown


def _report_missing_experts(ctx: _Ctx, missing: list[int], num_experts: int,
                            tree_form: TreeForm, merged: tuple[str, ...]) -> None:
    """One problem for every expert missing: on the expert's own path when it is one, on
    the PEFT tree (or the merged file) with their ranges when they are several."""
    if not missing:
        return
    if tree_form == layout.TREE_NONE:
        where = merged[0] if merged else "."
    elif len(missing) > 1:
        where = layout.PEFT_DIR
    elif tree_form == layout.TREE_FLAT:
        where = f"{layout.PEFT_DIR}/{layout.EXPERT_DIR_PREFIX}{missing[0]}.pt"
    else:
        where = f"{layout.PEFT_DIR}/{layout.EXPERT_DIR_PREFIX}{missing[0]}"
    if len(missing) == 1:
        link = ctx.by_path.get(where)
        why = (" (it is a symlink; links to directories are not followed: their files "
               "are not this checkpoint's own)" if link is not None and link.is_symlink else "")
        ctx.add(EXPERT_MISSING, where, f"expert {missing[0]} of {num_experts} is missing{why}")
    else:
        ctx.add(EXPERT_MISSING, where, f"{len(missing)} of {num_experts} experts are missing: "
                                       f"{_ranges(missing)}")


# --- adapter configs -------------------------------------------------------------

def _check_adapter_config(ctx: _Ctx, relpath: str, cfg: dict) -> bool:
    """The fields of adapter_config.json that decide shapes and scaling. True when usable."""
    found = peft_types.check_adapter_config(cfg, require_type="LORA")
    for message in found.messages:
        ctx.add(BAD_CONFIG, relpath, message)
    return found.ok


def _check_with_peft(ctx: _Ctx, relpath: str, cfg: dict) -> None:
    refusal = peft_types.check_with_peft(cfg, require_type="LORA")
    if refusal is not None:
        ctx.add(BAD_CONFIG, relpath, refusal)


# --- the PEFT tree ----------------------------------------------------------------

def _expert_modules(ctx: _Ctx, relpath: str, tensors: dict[str, Tensor], peft_keys: bool,
                    expert: int) -> dict[str, dict[str, Tensor]]:
    """module → part → tensor of one expert's file; ``peft_keys``: PEFT's own key form (no
    expert index), else the expert-indexed form, whose other experts' tensors are problems.
    Modules are named by their path in the model (``layout.module_path``), so that the experts
    of a checkpoint compare alike whichever form each file was saved in."""
    modules: dict[str, dict[str, Tensor]] = {}
    for key, t in tensors.items():
        try:
            lk = layout.parse_peft_lora_key(key) if peft_keys else layout.parse_moe_lora_key(key)
        except layout.BadIndex as exc:
            ctx.add(EXPERT_COUNT_MISMATCH, relpath, str(exc))
            continue
        if lk is None:
            continue
        if not peft_keys and lk.expert != expert:
            ctx.add(EXPERT_COUNT_MISMATCH, relpath,
                    f"holds tensor {key!r} of expert {lk.expert}, not expert {expert}")
            continue
        part = lk.part + (f".{lk.param}" if lk.param and lk.param != "weight" else "")
        modules.setdefault(layout.module_path(lk.module), {})[part] = t
    return modules


def _module_matches(ctx: _Ctx, ex: ExpertInfo) -> dict[str, ModuleMatch] | None:
    """How the expert's config patterns apply to its modules; None (and a problem on the
    config) when a regular expression among them is too costly to evaluate."""
    cfg = ex.config
    if cfg is None:
        return None
    modules = tuple(sorted(ex.modules))
    # keyed without the expert: the experts of a checkpoint share one parsed config
    found = _memoised(ctx, ("patterns", id(cfg), modules), cfg, lambda _: _matches_or_refusal(
        cfg, modules))
    if isinstance(found, PatternTooCostly):
        ctx.add(BAD_CONFIG, ex.config_path, str(found))
        return None
    return found


def _matches_or_refusal(cfg: dict, modules: tuple[str, ...]):
    try:
        return match_modules(cfg.get("target_modules"), cfg.get("rank_pattern"),
                             cfg.get("alpha_pattern"), modules)
    except PatternTooCostly as exc:
        return exc


def _check_expert_shapes(ctx: _Ctx, ex: ExpertInfo, default_r: int | None) -> None:
    cfg = ex.config or {}
    matches = _module_matches(ctx, ex)
    rank_pattern = cfg.get("rank_pattern")
    for module, parts in sorted(ex.modules.items()):
        a, b = parts.get("lora_A"), parts.get("lora_B")
        if a is None or b is None:
            missing = "lora_A" if a is None else "lora_B"
            ctx.add(MISSING_TENSOR, ex.source, f"{module}: {missing} is missing")
            continue
        if len(a.shape) != 2 or len(b.shape) != 2:
            # conv LoRA and embeddings are not what DyLoRA-MoE trains; only check the rank dims
            if not a.shape or not b.shape:
                ctx.add(SHAPE_MISMATCH, ex.source, f"{module}: scalar LoRA tensor")
            continue
        if a.shape[0] != b.shape[1]:
            ctx.add(RANK_MISMATCH, ex.source,
                    f"{module}: lora_A has rank {a.shape[0]} but lora_B has rank {b.shape[1]}")
            continue
        match = None if matches is None else matches[module]
        if ex.config is not None and match is None:
            continue  # the config's patterns could not be evaluated: a problem already
        expected = ((match and match.rank_key and rank_pattern[match.rank_key])
                    or cfg.get("r") or default_r)
        if isinstance(expected, int) and not isinstance(expected, bool) and a.shape[0] != expected:
            ctx.add(RANK_MISMATCH, ex.source,
                    f"{module}: rank {a.shape[0]} but the adapter config says r={expected}")
        if match is not None and not match.targeted:
            ctx.add(TARGET_MISMATCH, ex.source,
                    f"{module} is not among the adapter config's target_modules")


def _target_set(cfg: dict | None):
    targets = (cfg or {}).get("target_modules")
    if isinstance(targets, list):
        return frozenset(targets)
    return targets


def _shown_targets(targets) -> str:
    """target_modules for a message: a list sorted, a regular expression quoted, cut short."""
    return _short(sorted(targets) if isinstance(targets, frozenset) else targets)


def _compare_experts(ctx: _Ctx, experts: dict[int, ExpertInfo]) -> None:
    """All experts must adapt the same modules with the same in/out features."""
    configured = {i: e for i, e in experts.items() if e.config is not None}
    if len(configured) > 1:
        ref_idx = min(configured)
        ref_targets = _target_set(configured[ref_idx].config)
        for i, ex in sorted(configured.items()):
            if i != ref_idx and _target_set(ex.config) != ref_targets:
                ctx.add(TARGET_MISMATCH, ex.config_path,
                        f"target_modules {_shown_targets(_target_set(ex.config))} differ from "
                        f"expert {ref_idx}'s {_shown_targets(ref_targets)}")
    experts = {i: e for i, e in experts.items() if e.loaded and e.modules}
    if len(experts) < 2:
        return
    ref_idx = min(experts)
    ref = experts[ref_idx]
    for i, ex in sorted(experts.items()):
        if i == ref_idx:
            continue
        mine, theirs = set(ex.modules), set(ref.modules)
        if mine != theirs:
            extra, lacking = sorted(mine - theirs), sorted(theirs - mine)
            detail = []
            if lacking:
                detail.append(f"lacks {', '.join(lacking[:3])}{' …' if len(lacking) > 3 else ''}")
            if extra:
                detail.append(f"adds {', '.join(extra[:3])}{' …' if len(extra) > 3 else ''}")
            ctx.add(TARGET_MISMATCH, ex.source,
                    f"expert {i} covers other modules than expert {ref_idx}: {'; '.join(detail)}")
        for module in sorted(mine & theirs):
            a, ra = ex.modules[module].get("lora_A"), ref.modules[module].get("lora_A")
            b, rb = ex.modules[module].get("lora_B"), ref.modules[module].get("lora_B")
            if a and ra and len(a.shape) == 2 and len(ra.shape) == 2 and a.shape[1] != ra.shape[1]:
                ctx.add(SHAPE_MISMATCH, ex.source,
                        f"{module}: lora_A has {a.shape[1]} input features, expert {ref_idx} has {ra.shape[1]}")
            if b and rb and len(b.shape) == 2 and len(rb.shape) == 2 and b.shape[0] != rb.shape[0]:
                ctx.add(SHAPE_MISMATCH, ex.source,
                        f"{module}: lora_B has {b.shape[0]} output features, expert {ref_idx} has {rb.shape[0]}")


def _tree_form(ctx: _Ctx) -> TreeForm:
    return ctx.shape.tree_form


def _expert_dirs(ctx: _Ctx) -> dict[int, str]:
    """expert index → the directory (relative) that should hold its adapter files."""
    return dict(ctx.shape.expert_dirs)


def _load_dir_experts(ctx: _Ctx, nested: bool) -> dict[int, ExpertInfo]:
    experts: dict[int, ExpertInfo] = {}
    for index, d in ctx.shape.expert_dirs:
        if nested and d.count("/") == 1:
            d = f"{d}/{d.rsplit('/', 1)[1]}"
        cfg_rel = f"{d}/{layout.ADAPTER_CONFIG}"
        weights = [f"{d}/{n}" for n in (layout.ADAPTER_WEIGHTS, layout.ADAPTER_WEIGHTS_BIN)
                   if f"{d}/{n}" in ctx.by_path]
        cfg = None
        if cfg_rel not in ctx.by_path:
            ctx.add(MISSING_FILE, cfg_rel, f"expert {index} has no {layout.ADAPTER_CONFIG}")
        elif ctx.readable(cfg_rel, True):
            cfg = ctx.read_json(cfg_rel)
            if cfg is not None:
                # a pure function of the (shared, never mutated) parsed config
                if not _memoised(ctx, ("adapter-config", id(cfg), cfg_rel), cfg,
                                 lambda rec: _check_adapter_config(rec, cfg_rel, cfg)):
                    cfg = None
                elif ctx.level == DEEP:   # peft imports torch and transformers: seconds
                    _check_with_peft(ctx, cfg_rel, cfg)
        if not weights:
            ctx.add(MISSING_FILE, f"{d}/{layout.ADAPTER_WEIGHTS}",
                    f"expert {index} has no adapter weights")
            experts[index] = ExpertInfo(index, f"{d}/{layout.ADAPTER_WEIGHTS}", config=cfg,
                                        config_path=cfg_rel)
            continue
        ex = ExpertInfo(index, weights[0], config=cfg, config_path=cfg_rel)
        if ctx.readable(weights[0], True):
            tensors = ctx.read_tensors(weights[0])
            if tensors is not None:
                ex.loaded = True
                ex.modules = _memoised(
                    ctx, ("modules", id(tensors), weights[0]), tensors,
                    lambda rec: _expert_modules(rec, weights[0], tensors, True, index))
                if not ex.modules:
                    ctx.add(MISSING_TENSOR, weights[0], "holds no LoRA tensors")
        experts[index] = ex
    return experts


def _load_flat_experts(ctx: _Ctx) -> dict[int, ExpertInfo]:
    """The ``expert_<i>.pt`` files, in either key form (``layout.flat_expert_peft_form``)."""
    experts: dict[int, ExpertInfo] = {}
    for rel in ctx.shape.flat_experts:
        index = ctx.roles[rel].expert
        ex = ExpertInfo(index, rel)
        if ctx.readable(rel, True):
            tensors = ctx.read_tensors(rel)
            try:
                peft_form = tensors is not None and layout.flat_expert_peft_form(tensors)
            except layout.MixedKeyForms as exc:
                # whose tensors they are is a guess: one problem, no checks built on a guess
                ctx.add(EXPERT_COUNT_MISMATCH, rel, str(exc))
                tensors = None
            if tensors is not None:
                ex.loaded = True
                ex.modules = _expert_modules(ctx, rel, tensors, peft_form, index)
                if not ex.modules:
                    ctx.add(MISSING_TENSOR, rel, "holds no LoRA tensors")
        experts[index] = ex
    return experts
