"""The LoRA hyperparameters of a checkpoint: r from the tensor shapes; lora_alpha, dropout,
the base model and the target modules from its own configs, then its run's, then the options."""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import canonical, layout
from ..errors import Wording
from ..layout import Role
from .errors import CheckpointFailure
from .plan import read_json

if TYPE_CHECKING:
    from .extract import MigrateSource
    from .plan import MigrateOptions


# hyperparameters ----------------------------------------------------------------------

def ranks_from_shapes(expert_locs: dict) -> dict[str, int]:
    """module → r, from the shapes of lora_A ([r, in]) / lora_embedding_A ([r, vocab])."""
    ranks = {}
    for locs in expert_locs.values():
        for ckey, loc in locs.items():
            parts = layout.peft_lora_parts(ckey)
            if parts and parts[1] in ("lora_A", "lora_embedding_A") and loc.shape:
                ranks.setdefault(parts[0], loc.shape[0])
    return ranks


def _run_configs(run_dir: str, own: str, cache: dict | None) -> list[tuple[str, dict]]:
    """(path, config) of the DyLoRA configs of a run: its dylo_moe_state/config.json, and the
    root, MoE and first adapter configs of its other checkpoints (newest first)."""
    key = (run_dir, own)
    if cache is not None and key in cache:
        return cache[key]
    found: list[tuple[str, dict]] = []
    p = os.path.join(run_dir, layout.MOE_STATE_DIR, layout.MOE_CONFIG)
    cfg = read_json(p)
    if cfg is not None:
        found.append((p, cfg))
    try:
        names = [e.name for e in os.scandir(run_dir)
                 if e.is_dir(follow_symlinks=False) and layout.is_checkpoint_name(e.name)
                 and not layout.is_tmp_checkpoint_name(e.name)]
    except OSError:
        names = []
    names.sort(key=lambda n: (layout.checkpoint_step(n) or -1, n), reverse=True)
    expert0 = f"{layout.EXPERT_DIR_PREFIX}0"
    for name in names[:32]:
        d = os.path.join(run_dir, name)
        if os.path.realpath(d) == os.path.realpath(own):
            continue
        for rel in (layout.ROOT_CONFIG, f"{layout.MOE_STATE_DIR}/{layout.MOE_CONFIG}",
                    f"{layout.PEFT_DIR}/{expert0}/{layout.ADAPTER_CONFIG}",
                    f"{layout.PEFT_DIR}/{expert0}/{expert0}/{layout.ADAPTER_CONFIG}"):
            p = os.path.join(d, *rel.split("/"))
            cfg = read_json(p)
            if cfg is None:
                continue
            if rel == layout.ROOT_CONFIG and not layout.is_dylora_config(cfg):
                continue
            found.append((p, cfg))
    if cache is not None:
        cache[key] = found
    return found


def _cfg_r(cfg: dict) -> int | None:
    r = cfg.get("r") if "peft_type" in cfg else layout.first_key(cfg, layout.LORA_R_KEYS)
    return r if isinstance(r, int) and not isinstance(r, bool) else None


def _cfg_alpha(cfg: dict):
    a = layout.first_key(cfg, layout.LORA_ALPHA_KEYS)
    return a if isinstance(a, (int, float)) and not isinstance(a, bool) else None


def _cfg_dropout(cfg: dict):
    d = layout.first_key(cfg, layout.LORA_DROPOUT_KEYS)
    return d if isinstance(d, (int, float)) and not isinstance(d, bool) else None


def _cfg_base(cfg: dict) -> str | None:
    for k in ("base_model_name_or_path", "_name_or_path"):
        v = cfg.get(k)
        if isinstance(v, str) and v:
            return v
    return None


@dataclass
class Hyperparameters:
    r: int
    rank_pattern: dict
    alpha: float
    dropout: float
    base: str | None
    target_modules: list[str]
    notes: list[str]


def resolve_hyper(src: MigrateSource, ranks: dict[str, int], options: MigrateOptions,
                  run_cache: dict | None) -> Hyperparameters:
    """r from the shapes; alpha, dropout and the base model from the configs."""
    if not ranks:
        raise CheckpointFailure("no LoRA tensors found")
    r = Counter(ranks.values()).most_common(1)[0][0]
    rank_pattern = {m: v for m, v in sorted(ranks.items()) if v != r}
    notes: list[str] = []
    own, run = _own_configs(src), _sibling_configs(src, run_cache)
    alpha = _resolve_alpha(r, own, run, options, notes)
    dropout, _ = _first_said(_cfg_dropout, own + run)
    if dropout is None:
        dropout = layout.DEFAULT_LORA_DROPOUT
    base, _ = _first_said(_cfg_base, own + run)
    if base is None and options.base_model:
        base = options.base_model
    if base is None:
        notes.append("warning: no config names the base model; base_model_name_or_path is unset "
                     "(pass --base-model)")
    return Hyperparameters(r, rank_pattern, alpha, float(dropout), base,
                           _target_modules(own, ranks), notes)


