"""A checkpoint in canonical form, in memory: the source view (``open_source``), the
``Conversion`` and its experts, and the copy, exact and SVD conversions (``build_conversion``).

Shared with ``loader.load_checkpoint``; nothing here writes a file. torch is imported only
inside the functions that read tensors.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from .. import canonical, layout, scanner
from ..layout import Role
from ..records import CheckpointDir
from ..tensor_bytes import group_moe_lora, group_peft_lora, group_router, lora_or_router_key
from ..validator import HEADERS, Verdict, VerdictFacts, validate_checkpoint
from ..errors import Wording
from .errors import CheckpointFailure, NothingToMigrate
from .hub import NotCached, cached_snapshot
from .hyper import (Hyperparameters, hyper_for, lora_config_for, moe_config_for, ranks_from_shapes,
                    resolve_hyper, root_config_for)
from .plan import (METHOD_COPY, METHOD_EXACT, METHOD_SVD, MigrateOptions, is_dylora_marked,
                   read_json)


@dataclass
class ExpertAdapter:
    """One expert: either tensors (canonical keys) plus LoraConfig kwargs, or PEFT's own files."""

    index: int
    config: dict                                   # LoraConfig keyword arguments / file content
    tensors: dict | None = None                    # canonical key -> torch.Tensor
    adapter_dir: str | None = None                 # a directory PEFT can load as is
    expected: dict | None = None                   # canonical key -> (dtype name, shape)

    @property
    def name(self) -> str:
        return f"{layout.EXPERT_DIR_PREFIX}{self.index}"


@dataclass
class Conversion:
    """A checkpoint in canonical form, in memory (tensors) or pointing at files to copy."""

    method: str
    layout: str
    num_experts: int
    experts: list[ExpertAdapter]
    router: dict                        # "gate.weight"/"gate.bias" -> tensor
    moe_config: dict
    root_config: dict
    skill_library: str | None           # absolute path of a file to carry, or None: write {}
    carried: list[tuple[str, str]]      # (absolute source path, relpath in the target)
    copy_tree: list[tuple[str, str]] = field(default_factory=list)   # files copied as is
    warnings: list[str] = field(default_factory=list)
    module_errors: dict = field(default_factory=dict)
    max_rel_error: float | None = 0.0
    lora_bytes: int = 0                 # bytes of tensor data extracted
    extraction: object | None = None    # extraction.Extraction for svd


def _is_canonical_root_config(cfg: dict | None) -> bool:
    return isinstance(cfg, dict) and cfg.get("model_type") == layout.DYLORA_MODEL_TYPE


@dataclass
class MigrateSource:
    """What migrate reads of one checkpoint."""

    abspath: str
    ckpt: CheckpointDir
    verdict: Verdict

    @property
    def facts(self) -> VerdictFacts:
        return self.verdict.facts

    def abs(self, rel: str) -> str:
        return os.path.normpath(os.path.join(self.abspath, *rel.split("/")))

    def files_with(self, *roles: Role) -> list[tuple[str, layout.FileRole]]:
        out = []
        for f in self.ckpt.files:
            r = layout.role_of(f.relpath)
            if r.role in roles:
                out.append((f.relpath, r))
        return sorted(out)

    @property
    def moe_dir(self) -> str:
        return self.facts.moe_dir


def open_source(path: str, *, min_age_s: float = 0.0, now: float | None = None) -> MigrateSource:
    """Scan and validate the checkpoint directory at ``path`` (one checkpoint, not a tree)."""
    dirs, _ = scanner.find_checkpoints(path)
    mine = [d for d in dirs if d.path == "."]
    if not mine:
        raise CheckpointFailure(f"{path}: not a checkpoint directory")
    verdict = validate_checkpoint(mine[0], level=HEADERS, min_age_s=min_age_s, now=now)
    return MigrateSource(os.path.abspath(path), mine[0], verdict)


# tensors ------------------------------------------------------------------------------

_LORA_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")


def _merged_locations(src: MigrateSource) -> dict:
    from ..tensor_io import locate
    found = {}
    for rel, role in src.files_with(Role.MERGED):
        if rel not in src.verdict.merged_files:
            continue
        found.update(locate(src.abs(rel), wanted=lora_or_router_key))
    return found


