"""PEFT adapter configs checked as PEFT reads them, by ``peft_type``.

The table below is what PEFT 0.21 knows: for each ``peft_type`` its config class, the
``adapter_config.json`` fields that decide the adapter's shapes and scaling (with the kind of
value each must hold), and the name fragments its tensors carry in an adapter file as
``get_peft_model_state_dict`` saves them (the adapter name dropped: ``…q_proj.lora_A.weight``,
``…down_proj.ia3_l``, ``prompt_embeddings``). Checking a config against it is plain Python;
``check_with_peft`` asks PEFT's own config class (it imports peft, hence torch), for ``--deep``.

Everything here is a pure function of parsed data: no file is read.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from types import MappingProxyType


# --- plain values ------------------------------------------------------------------

def positive_int(value) -> int | None:
    """``value`` when it is a positive integer (not a bool), else None."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int) and value > 0:
        return value
    return None


def finite_number(value) -> bool:
    """A JSON number that is a finite float (NaN, Infinity and 1e999 parse; 10**4000 overflows)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def short_value(value) -> str:
    """``repr`` of a config value, cut short: a hostile number may have thousands of digits."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} characters)"


# --- the kinds of value a field holds ----------------------------------------------------
# Each returns None when the value is sound, else what a message says after "<field> must be".

def _count(v):
    return None if positive_int(v) is not None else "a positive integer"


def _size(v):       # OFT's r / oft_block_size: one of the pair may be 0
    return None if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else \
        "a non-negative integer"


def _integer(v):
    return None if isinstance(v, int) and not isinstance(v, bool) else "an integer"


def _number(v):
    return None if finite_number(v) else "a finite number"


def _fraction(v):
    return None if finite_number(v) and 0 <= v <= 1 else "a number from 0 to 1"


def _flag(v):
    return None if isinstance(v, bool) else "true or false"


def _layers(v):
    if isinstance(v, int) and not isinstance(v, bool) and v >= 0:
        return None
    if isinstance(v, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                   for i in v):
        return None
    return "a layer index or a list of them"


COUNT, SIZE, INTEGER, NUMBER, FRACTION, FLAG, LAYERS = (
    _count, _size, _integer, _number, _fraction, _flag, _layers)
# modules (a list of names or one regular expression), names (a list), patterns (name → number)
# say more than "must be …": their checks are in _check_field.
MODULES, NAMES, NAMES_OR_STR, PATTERN = "modules", "names", "names-or-str", "pattern"


@dataclass(frozen=True)
class PeftTypeSpec:
    """What one ``peft_type`` means to a reader of its adapter files.

    ``fields``: (field, kind) of the config fields that decide shapes and scaling; a field
    absent or null takes PEFT's default. ``required``: fields without which the adapter's
    shapes cannot be checked. ``fragments``: how a tensor name's component of this type
    begins (None: its tensors are not named by a fixed fragment, so not checked).
    ``companions``: fragments of other tuners that an adapter of this type may also hold.
    ``exclusive``: a pair of fields of which exactly one must be non-zero.
    """

    config_class: str
    fields: tuple[tuple[str, object], ...]
    fragments: tuple[str, ...] | None
    prompt_learning: bool = False
    required: tuple[str, ...] = ()
    companions: tuple[str, ...] = ()
    exclusive: tuple[str, str] | None = None


# What most tuners share (PEFT's BaseTuner configs).
_TARGETS = (("target_modules", MODULES), ("modules_to_save", NAMES))
_TUNER = _TARGETS + (("exclude_modules", MODULES), ("layers_to_transform", LAYERS),
                     ("layers_pattern", MODULES))
_LORA = _TUNER + (("r", COUNT), ("lora_alpha", NUMBER), ("lora_dropout", FRACTION),
                  ("rank_pattern", PATTERN), ("alpha_pattern", PATTERN), ("use_dora", FLAG),
                  ("lora_bias", FLAG), ("use_rslora", FLAG), ("fan_in_fan_out", FLAG))