def _own_configs(src: MigrateSource) -> list[tuple[str, dict]]:
    """(where, config) of the checkpoint's own configs: MoE, root, then each adapter's."""
    own: list[tuple[str, dict]] = []
    moe_cfg = src.facts.moe_config
    if isinstance(moe_cfg, dict):
        own.append((f"{src.moe_dir}/{layout.MOE_CONFIG}", moe_cfg))
    root_cfg = src.facts.root_config
    if isinstance(root_cfg, dict):
        own.append((layout.ROOT_CONFIG, root_cfg))
    for rel, role in src.files_with(Role.ADAPTER_CONFIG):
        cfg = read_json(src.abs(rel))
        if cfg is not None:
            own.append((rel, cfg))
    return own


def _sibling_configs(src: MigrateSource, run_cache: dict | None) -> list[tuple[str, dict]]:
    """(where, config) of the configs of the checkpoint's run, relative to the run."""
    run_dir = os.path.dirname(src.abspath)
    return [(os.path.relpath(p, run_dir), c)
            for p, c in _run_configs(run_dir, src.abspath, run_cache)]


def _first_said(getter, candidates: list[tuple[str, dict]]):
    """(value, where) of the first config that says it; (None, None) where none does."""
    for where, cfg in candidates:
        v = getter(cfg)
        if v is not None:
            return v, where
    return None, None


def _resolve_alpha(r: int, own: list[tuple[str, dict]], run: list[tuple[str, dict]],
                   options: MigrateOptions, notes: list[str]) -> float:
    """lora_alpha from the checkpoint's configs, else from the run's when they agree for this
    r, else the caller's ``lora_alpha``, else the upstream guess 2·r; ``notes`` says which and why."""
    alpha, where = _first_said(_cfg_alpha, own)
    if alpha is None:
        values = {}
        for w, cfg in run:
            a = _cfg_alpha(cfg)
            if a is not None and _cfg_r(cfg) == r:
                values.setdefault(a, w)
        if len(values) == 1:
            alpha, where = next(iter(values.items()))
            where = f"the run's {where}"
        elif len(values) > 1:
            notes.append(f"the run's configs disagree on lora_alpha ({sorted(values)}); not using them")
    given = Wording("{lora_alpha}")       # the caller's argument: --lora-alpha on the command line
    if alpha is None and options.lora_alpha is not None:
        alpha, where = options.lora_alpha, given
    if alpha is None:
        alpha = 2 * r
        notes.append(Wording("warning: no config records lora_alpha; guessed lora_alpha = 2·r = "
                             "{alpha} (the upstream convention; pass {lora_alpha} if training used "
                             "another)", alpha=alpha))
    else:
        if options.lora_alpha is not None and where is not given and options.lora_alpha != alpha:
            notes.append(Wording("warning: {lora_alpha} {value} ignored: {where} says {alpha}",
                                 value=options.lora_alpha, where=where, alpha=alpha))
        notes.append(Wording("lora_alpha = {alpha} from {where}", alpha=alpha, where=where))
    if isinstance(alpha, float) and alpha.is_integer():
        alpha = int(alpha)
    return alpha


def _target_modules(own: list[tuple[str, dict]], ranks: dict[str, int]) -> list[str] | str:
    """The checkpoint's target_modules where they cover every adapted leaf, else the leaves;
    a regex of the full names where only some layers were adapted."""
    targets = None
    for _, cfg in own:
        t = cfg.get("target_modules")
        if isinstance(t, list) and t and all(isinstance(x, str) for x in t):
            targets = t
            break
    leaves = sorted({m.rsplit(".", 1)[-1] for m in ranks})
    if targets is None or not set(leaves) <= set(targets):
        targets = leaves
    if not _full_grid(list(ranks)):
        # only some layers were adapted: leaf names would make PEFT adapt them all
        return "^(" + "|".join(re.escape(m) for m in sorted(ranks)) + ")$"
    return sorted(targets)


def _full_grid(modules: list[str]) -> bool:
    """Whether the modules are every layer 0..n-1 times every kind (then leaf names are exact)."""
    by_kind: dict[str, set[int]] = {}
    for m in modules:
        found = re.search(r"\.(\d{1,18})\.", m)  # a longer number is no layer index
        kind = m if found is None else m[:found.start()] + ".#." + m[found.end():]
        by_kind.setdefault(kind, set()).add(-1 if found is None else int(found.group(1)))
    layer_sets = {frozenset(v) for v in by_kind.values()}
    if len(layer_sets) != 1:
        return False
    layers = next(iter(layer_sets))
    return layers == {-1} or layers == frozenset(range(len(layers)))


def lora_config_for(h: Hyperparameters, has_bias: bool) -> dict:
    return canonical.lora_config(r=h.r, alpha=h.alpha, dropout=h.dropout, base=h.base,
                                 target_modules=h.target_modules, rank_pattern=h.rank_pattern,
                                 lora_bias=has_bias)


def hyper_for(h: Hyperparameters) -> dict:
    return canonical.hyper(r=h.r, alpha=h.alpha, dropout=h.dropout, base=h.base)


def moe_config_for(src: MigrateSource, h: Hyperparameters, num_experts: int, extra: dict) -> dict:
    # the source's own MoE config is kept over what was inferred (extra)
    return canonical.moe_config(num_experts, hyper_for(h), h.target_modules,
                                under={**extra, **(src.facts.moe_config or {})})


def root_config_for(num_experts: int, h: Hyperparameters) -> dict:
    return canonical.root_config(num_experts, hyper_for(h))
