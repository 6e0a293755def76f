"""Load any recognised checkpoint as a PEFT model with every expert, and check
migrated targets by their logits (``migrate --verify``).

``load_checkpoint(path, base_model)`` reads the canonical layout directly and converts every
other layout in memory with the converter's own extraction code: nothing is written to disk.
Every expert becomes the adapter ``expert_<i>`` of one ``peft.PeftModel`` (``expert_0``
active), loaded with ``PeftModel.from_pretrained`` / ``load_adapter`` where PEFT's own files
exist, else injected from the extracted tensors; either way the adapter's LoRA keys must be
exactly those of the checkpoint (no missing, no unexpected key).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

import torch

from . import layout
from .converter import (METHOD_COPY, METHOD_SVD, CheckpointFailure, Conversion,
                        ExpertAdapter, MigrateOptions, _method_for, _read_json, build_conversion,
                        open_source, resolve_model_dir)
from .records import BROKEN, Checkpoint

VERIFY_BATCH, VERIFY_LENGTH, VERIFY_SEED = 2, 16, 0


class CheckpointLoadError(Exception):
    """The checkpoint cannot be loaded (broken, unsupported, or its adapters do not fit)."""


@dataclass
class LoadedCheckpoint:
    """``model``: a ``peft.PeftModel`` holding adapters ``expert_0 .. expert_{E-1}``."""

    model: object
    router_state: dict
    config: dict
    layout: str
    num_experts: int
    warnings: list[str] = field(default_factory=list)

    @property
    def expert_names(self) -> list[str]:
        return [f"{layout.EXPERT_DIR_PREFIX}{i}" for i in range(self.num_experts)]


# --- base models ------------------------------------------------------------------------

def load_base_model(base_model, *, dtype=None):
    """A ``PreTrainedModel`` as given, or loaded from a local dir / a hub id in the local cache."""
    if isinstance(base_model, torch.nn.Module):
        return base_model
    from transformers import AutoModelForCausalLM
    path = resolve_model_dir(os.fspath(base_model))
    kwargs = {"dtype": dtype} if dtype is not None else {}
    model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, **kwargs)
    model.eval()
    return model


def _base_weight_locations(src) -> dict:
    """Where the base model's own weights lie in a V0/V1 merged state dict, by their plain
    model names (``….q_proj.base_layer.weight`` → ``….q_proj.weight``); LoRA and router left out."""
    from .tensor_io import locate
    locs = {}
    for rel in src.verdict.merged_files:
        if layout.role_of(rel).role is not layout.Role.MERGED:
            continue
        for key, loc in locate(src.abs(rel)).items():
            if ".lora_" in key or layout.router_key(key):
                continue
            name = layout.module_path(key).replace(".base_layer.", ".")
            locs[name] = dataclasses.replace(loc, name=name, key=key)
    return locs


def base_from_merged(src, *, dtype=torch.float32):
    """Rebuild the base model of a V0/V1 checkpoint from the base weights inside its merged
    state dict, with the Hugging Face config.json the checkpoint carries (best_model/, or a
    benchmark-rewritten config). None when there is no such config."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from .tensor_io import read_tensors
    cfg = src.facts.get("root_config")
    if not isinstance(cfg, dict) or not cfg.get("architectures") or "model_type" not in cfg \
            or cfg.get("model_type") == layout.DYLORA_MODEL_TYPE:
        return None
    config = AutoConfig.from_pretrained(src.abspath, local_files_only=True)
    state = read_tensors(_base_weight_locations(src))
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(
        config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise CheckpointFailure(f"the merged weights do not make a {type(model).__name__}: "
                                f"missing {sorted(set(missing) - tied)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]}")
    model.tie_weights()
    model.to(dtype)
    model.eval()
    return model


# --- attaching experts ---------------------------------------------------------------------

def _check_loaded(model, ex: ExpertAdapter, want: dict) -> None:
    """The adapter holds exactly the checkpoint's LoRA keys, with the checkpoint's values."""
    from peft import get_peft_model_state_dict
    got = get_peft_model_state_dict(model, adapter_name=ex.name, save_embedding_layers=False)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointLoadError(f"{ex.name}: LoRA keys do not fit the base model: "
                                  f"{len(missing)} missing (e.g. {missing[:1]}), "
                                  f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    from .tensor_io import bit_equal
    for k, t in want.items():
        g = got[k].detach().to("cpu")
        if not bit_equal(g.to(t.dtype), t):
            raise CheckpointLoadError(f"{ex.name}: {k} was not loaded as stored")


def _adapter_tensors(ex: ExpertAdapter) -> dict:
    if ex.tensors is not None:
        return ex.tensors
    from safetensors.torch import load_file
    return load_file(os.path.join(ex.adapter_dir, layout.ADAPTER_WEIGHTS))


def attach_experts(base, experts: list[ExpertAdapter]):
    """One PeftModel over ``base`` (modified in place) with every expert as ``expert_<i>``."""
    from peft import LoraConfig, PeftModel, set_peft_model_state_dict
    model = None
    for ex in experts:
        name = ex.name
        if ex.adapter_dir is not None:      # PEFT's own files: PEFT's own loader
            if model is None:
                model = PeftModel.from_pretrained(base, ex.adapter_dir, adapter_name=name)
            else:
                model.load_adapter(ex.adapter_dir, adapter_name=name)
        else:
            cfg = LoraConfig(**{k: v for k, v in ex.config.items()
                                if k in LoraConfig.__dataclass_fields__})
            cfg.inference_mode = True
            if model is None:
                model = PeftModel(base, cfg, adapter_name=name)
            else:
                model.add_adapter(name, cfg)
            result = set_peft_model_state_dict(model, ex.tensors, adapter_name=name)
            if result.unexpected_keys:
                raise CheckpointLoadError(f"{name}: {len(result.unexpected_keys)} LoRA keys match "
                                          f"no module, e.g. {result.unexpected_keys[0]}")
        _check_loaded(model, ex, _adapter_tensors(ex))
    model.set_adapter(experts[0].name)
    model.eval()
    return model


def _router_and_config(conv: Conversion, src) -> tuple[dict, dict]:
    router = dict(conv.router)
    if conv.method == METHOD_COPY:
        cfg = {}
        for rel in (layout.ROOT_CONFIG, f"{src.moe_dir}/{layout.MOE_CONFIG}"):
            cfg.update(_read_json(src.abs(rel)) or {})
        return router, cfg
    return router, {**conv.root_config, **conv.moe_config}


def load_checkpoint(path, base_model, *, lora_alpha: float | None = None,
                    rank: int | None = None, energy: float | None = None, device: str = "auto",
                    dtype=None) -> LoadedCheckpoint:
    """Load the checkpoint at ``path`` (any recognised layout) onto ``base_model``.

    ``base_model``: a local model directory, a hub id in the local Hugging Face cache, or a
    built ``PreTrainedModel`` (which PEFT then modifies in place). ``lora_alpha`` is used only
    when no config of the checkpoint or its run records it (else 2·r, as migrate does).
    A truly merged model needs a base given by path or id, and ``rank`` or ``energy``: its
    delta is extracted in memory as one expert. Raises ``CheckpointLoadError``.
    """
    path = os.fspath(path)
    try:
        src = open_source(path)
    except Exception as exc:  # noqa: BLE001 - one error type for the caller
        raise CheckpointLoadError(f"{path}: {exc}") from None
    v = src.verdict
    if v.status == BROKEN:
        errors = [p for p in v.problems if p.is_error]
        first = errors[0] if errors else None
        raise CheckpointLoadError(f"{path}: broken checkpoint" + (
            f": {first.code}: {first.path}: {first.message}" if first else ""))
    method, why = _method_for(Checkpoint(src.ckpt, v.status, v.layout, tuple(v.problems),
                                         v.merged_files, v.num_experts, facts=v.facts))
    if method is None:
        raise CheckpointLoadError(f"{path}: {why}")
    base_id = None if isinstance(base_model, torch.nn.Module) else os.fspath(base_model)
    if method == METHOD_SVD and base_id is None:
        raise CheckpointLoadError(f"{path}: a truly merged model: pass the base model as a path "
                                  "or hub id, so that its weights can be read for the extraction")
    opts = MigrateOptions(lora_alpha=lora_alpha, base_model=base_id, rank=rank, energy=energy,
                          device=device)
    try:
        conv = build_conversion(src, method, opts, check_merged=False)
    except CheckpointFailure as exc:
        raise CheckpointLoadError(f"{path}: {exc}") from None
    try:
        base = load_base_model(base_model, dtype=dtype)
    except CheckpointFailure as exc:
        raise CheckpointLoadError(str(exc)) from None
    model = attach_experts(base, conv.experts)
    router, config = _router_and_config(conv, src)
    return LoadedCheckpoint(model=model, router_state=router, config=config, layout=v.layout,
                            num_experts=conv.num_experts, warnings=list(conv.warnings))


# --- migrate --verify ------------------------------------------------------------------------

def _scale(cfg: dict, module: str, r: int) -> float:
    from .validator import _pattern_value
    alpha = _pattern_value(cfg.get("alpha_pattern"), module) or cfg.get("lora_alpha") or r
    if cfg.get("use_rslora"):
        return alpha / (r ** 0.5)
    return alpha / r


def hooked_logits(model, tensors: dict, cfg: dict, input_ids) -> torch.Tensor:
    """Logits of ``model`` with the LoRA ``tensors`` added by forward hooks: PEFT's arithmetic,
    written independently of PEFT (a check of the written adapter, not of PEFT itself)."""
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        parts = layout.peft_lora_parts(key)
        if parts is None:
            continue
        module, part, param = parts
        if part not in ("lora_A", "lora_B"):
            raise CheckpointFailure(f"--verify does not handle {part} ({module})")
        modules.setdefault(module, {})[part + ("" if param in (None, "weight") else "." + param)] = t
    handles = []
    try:
        for module, p in modules.items():
            try:
                target = model.get_submodule(module)
            except AttributeError:
                raise CheckpointFailure(f"--verify: the base model has no module {module}") from None
            a, b = p["lora_A"].float(), p["lora_B"].float()
            bias = p.get("lora_B.bias")
            scale = _scale(cfg, module, a.shape[0])

            def hook(mod, args, out, a=a, b=b, bias=bias, scale=scale):
                x = args[0].float()
                delta = (x @ a.T.to(x.device)) @ b.T.to(x.device)
                if bias is not None:
                    delta = delta + bias.float().to(x.device)
                return out + (delta * scale).to(out.dtype)

            handles.append(target.register_forward_hook(hook))
        with torch.no_grad():
            return model(input_ids=input_ids).logits.float()
    finally:
        for h in handles:
            h.remove()


def _random_ids(vocab: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(VERIFY_SEED)
    return torch.randint(0, vocab, (VERIFY_BATCH, VERIFY_LENGTH), generator=gen)


def _diff(ref: torch.Tensor, out: torch.Tensor) -> tuple[float, float]:
    if not (torch.isfinite(ref).all() and torch.isfinite(out).all()):
        return float("nan"), float("nan")
    abs_diff = float((ref - out).abs().max())
    scale = float(ref.abs().max()) or 1.0
    return abs_diff, abs_diff / scale


def check_base_matches(base, src, *, sample: int = 16) -> None:
    """The base model given is the one the checkpoint was trained on: a sample of the base
    weights stored in its merged state dict (the smallest tensors, which include the norms,
    and a few ``….base_layer.weight`` of LoRA modules) equal the model's, cast to the stored
    dtype. Reads those few tensors only."""
    from .tensor_io import read_tensors
    candidates = _base_weight_locations(src)
    by_size = sorted(candidates.values(), key=lambda loc: (loc.nbytes, loc.name))
    chosen = by_size[:sample] + [loc for loc in by_size if ".base_layer." in (loc.key or "")][:4]
    locs = {loc.name: loc for loc in chosen}
    for name, stored in read_tensors(locs).items():
        try:
            mine = base.get_parameter(name).detach().to("cpu")
        except AttributeError:
            raise CheckpointFailure(f"--verify: the base model has no parameter {name}: "
                                    "it is not the model this checkpoint was trained on") from None
        if mine.shape != stored.shape or not torch.equal(mine.to(stored.dtype), stored):
            raise CheckpointFailure(f"--verify: {name} of the base model differs from the base "
                                    "weights stored in the checkpoint: wrong --base-model?")


def _verify_base(src, options: MigrateOptions):
    if options.base_model:
        base = load_base_model(options.base_model, dtype=torch.float32)
        if src.verdict.merged_kind in ("v0", "v1"):
            check_base_matches(base, src)
        return base
    base = base_from_merged(src) if src.verdict.merged_kind in ("v0", "v1") else None
    if base is None:
        raise CheckpointFailure("--verify needs --base-model here (no base weights with a model "
                                "config inside the checkpoint)")
    return base


def verify_conversion(conv: Conversion, target_dir: str, src, options: MigrateOptions) -> dict:
    """Load each written expert with PEFT onto the base model and compare its logits with the
    source's: base + the source's LoRA tensors (exact, copy), or the merged model (svd)."""
    from peft import PeftModel
    tol = options.tolerance(conv.method)
    targets = [ExpertAdapter(ex.index, ex.config, adapter_dir=os.path.join(
        target_dir, layout.PEFT_DIR, ex.name)) for ex in conv.experts]
    worst_abs = worst_rel = 0.0
    per_expert = {}
    if conv.method == METHOD_SVD:
        if not options.base_model:
            raise CheckpointFailure("--verify needs --base-model")
        from transformers import AutoModelForCausalLM
        merged = AutoModelForCausalLM.from_pretrained(src.abspath, dtype=torch.float32,
                                                      local_files_only=True)
        merged.eval()
        ids = _random_ids(merged.config.vocab_size)
        with torch.no_grad():
            ref = merged(input_ids=ids).logits.float()
        del merged
        base = load_base_model(options.base_model, dtype=torch.float32)
        model = PeftModel.from_pretrained(base, targets[0].adapter_dir, adapter_name=targets[0].name)
        _check_loaded(model, targets[0], _adapter_tensors(targets[0]))
        model.eval()
        with torch.no_grad():
            out = model(input_ids=ids).logits.float()
        worst_abs, worst_rel = _diff(ref, out)
        per_expert[targets[0].name] = worst_rel
    else:
        base = _verify_base(src, options)
        ids = _random_ids(base.config.vocab_size)
        refs = {}
        for ex in conv.experts:
            tensors = ex.tensors if ex.tensors is not None else _adapter_tensors(ex)
            cfg = ex.config or _read_adapter_config(ex.adapter_dir)
            refs[ex.name] = hooked_logits(base, tensors, cfg, ids)
        model = attach_experts(base, targets)
        for ex in targets:
            model.set_adapter(ex.name)
            with torch.no_grad():
                out = model(input_ids=ids).logits.float()
            a, r = _diff(refs[ex.name], out)
            per_expert[ex.name] = r
            worst_abs = a if a != a else max(worst_abs, a)
            worst_rel = r if r != r else max(worst_rel, r)
    finite = all(v == v for v in per_expert.values()) and worst_abs == worst_abs
    doc = {"max_abs_diff": worst_abs, "max_rel_diff": worst_rel, "tolerance": tol,
           "passed": finite and worst_rel <= tol, "experts": per_expert}
    if not finite:
        doc["error"] = "non-finite logits (NaN or Inf in the weights?)"
    return doc


def _read_adapter_config(adapter_dir: str) -> dict:
    path = os.path.join(adapter_dir, layout.ADAPTER_CONFIG)
    cfg = _read_json(path)
    if cfg is None:
        raise CheckpointFailure(f"{path}: not a readable JSON object")
    return cfg


__all__ = ["load_checkpoint", "LoadedCheckpoint", "CheckpointLoadError", "load_base_model",
           "attach_experts", "verify_conversion", "hooked_logits", "base_from_merged",
           "check_base_matches"]