_LYCORIS = _TUNER + (("r", COUNT), ("alpha", NUMBER), ("rank_dropout", FRACTION),
                     ("module_dropout", FRACTION), ("rank_pattern", PATTERN),
                     ("alpha_pattern", PATTERN), ("use_effective_conv2d", FLAG))
_PROMPT = (("num_virtual_tokens", COUNT), ("token_dim", COUNT), ("num_layers", COUNT),
           ("num_attention_heads", COUNT), ("num_transformer_submodules", COUNT))
_PROMPT_EMBEDDINGS = ("prompt_embeddings",)
_NO_EXCLUDE = ("exclude_modules",)


def _tuner(config_class: str, prefix: str, *extra, drop: tuple[str, ...] = (),
           **kw) -> PeftTypeSpec:
    fields = tuple(f for f in _TUNER if f[0] not in drop) + tuple(extra)
    return PeftTypeSpec(config_class, fields, (prefix,), **kw)


#: Every peft_type PEFT 0.21 knows. The fragments were read off adapters that PEFT itself
#: saved (tests/test_peft_types.py saves one of each type it can build on a CPU and checks).
PEFT_TYPES: Mapping[str, PeftTypeSpec] = MappingProxyType({
    "LORA": PeftTypeSpec("LoraConfig", _LORA, ("lora_",), required=("r",),
                         companions=("trainable_tokens_",)),
    "ADALORA": PeftTypeSpec("AdaLoraConfig", _LORA + (("init_r", COUNT), ("target_r", COUNT)),
                            ("lora_",), companions=("trainable_tokens_",)),
    "IA3": PeftTypeSpec("IA3Config", _TARGETS + (("exclude_modules", MODULES),
                                                 ("feedforward_modules", MODULES),
                                                 ("fan_in_fan_out", FLAG)), ("ia3_",)),
    "LOHA": PeftTypeSpec("LoHaConfig", _LYCORIS, ("hada_",)),
    "LOKR": PeftTypeSpec("LoKrConfig", _LYCORIS + (("decompose_both", FLAG),
                                                   ("decompose_factor", INTEGER)), ("lokr_",)),
    "OFT": _tuner("OFTConfig", "oft_", ("r", SIZE), ("oft_block_size", SIZE),
                  ("module_dropout", FRACTION), ("coft", FLAG), ("eps", NUMBER),
                  ("block_share", FLAG), ("fan_in_fan_out", FLAG),
                  exclusive=("r", "oft_block_size")),
    "BOFT": _tuner("BOFTConfig", "boft_", ("boft_block_size", SIZE), ("boft_block_num", SIZE),
                   ("boft_n_butterfly_factor", COUNT), ("boft_dropout", FRACTION),
                   ("fan_in_fan_out", FLAG), exclusive=("boft_block_size", "boft_block_num")),
    # VeRA shares two projections (base_model.vera_A / vera_B) beside each module's lambdas
    "VERA": _tuner("VeraConfig", "vera_", ("r", COUNT), ("vera_dropout", FRACTION),
                   ("d_initial", NUMBER), ("save_projection", FLAG), drop=_NO_EXCLUDE),
    "PVERA": _tuner("PveraConfig", "pvera_", ("r", COUNT), ("pvera_dropout", FRACTION),
                    ("d_initial", NUMBER), ("save_projection", FLAG), drop=_NO_EXCLUDE),
    "FOURIERFT": _tuner("FourierFTConfig", "fourierft_", ("n_frequency", COUNT),
                        ("scaling", NUMBER), ("n_frequency_pattern", PATTERN)),
    "WAVEFT": _tuner("WaveFTConfig", "waveft_", ("n_frequency", COUNT), ("scaling", NUMBER),
                     ("n_frequency_pattern", PATTERN)),
    "LN_TUNING": PeftTypeSpec("LNTuningConfig", (("target_modules", MODULES),
                                                 ("exclude_modules", MODULES),
                                                 ("modules_to_save", NAMES_OR_STR)),
                              ("ln_tuning_",)),
    "PROMPT_TUNING": PeftTypeSpec("PromptTuningConfig", _PROMPT, _PROMPT_EMBEDDINGS,
                                  prompt_learning=True),
    "PREFIX_TUNING": PeftTypeSpec("PrefixTuningConfig", _PROMPT + (
        ("encoder_hidden_size", COUNT), ("prefix_projection", FLAG)), _PROMPT_EMBEDDINGS,
        prompt_learning=True),
    "P_TUNING": PeftTypeSpec("PromptEncoderConfig", _PROMPT + (
        ("encoder_hidden_size", COUNT), ("encoder_num_layers", COUNT),
        ("encoder_dropout", FRACTION)), _PROMPT_EMBEDDINGS, prompt_learning=True),
    "MULTITASK_PROMPT_TUNING": PeftTypeSpec("MultitaskPromptTuningConfig", _PROMPT + (
        ("num_tasks", COUNT), ("num_ranks", COUNT)), _PROMPT_EMBEDDINGS + ("prefix_task_",),
        prompt_learning=True),
    "CPT": PeftTypeSpec("CPTConfig", _PROMPT, _PROMPT_EMBEDDINGS, prompt_learning=True),
    "CARTRIDGE": PeftTypeSpec("CartridgeConfig", _PROMPT + (("num_frozen_tokens", INTEGER),),
                              _PROMPT_EMBEDDINGS, prompt_learning=True),
    "ADAPTION_PROMPT": PeftTypeSpec("AdaptionPromptConfig", (
        ("adapter_len", COUNT), ("adapter_layers", COUNT)), ("adaption_",)),
    "TRAINABLE_TOKENS": PeftTypeSpec("TrainableTokensConfig", (("target_modules", MODULES),),
                                     ("trainable_tokens_",)),
    "POLY": PeftTypeSpec("PolyConfig", _TARGETS + (
        ("exclude_modules", MODULES), ("r", COUNT), ("n_tasks", COUNT), ("n_skills", COUNT),
        ("n_splits", COUNT)), ("poly_",)),
    "VBLORA": _tuner("VBLoRAConfig", "vblora_", ("r", COUNT), ("num_vectors", COUNT),
                     ("vector_length", COUNT), ("topk", COUNT), ("vblora_dropout", FRACTION)),
    "RANDLORA": _tuner("RandLoraConfig", "randlora_", ("r", COUNT), ("randlora_alpha", NUMBER),
                       ("randlora_dropout", FRACTION), drop=_NO_EXCLUDE),
    "HRA": _tuner("HRAConfig", "hra_", ("r", COUNT)),
    "MISS": _tuner("MissConfig", "miss_", ("r", COUNT), ("mini_r", COUNT),
                   ("miss_dropout", FRACTION)),
    "SHIRA": PeftTypeSpec("ShiraConfig", _TARGETS + (("r", COUNT),), ("shira_",)),
    "C3A": _tuner("C3AConfig", "c3a_", ("block_size", COUNT), ("block_size_pattern", PATTERN),
                  drop=_NO_EXCLUDE),
    "BEFT": PeftTypeSpec("BeftConfig", _TARGETS, ("beft_",)),
    "DEFT": _tuner("DeftConfig", "deft_", ("r", COUNT), ("deft_dropout", FRACTION)),
    "DELORA": _tuner("DeloraConfig", "delora_", ("r", COUNT), ("delora_lambda", NUMBER),
                     ("module_dropout", FRACTION), ("rank_pattern", PATTERN),
                     ("lambda_pattern", PATTERN)),
    "GLORA": PeftTypeSpec("GloraConfig", _TARGETS + (("r", COUNT),), ("glora_",)),
    "GRALORA": _tuner("GraloraConfig", "gralora_", ("r", COUNT), ("hybrid_r", INTEGER),
                      ("alpha", NUMBER), ("gralora_k", COUNT), ("gralora_dropout", FRACTION),
                      drop=_NO_EXCLUDE),
    "HIRA": _tuner("HiraConfig", "hira_", ("r", COUNT), ("hira_dropout", FRACTION),
                   ("rank_pattern", PATTERN)),
    "LILY": _tuner("LilyConfig", "lily_", ("r", COUNT), ("stride_A", COUNT), ("num_B", COUNT),
                   ("scaling", NUMBER)),
    "PEANUT": _tuner("PeanutConfig", "peanut_", ("r", COUNT), ("depth", SIZE),
                     ("scaling", NUMBER)),
    "PSOFT": _tuner("PsoftConfig", "psoft_", ("r", COUNT), ("psoft_alpha", NUMBER),
                    ("psoft_dropout", FRACTION)),
    "TINYLORA": _tuner("TinyLoraConfig", "tinylora_", ("r", COUNT), ("u", COUNT),
                       ("tinylora_dropout", FRACTION), drop=_NO_EXCLUDE),
    "UNILORA": _tuner("UniLoraConfig", "unilora_", ("r", COUNT), ("theta_d_length", COUNT),
                      ("unilora_dropout", FRACTION), drop=_NO_EXCLUDE),
    "FROD": _tuner("FrodConfig", "frod_", ("frod_dropout", FRACTION), ("sparse_rate", FRACTION),
                   drop=_NO_EXCLUDE),
    "ROAD": PeftTypeSpec("RoadConfig", _TARGETS + (("group_size", COUNT),), ("road_",)),
    "OSF": PeftTypeSpec("OSFConfig", _TARGETS + (("rank_pattern", PATTERN),), ("osf_",)),
    "SHADOW": _tuner("ShadowConfig", "shadow_", ("r", COUNT), ("shadow_alpha", NUMBER),
                     ("shadow_dropout", FRACTION)),
    "SUPERTUNING": PeftTypeSpec("SupertuningConfig", _TARGETS + (
        ("r", COUNT), ("lora_alpha", NUMBER), ("lora_dropout", FRACTION),
        ("sparsity", FRACTION)), ("supertuning_",)),
    # needs scikit-learn to build; the fragment is its layers' adapter_layer_names (adamss_A/B)
    "ADAMSS": _tuner("AdamssConfig", "adamss_", ("r", COUNT), ("num_subspaces", COUNT),
                     ("subspace_rank", COUNT), drop=("exclude_modules",)),
    # X-LoRA's file holds its classifier; the LoRA experts it mixes live in their own folders
    "XLORA": PeftTypeSpec("XLoraConfig", (("hidden_size", COUNT), ("xlora_depth", COUNT),
                                          ("xlora_size", COUNT)), None),
})


