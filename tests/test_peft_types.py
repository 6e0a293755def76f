"""Adapter configs of every PEFT type, checked as PEFT reads them (ckpt_tools.peft_types).

The table is held against the installed PEFT (every type, every field it names) and against
adapters that PEFT itself saves: one of each type a CPU can build on the tiny Llama.
"""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest

from ckpt_tools.formats.safetensors_header import read_header
from ckpt_tools.peft_types import (PEFT_TYPES, adapter_tensor_messages, check_adapter_config,
                                   check_with_peft)

peft = pytest.importorskip("peft")
from peft import get_peft_model  # noqa: E402
from peft.config import PromptLearningConfig  # noqa: E402
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING  # noqa: E402

from fixtures.dylora import build_base  # noqa: E402

TARGETS = ["q_proj", "v_proj"]
PROMPT = dict(num_virtual_tokens=4, task_type="CAUSAL_LM")

#: The config arguments that make each type build on the tiny Llama (hidden size 32).
BUILD = {
    "LORA": dict(target_modules=TARGETS, r=4, lora_alpha=8, modules_to_save=["lm_head"]),
    "ADALORA": dict(target_modules=TARGETS, total_step=10),
    "IA3": dict(target_modules=["q_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
    "LOHA": dict(target_modules=TARGETS, r=4),
    "LOKR": dict(target_modules=TARGETS, r=4),
    "OFT": dict(target_modules=TARGETS, r=0, oft_block_size=4),
    "BOFT": dict(target_modules=TARGETS, boft_block_size=4),
    "VERA": dict(target_modules=TARGETS, r=4),
    "PVERA": dict(target_modules=TARGETS, r=4),
    "FOURIERFT": dict(target_modules=TARGETS, n_frequency=16),
    "WAVEFT": dict(target_modules=TARGETS, n_frequency=64),
    "LN_TUNING": dict(target_modules=["input_layernorm"]),
    "PROMPT_TUNING": PROMPT,
    "PREFIX_TUNING": PROMPT,
    "P_TUNING": dict(PROMPT, encoder_hidden_size=16),
    "MULTITASK_PROMPT_TUNING": dict(PROMPT, num_tasks=2),
    "CARTRIDGE": PROMPT,
    "CPT": dict(task_type="CAUSAL_LM", cpt_token_ids=[0, 1, 2], cpt_mask=[1, 1, 1],
                cpt_tokens_type_mask=[1, 2, 3]),
    "ADAPTION_PROMPT": dict(adapter_len=4, adapter_layers=1, task_type="CAUSAL_LM"),
    "TRAINABLE_TOKENS": dict(target_modules=["embed_tokens"], token_indices=[0, 1]),
    "POLY": dict(target_modules=TARGETS, n_tasks=2, task_type="CAUSAL_LM"),
    "VBLORA": dict(target_modules=TARGETS, vector_length=8, num_vectors=16),
    "RANDLORA": dict(target_modules=TARGETS),
    "HRA": dict(target_modules=TARGETS),
    "MISS": dict(target_modules=TARGETS, r=8),
    "SHIRA": dict(target_modules=TARGETS, r=2),
    "C3A": dict(target_modules=TARGETS, block_size=8),
    "BEFT": dict(target_modules=TARGETS),
    "DEFT": dict(target_modules=TARGETS),
    "DELORA": dict(target_modules=TARGETS),
    "GLORA": dict(target_modules=TARGETS),
    "GRALORA": dict(target_modules=TARGETS),
    "HIRA": dict(target_modules=TARGETS),
    "LILY": dict(target_modules=TARGETS),
    "PEANUT": dict(target_modules=TARGETS),
    "PSOFT": dict(target_modules=TARGETS),
    "TINYLORA": dict(target_modules=TARGETS),
    "UNILORA": dict(target_modules=TARGETS),
    "FROD": dict(target_modules=TARGETS),
    "ROAD": dict(target_modules=TARGETS, group_size=8),
    "OSF": dict(target_modules=TARGETS),
    "SHADOW": dict(target_modules=TARGETS),
    "SUPERTUNING": dict(target_modules=TARGETS),
}
#: Types this test cannot save on a CPU: AdaMSS needs scikit-learn, X-LoRA a set of trained
#: LoRA adapters to mix (its file holds no fixed fragment: PEFT_TYPES says None).
NOT_BUILT = {"ADAMSS", "XLORA"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[dict, tuple[str, ...]]]:
    """peft_type → (adapter_config.json, the tensor names of adapter_model.safetensors), as
    ``PeftModel.save_pretrained`` writes them."""
    root = tmp_path_factory.mktemp("peft-types")
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for peft_type, kwargs in BUILD.items():
            config = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type](**kwargs)
            model = get_peft_model(build_base(), config)
            model.save_pretrained(str(root / peft_type))
            cfg = json.loads((root / peft_type / "adapter_config.json").read_text())
            names = read_header(root / peft_type / "adapter_model.safetensors").names
            out[peft_type] = (cfg, names)
    return out


def test_the_table_knows_every_type_and_field_of_the_installed_peft():
    assert set(PEFT_TYPES) == {str(t.value) for t in PEFT_TYPE_TO_CONFIG_MAPPING}
    assert set(BUILD) | NOT_BUILT == set(PEFT_TYPES)
    for peft_type, spec in PEFT_TYPES.items():
        config_cls = PEFT_TYPE_TO_CONFIG_MAPPING[peft_type]
        assert spec.config_class == config_cls.__name__, peft_type
        unknown = {name for name, _ in spec.fields} - set(config_cls.__dataclass_fields__)
        assert not unknown, f"{peft_type}: {sorted(unknown)} are not fields of {spec.config_class}"
        assert spec.prompt_learning == issubclass(config_cls, PromptLearningConfig), peft_type


@pytest.mark.parametrize("peft_type", sorted(BUILD))
def test_an_adapter_peft_saved_passes_every_check(saved, peft_type):
    cfg, names = saved[peft_type]
    found = check_adapter_config(cfg)
    assert found.peft_type == peft_type and found.messages == ()
    assert adapter_tensor_messages(peft_type, names) == ()
    assert check_with_peft(cfg) is None


def test_the_parsed_fields_are_the_config_s(saved):
    cfg, _ = saved["LORA"]
    found = check_adapter_config(cfg)
    assert (found.r, sorted(found.target_modules), found.modules_to_save) == (4, TARGETS, ["lm_head"])
    assert not found.prompt_learning and check_adapter_config(saved["P_TUNING"][0]).prompt_learning


@pytest.mark.parametrize("declared, actual, fragment", [
    ("IA3", "LORA", "lora_A"), ("LORA", "IA3", "ia3_l"), ("LOKR", "LOHA", "hada_w1_a"),
    ("LORA", "PROMPT_TUNING", "prompt_embeddings"), ("VERA", "FOURIERFT", "fourierft_spectrum"),
])
def test_tensors_of_another_type_are_named(saved, declared, actual, fragment):
    _, names = saved[actual]
    messages = adapter_tensor_messages(declared, names)
    assert any(fragment in m and f"adapter_config.json says {declared}" in m and actual in m
               for m in messages), messages
    assert any(m.startswith(f"holds no {declared} tensors") for m in messages)


def test_a_file_without_tensors_of_its_type():
    assert adapter_tensor_messages("LORA", []) == ("holds no LORA tensors (names with lora_…)",)
    # modules_to_save copies and resized embeddings carry no tuner's fragment: allowed, not enough
    plain = ["base_model.model.lm_head.weight", "base_model.model.model.embed_tokens.weight"]
    assert adapter_tensor_messages("LORA", plain) == ("holds no LORA tensors (names with lora_…)",)
    assert adapter_tensor_messages("XLORA", []) == ()   # nothing fixed to look for


def test_many_names_cost_one_pass_and_a_short_message():
    names = [f"base_model.model.layers.{i}.q_proj.{'lora_A' if i % 2 else f'x{i}_ia3_l'}.weight"
             for i in range(200_000)]
    names += [f"base_model.model.layers.{i}.mlp.hada_w{i}_a" for i in range(50_000)]
    (message, none) = adapter_tensor_messages("IA3", names)
    assert "holds 150,000 " in message and "and 49,998 more" in message and len(message) < 200
    assert none.startswith("holds no IA3 tensors")


# --- configs PEFT refuses: the plain checks find what PEFT's class finds ------------------

BAD = [
    ("LORA", {"r": "8"}, "r must be a positive integer, found '8'"),
    ("LORA", {"lora_alpha": float("nan")}, "lora_alpha must be a finite number, found nan"),
    ("LORA", {"lora_dropout": 5}, "lora_dropout must be a number from 0 to 1, found 5"),
    ("LORA", {"target_modules": [1]}, "target_modules must hold strings"),
    ("LORA", {"target_modules": 7}, "target_modules must be a list or a string, found int"),
    ("LORA", {"rank_pattern": {"q_proj": -1}}, "rank_pattern['q_proj'] must be a positive number, found -1"),
    ("LORA", {"alpha_pattern": []}, "alpha_pattern must be an object, found list"),
    ("LORA", {"use_dora": "yes"}, "use_dora must be true or false, found 'yes'"),
    ("LORA", {"modules_to_save": "lm_head"}, "modules_to_save must be a list, found str"),
    ("LORA", {"layers_to_transform": [-1]}, "layers_to_transform must be a layer index or a list of them, found [-1]"),
    ("IA3", {"feedforward_modules": ["down_proj", "up_proj"]},
     "feedforward_modules must be among target_modules; ['up_proj'] are not"),
    ("OFT", {"r": 4, "oft_block_size": 4}, "exactly one of r (4) and oft_block_size (4) must be non-zero for OFT"),
    ("BOFT", {"boft_block_size": 0, "boft_block_num": 0},
     "exactly one of boft_block_size (0) and boft_block_num (0) must be non-zero for BOFT"),
    ("LOKR", {"alpha": "8"}, "alpha must be a finite number, found '8'"),
    ("VERA", {"r": 0}, "r must be a positive integer, found 0"),
    ("FOURIERFT", {"n_frequency_pattern": {"q_proj": 0}},
     "n_frequency_pattern['q_proj'] must be a positive number, found 0"),
    ("PROMPT_TUNING", {"num_virtual_tokens": 0}, "num_virtual_tokens must be a positive integer, found 0"),
    ("P_TUNING", {"encoder_dropout": -0.5}, "encoder_dropout must be a number from 0 to 1, found -0.5"),
]
#: What PEFT's own class also refuses among them (the rest it takes, and fails later on).
PEFT_REFUSES = {"feedforward_modules", "oft_block_size", "boft_block_num"}


@pytest.mark.parametrize("peft_type, change, message", BAD, ids=[f"{t}-{next(iter(c))}" for t, c, _ in BAD])
def test_one_bad_field_is_one_message_naming_it(saved, peft_type, change, message):
    cfg = dict(saved[peft_type][0], **change)
    assert check_adapter_config(cfg).messages == (message,)
    if set(change) & PEFT_REFUSES:
        refusal = check_with_peft(cfg)
        assert refusal is not None and refusal.startswith(f"peft.{PEFT_TYPES[peft_type].config_class} refuses it: ")


def test_peft_s_own_class_refuses_what_the_plain_checks_leave_to_it(saved):
    cfg = dict(saved["LORA"][0], layers_pattern="layers")          # without layers_to_transform
    assert check_adapter_config(cfg).ok
    assert check_with_peft(cfg).startswith("peft.LoraConfig refuses it: ")
    old_oft = {k: v for k, v in saved["OFT"][0].items() if k != "oft_block_size"}
    assert check_with_peft(old_oft).startswith("peft.OFTConfig refuses it: ")   # its check_kwargs


def test_a_missing_peft_type_is_lora_only_where_peft_reads_it_so(saved, tmp_path):
    cfg = {k: v for k, v in saved["LORA"][0].items() if k != "peft_type"}
    (tmp_path / "adapter_config.json").write_text(json.dumps(cfg))
    # PEFT: LoraConfig.from_pretrained reads it; PeftModel.from_pretrained looks the type up
    assert peft.LoraConfig.from_pretrained(str(tmp_path)).r == 4
    with pytest.raises(KeyError):
        peft.PeftConfig._get_peft_type(str(tmp_path))
    lora = check_adapter_config(cfg, require_type="LORA")
    assert lora.peft_type == "LORA" and lora.ok and check_with_peft(cfg, require_type="LORA") is None
    assert check_adapter_config(cfg).messages == (
        "peft_type is missing; PEFT cannot tell which adapter this is",)


def test_a_type_peft_does_not_know_or_the_caller_cannot_use(saved):
    (message,) = check_adapter_config({"peft_type": "LORA2", "r": 4}).messages
    assert message.startswith("peft_type is 'LORA2', not one PEFT knows (") and "IA3" in message
    assert check_adapter_config(saved["IA3"][0], require_type="LORA").messages == (
        "peft_type is 'IA3', expected 'LORA'",)
    assert check_adapter_config([1]).messages == ("must be a JSON object, found list",)
    assert check_with_peft({"peft_type": "LORA2"}) is None     # check_adapter_config says it


def test_hostile_values_stay_one_short_line():
    found = check_adapter_config({"peft_type": "LORA", "r": 4, "lora_alpha": 10 ** 4000,
                                  "rank_pattern": {"x": "y" * 10_000}})
    assert len(found.messages) == 2 and all(len(m) < 120 for m in found.messages)


def test_importing_it_imports_no_peft_and_no_torch():
    code = ("import sys, ckpt_tools.peft_types as p; p.check_adapter_config({'peft_type': 'IA3'}); "
            "print(sorted(m for m in ('torch', 'peft', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.stdout.strip() == "[]"