def _group_moe_lora(locs: dict, *, only_expert: int | None = None, where: str) -> dict:
    """{expert: {canonical key: TensorLocation}} from ``….lora_A.expert_<i>.weight`` keys."""
    for key in locs:
        try:
            parts = layout.moe_lora_parts(key)
        except layout.BadIndex as exc:
            raise CheckpointFailure(f"{where}: {exc}") from None
        if parts is None:
            continue
        _, part, expert, _ = parts
        if part not in _LORA_PARTS:
            raise CheckpointFailure(f"{where}: {key}: {part} (DoRA) is not supported by migrate")
        if only_expert is not None and expert != only_expert:
            raise CheckpointFailure(f"{where}: holds {key!r} of expert {expert}, "
                                    f"not expert {only_expert}")
    return group_moe_lora(locs)


def _router_from(locs: dict, *, where: str) -> dict:
    """gate.weight / gate.bias locations from any of the router key forms."""
    out = {k: loc for k, loc in group_router(locs).items()
           if k in (layout.GATE_WEIGHT, layout.GATE_BIAS)}
    if layout.GATE_WEIGHT not in out:
        raise CheckpointFailure(f"{where}: no {layout.GATE_WEIGHT} in the router state")
    return out


def _carried(src: MigrateSource, *, exclude_roles=()) -> list[tuple[str, str]]:
    """Trainer state, tokenizer and other loose files carried byte for byte."""
    out = []
    for f in src.ckpt.files:
        if f.name.startswith(".ckpt-tools"):
            continue
        role = layout.role_of(f.relpath).role
        top = "/" not in f.relpath
        if role in exclude_roles:
            continue
        if role in layout.CARRIED_ROLES or (top and role is Role.OTHER) or (
                role is Role.OTHER and f.relpath.startswith(layout.MOE_STATE_DIR + "/")):
            out.append((src.abs(f.relpath), f.relpath))
    return out


# the conversions ----------------------------------------------------------------------

def _tree_experts(src: MigrateSource) -> tuple[dict, dict]:
    """({expert: {ckey: loc}}, {expert: (adapter dir, adapter_config path)}) of a dirs/nested tree."""
    from ..tensor_io import locate_safetensors
    expert_locs: dict[int, dict] = {}
    dirs: dict[int, tuple[str, str]] = {}
    for rel, role in src.files_with(Role.ADAPTER_WEIGHTS):
        if not rel.endswith(".safetensors"):
            raise CheckpointFailure(f"{rel}: adapter_model.bin is not supported; expected "
                                    "adapter_model.safetensors")
        expert_locs[role.expert] = group_peft_lora(locate_safetensors(src.abs(rel)))
        d = os.path.dirname(src.abs(rel))
        dirs[role.expert] = (d, os.path.join(d, layout.ADAPTER_CONFIG))
    return expert_locs, dirs


def _flat_experts(src: MigrateSource) -> dict:
    """{expert: {canonical key: location}} of ``expert_<i>.pt`` files, in either key form."""
    from ..tensor_io import locate_torch
    out = {}
    for rel, role in src.files_with(Role.FLAT_EXPERT):
        locs = locate_torch(src.abs(rel), wanted=lambda k: ".lora_" in k)
        try:
            peft_form = layout.flat_expert_peft_form(locs)
        except layout.MixedKeyForms as exc:
            raise CheckpointFailure(f"{rel}: {exc}") from None
        if peft_form:
            out[role.expert] = group_peft_lora(locs)
            continue
        grouped = _group_moe_lora(locs, only_expert=role.expert, where=rel)
        out[role.expert] = grouped.get(role.expert, {})
    return out


def _router_locations(src: MigrateSource, merged: dict | None) -> tuple[dict, dict]:
    """Router tensor locations and the V2 router.pt's metadata (top_k, temperature, ...)."""
    from ..tensor_io import locate
    meta: dict = {}
    rel = src.facts.router
    if rel is not None and rel.endswith(".pt") and os.path.isfile(src.abs(rel)):
        from ..formats import torchsave
        info = torchsave.inspect_torch_file(src.abs(rel))
        if isinstance(info.obj, dict) and layout.LEGACY_ROUTER_STATE in info.obj:
            for k in ("num_experts", "input_size", "top_k", "temperature", "expert_maturity"):
                v = info.obj.get(k)
                if isinstance(v, (int, float, str, list)) and not isinstance(v, bool):
                    meta[k] = v
    rk = {k: v for k, v in (merged or {}).items() if layout.router_key(k)}
    # a merged state dict without a PEFT tree is the checkpoint's own router (best_model/'s
    # run-level router.pt is the run's latest, not necessarily the best step's)
    if rk and (src.verdict.tree_form == layout.TREE_NONE or rel is None):
        return _router_from(rk, where="merged weights"), meta
    if rel is None:
        raise CheckpointFailure("no router state found")
    return _router_from(locate(src.abs(rel)), where=rel), meta