# --- checking a config ---------------------------------------------------------------

@dataclass(frozen=True)
class AdapterConfigCheck:
    """What ``check_adapter_config`` found. ``messages``: one line each, for a ``bad-config``
    problem on the config file; empty when the config is usable. The parsed fields are those
    the shape checks need, each None where absent or unusable."""

    peft_type: str | None
    messages: tuple[str, ...]
    r: int | None = None
    rank_pattern: dict | None = None
    alpha_pattern: dict | None = None
    target_modules: list | str | None = None
    modules_to_save: list | str | None = None

    @property
    def ok(self) -> bool:
        return not self.messages

    @property
    def prompt_learning(self) -> bool:
        spec = PEFT_TYPES.get(self.peft_type) if isinstance(self.peft_type, str) else None
        return spec is not None and spec.prompt_learning


def _known_types() -> str:
    return ", ".join(sorted(PEFT_TYPES))


def _peft_type_of(cfg: dict, require_type: str | None) -> tuple[str | None, str | None]:
    """(the peft_type the config is read as, the message when it cannot be read as one)."""
    if "peft_type" not in cfg or cfg["peft_type"] is None:
        if require_type is not None:
            # the DyLoRA-MoE loader builds LoraConfig itself, as LoraConfig.from_pretrained does
            return require_type, None
        # PeftModel.from_pretrained looks the class up by this field and fails without it
        return None, "peft_type is missing; PEFT cannot tell which adapter this is"
    peft_type = cfg["peft_type"]
    if require_type is not None and peft_type != require_type:
        return None, f"peft_type is {short_value(peft_type)}, expected {require_type!r}"
    if not isinstance(peft_type, str) or peft_type not in PEFT_TYPES:
        return None, (f"peft_type is {short_value(peft_type)}, not one PEFT knows "
                      f"({_known_types()})")
    return peft_type, None


