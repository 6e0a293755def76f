"""``migrate --verify``: the logits of each written expert, loaded by PEFT onto the base
model, against the source's (base + its LoRA tensors by forward hooks, or the merged model)."""

from __future__ import annotations

import os

import torch

from .. import layout
from ..errors import Wording
from .errors import CheckpointFailure
from .extract import Conversion, ExpertAdapter
from .peft_model import (adapter_tensors, attach_experts, base_from_merged, check_base_matches,
                         check_loaded, load_base_model)
from .plan import METHOD_SVD, MigrateOptions, read_json

VERIFY_BATCH, VERIFY_LENGTH, VERIFY_SEED = 2, 16, 0


def _scale(cfg: dict, module: str, r: int) -> float:
    from ..patterns import pattern_value
    alpha = pattern_value(cfg.get("alpha_pattern"), module) or cfg.get("lora_alpha") or r
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
            raise CheckpointFailure(Wording("{verify} does not handle {part} ({module})",
                                            part=part, module=module))
        modules.setdefault(module, {})[part + ("" if param in (None, "weight") else "." + param)] = t
    handles = []
    try:
        for module, p in modules.items():
            try:
                target = model.get_submodule(module)
            except AttributeError:
                raise CheckpointFailure(Wording("{verify}: the base model has no module {module}",
                                                module=module)) from None
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


def _verify_base(src, options: MigrateOptions):
    if options.base_model:
        base = load_base_model(options.base_model, dtype=torch.float32)
        if src.verdict.merged_kind in ("v0", "v1"):
            check_base_matches(base, src)
        return base
    base = base_from_merged(src) if src.verdict.merged_kind in ("v0", "v1") else None
    if base is None:
        raise CheckpointFailure(Wording("{verify} needs {base_model} here (no base weights with "
                                        "a model config inside the checkpoint)"))
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
            raise CheckpointFailure(Wording("{verify} needs {base_model}"))
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
        check_loaded(model, targets[0], adapter_tensors(targets[0]))
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
            tensors = ex.tensors if ex.tensors is not None else adapter_tensors(ex)
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
    cfg = read_json(path)
    if cfg is None:
        raise CheckpointFailure(f"{path}: not a readable JSON object")
    return cfg