def _check_same(tree: dict, merged: dict, where: str) -> None:
    """The PEFT tree must hold exactly the merged weights' LoRA tensors, bit for bit."""
    from ..tensor_io import bit_equal, read_tensors
    for e in sorted(tree):
        a, b = tree[e], merged.get(e, {})
        if set(a) != set(b):
            diff = sorted(set(a) ^ set(b))
            raise CheckpointFailure(f"expert {e}: the PEFT tree and the merged weights hold "
                                    f"different LoRA modules (e.g. {diff[0]}); not choosing one")
        ta, tb = read_tensors(a), read_tensors(b)
        for k in sorted(ta):
            if not bit_equal(ta[k], tb[k]):
                raise CheckpointFailure(f"expert {e}: {k} differs between the PEFT tree and "
                                        f"the merged weights ({where}); not choosing one")


def build_conversion(src: MigrateSource, method: str, options: MigrateOptions, *,
                     run_cache: dict | None = None, check_merged: bool = True) -> Conversion:
    """Everything a canonical target holds, with LoRA and router tensors read exactly."""
    from ..tensor_io import read_tensors
    if method == METHOD_SVD:
        return _svd_conversion(src, options)
    v = src.verdict
    tree = v.tree_form
    merged_kind = v.merged_kind
    merged = _merged_locations(src) if merged_kind in ("v0", "v1") else None
    merged_experts = _group_moe_lora(merged, where="merged weights") if merged else {}

    warnings: list[str] = []
    dir_experts: dict = {}
    if tree in (layout.TREE_CANONICAL, layout.TREE_NESTED):
        expert_locs, dir_experts = _tree_experts(src)
    elif tree == layout.TREE_FLAT:
        expert_locs = _flat_experts(src)
    else:
        expert_locs = merged_experts
    if not expert_locs:
        raise CheckpointFailure("no LoRA tensors found")
    if merged_experts and tree != layout.TREE_NONE and check_merged:
        _check_same(expert_locs, merged_experts, ", ".join(
            m for m in v.merged_files if layout.role_of(m).role is Role.MERGED))
    elif merged_kind in ("hf", "hf-lora") and tree != layout.TREE_NONE:
        warnings.append("merged weights hold no DyLoRA LoRA keys to compare with the PEFT tree; "
                        "dropped without that check")

    num_experts = v.num_experts or (max(expert_locs) + 1)
    missing = [i for i in range(num_experts) if i not in expert_locs]
    if missing:
        raise CheckpointFailure(f"expert {missing[0]} of {num_experts} has no LoRA tensors")

    router_locs, router_meta = _router_locations(src, merged)

    if method == METHOD_COPY:
        return _copy_conversion(src, expert_locs, dir_experts, router_locs, num_experts, warnings)

    ranks = ranks_from_shapes(expert_locs)
    h = resolve_hyper(src, ranks, options, run_cache)
    warnings += h.notes
    experts = []
    lora_bytes = 0
    all_locs = {f"{e}/{k}": loc for e, locs in expert_locs.items() for k, loc in locs.items()}
    all_locs |= {f"router/{k}": loc for k, loc in router_locs.items()}
    tensors = read_tensors({k: dataclasses.replace(loc, name=k) for k, loc in all_locs.items()})
    lora_bytes = sum(t.numel() * t.element_size() for t in tensors.values())
    for e in range(num_experts):
        t = {k: tensors[f"{e}/{k}"] for k in expert_locs[e]}
        has_bias = any(k.endswith("lora_B.bias") for k in t)
        if dir_experts and e in dir_experts:
            cfg = read_json(dir_experts[e][1]) or lora_config_for(h, has_bias)
            experts.append(ExpertAdapter(e, cfg, tensors=t, adapter_dir=dir_experts[e][0]))
        else:
            experts.append(ExpertAdapter(e, lora_config_for(h, has_bias), tensors=t))
    router = {k: tensors[f"router/{k}"] for k in router_locs}
    extra = {}
    if "top_k" in router_meta:
        extra["top_k"] = router_meta["top_k"]
    if "temperature" in router_meta:
        extra["temperature"] = router_meta["temperature"]
    gw = router.get(layout.GATE_WEIGHT)
    if gw is not None and gw.ndim == 2:
        extra["hidden_size"] = int(gw.shape[1])
    skill = os.path.join(src.abspath, *src.moe_dir.split("/"), layout.SKILL_LIBRARY)
    return Conversion(
        method=METHOD_EXACT, layout=v.layout, num_experts=num_experts, experts=experts,
        router=router, moe_config=moe_config_for(src, h, num_experts, extra),
        root_config=root_config_for(num_experts, h),
        skill_library=os.path.normpath(skill) if os.path.isfile(skill) else None,
        carried=_carried(src), warnings=warnings, max_rel_error=0.0, lora_bytes=lora_bytes)