def _check_field(key: str, kind, value) -> list[str]:
    if kind is MODULES:
        if not isinstance(value, (str, list)):
            return [f"{key} must be a list or a string, found {type(value).__name__}"]
        if isinstance(value, list) and not all(isinstance(t, str) for t in value):
            return [f"{key} must hold strings"]
        return []
    if kind in (NAMES, NAMES_OR_STR):
        if kind is NAMES_OR_STR and isinstance(value, str):
            return []
        if not isinstance(value, list):
            return [f"{key} must be a list, found {type(value).__name__}"]
        if not all(isinstance(t, str) for t in value):
            return [f"{key} must hold strings"]
        return []
    if kind is PATTERN:
        if not isinstance(value, dict):
            return [f"{key} must be an object, found {type(value).__name__}"]
        return [f"{key}[{k!r}] must be a positive number, found {short_value(v)}"
                for k, v in value.items() if not finite_number(v) or v <= 0]
    wanted = kind(value)
    return [] if wanted is None else [f"{key} must be {wanted}, found {short_value(value)}"]


def check_adapter_config(cfg: dict, *, require_type: str | None = None) -> AdapterConfigCheck:
    """Check a parsed ``adapter_config.json`` as PEFT reads it, without importing PEFT.

    The config's ``peft_type`` picks the fields to check (``PEFT_TYPES``); a field absent or
    null takes PEFT's default. ``require_type``: the only type the caller can use (the
    DyLoRA-MoE experts are LoRA); a config without ``peft_type`` is then read as that type,
    as ``LoraConfig.from_pretrained`` reads it, while ``PeftModel.from_pretrained`` refuses it.
    """
    if not isinstance(cfg, dict):
        return AdapterConfigCheck(None, (f"must be a JSON object, found {type(cfg).__name__}",))
    peft_type, refusal = _peft_type_of(cfg, require_type)
    if refusal is not None:
        return AdapterConfigCheck(None, (refusal,))
    spec = PEFT_TYPES[peft_type]
    messages: list[str] = []
    usable: dict[str, object] = {}
    for key, kind in spec.fields:
        value = cfg.get(key)
        if value is None:
            if key in spec.required:
                messages.append(f"{key} must be a positive integer, found None")
            continue
        found = _check_field(key, kind, value)
        messages += found
        if not found:
            usable[key] = value
    messages += _cross_field_messages(spec, peft_type, usable)
    r = usable.get("r")
    return AdapterConfigCheck(
        peft_type, tuple(messages), r=r if positive_int(r) else None,
        rank_pattern=usable.get("rank_pattern"), alpha_pattern=usable.get("alpha_pattern"),
        target_modules=usable.get("target_modules"), modules_to_save=usable.get("modules_to_save"))


