"""PEFT models from a ``Conversion``: the base model (a directory, a cached hub id, or rebuilt
from the base weights inside a V0/V1 merged state dict) and every expert attached as the
adapter ``expert_<i>``, checked key for key and bit for bit against what the checkpoint holds.

Used by ``migrate --verify`` (``verify``) and by ``loader.load_checkpoint``.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from .. import layout
from ..errors import Wording
from .errors import CheckpointFailure
from .extract import ExpertAdapter, resolve_model_dir


class CheckpointLoadError(Exception):
    """The checkpoint cannot be loaded (broken, unsupported, or its adapters do not fit)."""


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
    from ..tensor_io import locate
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

    from ..tensor_io import read_tensors
    cfg = src.facts.root_config
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


def check_loaded(model, ex: ExpertAdapter, want: dict) -> None:
    """The adapter holds exactly the checkpoint's LoRA keys, with the checkpoint's values."""
    from peft import get_peft_model_state_dict
    got = get_peft_model_state_dict(model, adapter_name=ex.name, save_embedding_layers=False)
    missing = sorted(set(want) - set(got))
    unexpected = sorted(set(got) - set(want))
    if missing or unexpected:
        raise CheckpointLoadError(f"{ex.name}: LoRA keys do not fit the base model: "
                                  f"{len(missing)} missing (e.g. {missing[:1]}), "
                                  f"{len(unexpected)} unexpected (e.g. {unexpected[:1]})")
    from ..tensor_io import bit_equal
    for k, t in want.items():
        g = got[k].detach().to("cpu")
        if not bit_equal(g.to(t.dtype), t):
            raise CheckpointLoadError(f"{ex.name}: {k} was not loaded as stored")


def adapter_tensors(ex: ExpertAdapter) -> dict:
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
        check_loaded(model, ex, adapter_tensors(ex))
    model.set_adapter(experts[0].name)
    model.eval()
    return model


def check_base_matches(base, src, *, sample: int = 16) -> None:
    """The base model given is the one the checkpoint was trained on: a sample of the base
    weights stored in its merged state dict (the smallest tensors, which include the norms,
    and a few ``….base_layer.weight`` of LoRA modules) equal the model's, cast to the stored
    dtype. Reads those few tensors only."""
    from ..tensor_io import read_tensors
    candidates = _base_weight_locations(src)
    by_size = sorted(candidates.values(), key=lambda loc: (loc.nbytes, loc.name))
    chosen = by_size[:sample] + [loc for loc in by_size if ".base_layer." in (loc.key or "")][:4]
    locs = {loc.name: loc for loc in chosen}
    for name, stored in read_tensors(locs).items():
        try:
            mine = base.get_parameter(name).detach().to("cpu")
        except AttributeError:
            raise CheckpointFailure(Wording("{verify}: the base model has no parameter {name}: it "
                                            "is not the model this checkpoint was trained on",
                                            name=name)) from None
        if mine.shape != stored.shape or not torch.equal(mine.to(stored.dtype), stored):
            raise CheckpointFailure(Wording("{verify}: {name} of the base model differs from the "
                                            "base weights stored in the checkpoint: wrong "
                                            "{base_model}?", name=name))