def _copy_conversion(src: MigrateSource, expert_locs: dict, dir_experts: dict, router_locs: dict,
                     num_experts: int, warnings: list[str]) -> Conversion:
    """Canonical (and canonical+merged): the tree as it is, minus merged weights."""
    from ..tensor_io import read_tensors
    copy = []
    root_cfg = src.facts.root_config
    replace_root = not _is_canonical_root_config(root_cfg)
    for f in src.ckpt.files:
        role = layout.role_of(f.relpath).role
        if role in (Role.MERGED, Role.MERGED_INDEX) or f.name.startswith(".ckpt-tools"):
            continue
        if role is Role.ROOT_CONFIG and replace_root:
            continue
        copy.append((src.abs(f.relpath), f.relpath))
    new_root = {}
    if replace_root:
        moe = src.facts.moe_config or {}
        new_root = canonical.root_config(num_experts, moe)
        if root_cfg is not None:
            warnings.append("config.json is not a DyLoRA-MoE config (rewritten by another tool); "
                            "replaced with the canonical one")
    experts = [ExpertAdapter(e, read_json(dir_experts[e][1]) or {}, adapter_dir=dir_experts[e][0],
                             expected={k: (loc.dtype, loc.shape) for k, loc in locs.items()})
               for e, locs in sorted(expert_locs.items())]
    return Conversion(method=METHOD_COPY, layout=src.verdict.layout, num_experts=num_experts,
                      experts=experts, router=read_tensors(router_locs), moe_config={},
                      root_config=new_root,
                      skill_library=None, carried=[], copy_tree=copy, warnings=warnings,
                      max_rel_error=0.0)


def resolve_model_dir(path_or_id: str) -> str:
    """A local model directory, or a hub id resolved from the local Hugging Face cache only."""
    if os.path.isdir(path_or_id):
        return os.path.abspath(path_or_id)
    if os.path.exists(path_or_id):
        raise CheckpointFailure(f"base model {path_or_id}: not a directory")
    try:
        return cached_snapshot(path_or_id)
    except NotCached as exc:
        if exc.why is None:
            raise CheckpointFailure(f"base model {path_or_id}: no such directory") from None
        raise CheckpointFailure(f"base model {path_or_id}: not a local directory and not in the "
                                f"local Hugging Face cache (no network is used; {exc.why})") from None


def _hidden_size(cfg: dict | None) -> int | None:
    for c in (cfg or {}, (cfg or {}).get("text_config") or {}):
        for k in ("hidden_size", "n_embd", "d_model"):
            if isinstance(c.get(k), int):
                return c[k]
    return None


def _not_low_rank(ex, options: MigrateOptions) -> NothingToMigrate:
    """The answer to the content question, when it is no: a full fine-tune, skipped."""
    o = ex.over_bound[0]
    need = (f"needs full rank {o.full_rank}" if o.needed_rank == o.full_rank else
            f"needs rank {o.needed_rank} of {o.full_rank}" if o.needed_rank is not None else
            f"no rank meets it with A and B in {o.dtype}")
    bound = (Wording("{max_error} {at:g}", at=options.max_error) if o.bound <= options.max_error
             else Wording("the rounding of its {dtype} weights ({rounding:.3g}; {max_error} {at:g})",
                          dtype=o.dtype, rounding=o.bound, at=options.max_error))
    which = "the first module over it" if not ex.complete else "the worst module"
    return NothingToMigrate(Wording(
        "a full fine-tune, not a low-rank delta: relative error {error:.3g} at rank {rank_used} "
        "is above {bound} ({module}, {which}: {need})", error=o.error, rank_used=o.rank,
        bound=bound, module=o.module, which=which, need=need),
        fields={"max_rel_error": float(ex.max_rel_error), "max_error": options.max_error,
                "module_errors": dict(ex.errors),
                "over_bound": tuple(b.to_dict() for b in ex.over_bound)})