def _cross_field_messages(spec: PeftTypeSpec, peft_type: str, usable: dict) -> list[str]:
    """The rules PEFT's config classes enforce across fields (each ``__post_init__``)."""
    out = []
    if spec.exclusive is not None:
        a, b = spec.exclusive
        if a in usable and b in usable and (usable[a] != 0) == (usable[b] != 0):
            out.append(f"exactly one of {a} ({usable[a]}) and {b} ({usable[b]}) must be "
                       f"non-zero for {peft_type}")
    ff, targets = usable.get("feedforward_modules"), usable.get("target_modules")
    if isinstance(ff, list) and isinstance(targets, list):
        outside = sorted(set(ff) - set(targets))
        if outside:
            out.append(f"feedforward_modules must be among target_modules; "
                       f"{short_value(outside)} are not")
    return out


def check_with_peft(cfg: dict, *, require_type: str | None = None) -> str | None:
    """For ``--deep``: the one-line refusal of PEFT's own config class for this config, or
    None when it accepts it or when peft is not installed (or the type is not one it knows:
    ``check_adapter_config`` says so). Imports peft, and with it torch: never call it where
    torch must stay unloaded."""
    peft_type = cfg.get("peft_type") or require_type
    try:
        from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
    except Exception:  # noqa: BLE001 - peft is optional for validation
        return None
    config_cls = PEFT_TYPE_TO_CONFIG_MAPPING.get(peft_type) if isinstance(peft_type, str) else None
    if config_cls is None:
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            # as PeftConfig.from_pretrained reads a file: its check_kwargs, then the fields
            # its class has (newer PEFT releases add fields that older ones drop)
            kwargs = config_cls.check_kwargs(**{k: v for k, v in cfg.items()
                                                if k != "runtime_config"})
            config_cls(**{k: v for k, v in kwargs.items()
                          if k in config_cls.__dataclass_fields__})
    except Exception as exc:  # noqa: BLE001 - any refusal by peft is a config problem
        first = (str(exc).splitlines() or [type(exc).__name__])[0]
        return f"peft.{config_cls.__name__} refuses it: {first}"
    return None


