"""The configuration files of the canonical layout (SPEC §2), built in one place.

The root ``config.json`` ({"model_type": "dylora-moe", "checkpoint_type": "peft_only",
"num_experts", "base_model_name_or_path", "lora_r", "lora_alpha", "lora_dropout"}), the MoE
state's ``dylo_moe_state/config.json`` and the expert ``adapter_config.json`` that migrate
writes; migrate and the Trainer callback both build them here, and ``json_bytes`` is how
ckpt-tools serialises its own JSON files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Mapping

from . import layout

# the hyperparameters a root config.json repeats from the MoE config, when known
ROOT_HYPER_KEYS = ("base_model_name_or_path", "lora_r", "lora_alpha", "lora_dropout")


def json_bytes(doc: Mapping) -> bytes:
    """A JSON file as ckpt-tools writes it: sorted keys, two-space indent, UTF-8, a final newline."""
    return (json.dumps(doc, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def hyper(*, r, alpha, dropout, base) -> dict:
    """The hyperparameters as the configs name them."""
    return {"lora_r": r, "lora_alpha": alpha, "lora_dropout": dropout, "base_model_name_or_path": base}


def target_modules_value(targets) -> str | list | None:
    """``target_modules`` for JSON: a regex string as is; a set in sorted order (PEFT keeps
    them in a set, whose order changes from one process to the next); a list as given."""
    if targets is None or isinstance(targets, str):
        return targets
    if isinstance(targets, (set, frozenset)) and all(isinstance(t, str) for t in targets):
        return sorted(targets)
    return list(targets)


def root_config(num_experts: int, hyper: Mapping, *, extra: Mapping | None = None) -> dict:
    """The root ``config.json``: what tells a reader "a PEFT-only DyLoRA-MoE checkpoint".

    Only the keys of ``ROOT_HYPER_KEYS`` present in ``hyper`` are written (a value may be
    None: JSON null, "not known"); ``extra`` is added last and wins."""
    cfg = {"model_type": layout.DYLORA_MODEL_TYPE, "checkpoint_type": layout.PEFT_ONLY_TYPE,
           "num_experts": num_experts}
    cfg.update({k: hyper[k] for k in ROOT_HYPER_KEYS if k in hyper})
    cfg.update(extra or {})
    return cfg


def moe_config(num_experts: int, hyper: Mapping, target_modules: Iterable[str] | str, *,
               under: Mapping | None = None, over: Mapping | None = None) -> dict:
    """``dylo_moe_state/config.json``: the expert count and hyperparameters, over ``under``
    (what is known besides: a source's own MoE config, the router's hidden size, top_k,
    temperature) and under ``over`` (what the user asked to add)."""
    cfg = dict(under or {})
    cfg.update({"num_experts": num_experts, **{k: hyper[k] for k in ROOT_HYPER_KEYS},
                "target_modules": target_modules_value(target_modules)})
    cfg.update(over or {})
    return cfg


def lora_config(*, r: int, alpha, dropout, base, target_modules, rank_pattern: Mapping,
                lora_bias: bool) -> dict:
    """The ``peft.LoraConfig`` keyword arguments of one expert adapter that migrate writes."""
    return {"r": r, "lora_alpha": alpha, "lora_dropout": dropout,
            "target_modules": target_modules_value(target_modules), "bias": "none",
            "task_type": layout.LORA_TASK_TYPE, "base_model_name_or_path": base,
            "rank_pattern": dict(rank_pattern), "lora_bias": lora_bias, "inference_mode": True}


def peft_config_writer(config: Mapping) -> Callable[[str], None]:
    """A writer of ``adapter_config.json`` at a path: the file PEFT writes for ``config``,
    with target_modules in sorted order (PEFT keeps them in a set)."""

    def write(path: str) -> None:
        from peft import LoraConfig
        LoraConfig(**config).save_pretrained(os.path.dirname(path))
        with open(path, encoding="utf-8") as fh:
            written = json.load(fh)
        if isinstance(written.get("target_modules"), list):
            written["target_modules"] = sorted(written["target_modules"])
            with open(path, "w", encoding="utf-8") as fh:
                json.dump(written, fh, indent=2, sort_keys=True)
                fh.write("\n")
    return write


__all__ = ["json_bytes", "hyper", "root_config", "moe_config", "lora_config", "peft_config_writer",
           "target_modules_value", "ROOT_HYPER_KEYS"]