def _svd_conversion(src: MigrateSource, options: MigrateOptions) -> Conversion:
    import torch
    if not options.base_model:
        raise CheckpointFailure(Wording("a truly merged model: migrate needs {base_model} to "
                                        "extract its LoRA delta"))
    if options.rank is None and options.energy is None:
        raise CheckpointFailure(Wording("a truly merged model: give {rank:N} or {energy:F}"))
    try:
        from . import lowrank
        extract = lowrank.extract
    except (ImportError, AttributeError):
        raise CheckpointFailure("low-rank extraction is not available in this build "
                                "(ckpt_tools.migrate.lowrank.extract)") from None
    base_dir = resolve_model_dir(options.base_model)
    # An unmarked plain model is asked whether it is a LoRA merged into the base: one module
    # over the bound answers no, and the rest need not be decomposed (docs/migrate.md).
    question = not is_dylora_marked(src.verdict)
    try:
        ex = extract(base_dir, src.abspath, rank=options.rank, energy=options.energy,
                     device=options.device, base_model_name_or_path=options.base_model,
                     max_error=options.max_error, stop_at_first_over=question)
    except lowrank.BaseMismatch as exc:
        raise CheckpointFailure(f"base model {options.base_model} is not this checkpoint's "
                                f"base: {exc}; nothing extracted") from None
    if ex.over_bound and question:
        raise _not_low_rank(ex, options)
    if ex.over_bound:
        raise CheckpointFailure(
            Wording("svd: the low-rank copy would lose part of the fine-tune: {why}",
                    why=ex.over_bound_reason()),
            fields={"max_rel_error": float(ex.max_rel_error), "max_error": options.max_error,
                    "module_errors": dict(ex.errors),
                    "over_bound": tuple(o.to_dict() for o in ex.over_bound),
                    "suggested_rank": ex.suggested_rank,
                    "suggested_energy": ex.suggested_energy})
    cfg = dict(ex.adapter_config)
    if not cfg.get("target_modules"):
        if question:
            raise NothingToMigrate(Wording("the same as {base_model} in every linear layer: "
                                           "nothing to migrate"))
        raise CheckpointFailure("the merged model does not differ from the base model in any "
                                "linear layer: nothing to extract")
    hidden = _hidden_size(src.facts.root_config) or _hidden_size(
        read_json(os.path.join(base_dir, layout.ROOT_CONFIG)))
    if hidden is None:
        raise CheckpointFailure("cannot tell the hidden size for the router (no config.json)")
    # The canonical layout needs a router: one expert, a zero gate (softmax over one expert is 1).
    router = {layout.GATE_WEIGHT: torch.zeros(1, hidden), layout.GATE_BIAS: torch.zeros(1)}
    r = int(cfg.get("r") or max(ex.ranks.values(), default=1))
    h = Hyperparameters(r, dict(cfg.get("rank_pattern") or {}), cfg.get("lora_alpha", r),
               float(cfg.get("lora_dropout") or 0.0), options.base_model,
               sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], list)
               else cfg["target_modules"], [])
    moe = canonical.moe_config(1, hyper_for(h), h.target_modules, under={
        "hidden_size": hidden, "top_k": 1, "extracted": {
            "method": METHOD_SVD, "rank": options.rank, "energy": options.energy,
            "max_rel_error": ex.max_rel_error, "max_error": options.max_error}})
    expert = ExpertAdapter(0, cfg, tensors=dict(ex.lora_state))
    return Conversion(
        method=METHOD_SVD, layout=src.verdict.layout, num_experts=1, experts=[expert],
        router=router, moe_config=moe, root_config=root_config_for(1, h), skill_library=None,
        carried=_carried(src, exclude_roles=(Role.ROOT_CONFIG,)),
        warnings=list(getattr(ex, "notes", ())), module_errors=dict(ex.errors),
        max_rel_error=float(ex.max_rel_error), extraction=ex,
        lora_bytes=sum(t.numel() * t.element_size() for t in ex.lora_state.values()))