# --- the tensors of an adapter file -------------------------------------------------------

def _fragment_pattern() -> re.Pattern:
    prefixes = {p for spec in PEFT_TYPES.values() for p in (spec.fragments or ())}
    return re.compile("|".join(re.escape(p) for p in sorted(prefixes, key=len, reverse=True)))


_FRAGMENT = _fragment_pattern()
#: How far from a tensor name's end its tuner's component lies (``…q_proj.glora_A.Xd``).
_TAIL_COMPONENTS = 3
_SHOWN = 3


def _fragments_of(name: str) -> Iterable[tuple[str, str]]:
    """(prefix, component) for each component of the name's tail that begins as a tuner's."""
    for component in name.rsplit(".", _TAIL_COMPONENTS)[-_TAIL_COMPONENTS:]:
        m = _FRAGMENT.match(component)
        if m is not None:
            yield m.group(0), component


def adapter_tensor_messages(peft_type: str, tensor_names: Iterable[str]) -> tuple[str, ...]:
    """What is wrong with an adapter file's tensor names for its config's ``peft_type``:
    it holds no tensor of that type, or tensors of another type. Tensors that carry no
    tuner's fragment (``modules_to_save`` copies such as ``lm_head.weight``, resized
    embeddings) are allowed. Linear in the number of names; the messages stay short."""
    spec = PEFT_TYPES.get(peft_type)
    if spec is None or spec.fragments is None:
        return ()
    own_prefixes = set(spec.fragments) | set(spec.companions)
    own = 0
    foreign: dict[str, int] = {}            # component → how many tensors carry it
    for name in tensor_names:
        for prefix, component in _fragments_of(name):
            if prefix in own_prefixes:
                own += 1
                break
        else:
            for prefix, component in _fragments_of(name):
                foreign[component] = foreign.get(component, 0) + 1
                break
    messages = []
    if foreign:
        parts = sorted(foreign)
        shown = "/".join(parts[:_SHOWN]) + (f" and {len(parts) - _SHOWN:,} more" if
                                            len(parts) > _SHOWN else "")
        owners = sorted({t for t, s in PEFT_TYPES.items() if s.fragments and any(
            c.startswith(s.fragments) for c in parts[:_SHOWN])})
        messages.append(f"holds {sum(foreign.values()):,} {shown} tensors (of "
                        f"{' or '.join(owners)}) but adapter_config.json says {peft_type}")
    if own == 0:
        messages.append(f"holds no {peft_type} tensors (names with "
                        f"{' or '.join(spec.fragments)}…)")
    return tuple(messages)
