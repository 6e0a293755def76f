"""Ordinary Trainer checkpoints: PEFT adapters of any type (one at the root, or several in
named subdirectories), full models in one file or shards, DeepSpeed and FSDP state.

What makes a checkpoint a DyLoRA-MoE one is decided in ``examine`` (``_is_dylora``); every
other checkpoint is judged here, with the same depth: each adapter's config by its
``peft_type`` and its weights by their header (a LoRA adapter's shapes against its config),
each model file by its header, a shard index against its shards' headers, and the DeepSpeed
and FSDP state by the files their savers always write.
"""

from __future__ import annotations

from typing import NamedTuple

from .. import layout, peft_types
from ..kinds import Layout, ModelKind
from ..layout import Role
from ..problems import BAD_CONFIG, MISSING_FILE, MISSING_TENSOR, WARNING
from .context import _Ctx
from .experts import _check_expert_shapes
from .verdict import DEEP, ExpertInfo

# What a save_model output or checkpoint must hold to be anything at all.
NOTHING_FOUND = ("holds no model weights, PEFT adapter, DyLoRA-MoE tree or DeepSpeed/FSDP "
                 "state")


class Adapter(NamedTuple):
    """One PEFT adapter of a checkpoint: ``name`` is "default" for the one at its root."""

    name: str
    peft_type: str | None


class Ordinary(NamedTuple):
    """What ``examine_ordinary`` found."""

    layout: Layout
    model_kind: ModelKind
    adapters: tuple[Adapter, ...]
    found_anything: bool


def examine_ordinary(ctx: _Ctx, root_cfg: dict | None, merged_files: tuple[str, ...]) -> Ordinary:
    """Judge the adapters and the engine state of an ordinary checkpoint; its model files were
    read already (``examine._read_merged``: headers, shards, index)."""
    adapters = tuple(_check_adapter(ctx, folder) for folder in _adapter_folders(ctx))
    deepspeed = _check_deepspeed(ctx)
    fsdp = _check_fsdp(ctx)
    if merged_files and root_cfg is None and layout.ROOT_CONFIG not in ctx.by_path:
        ctx.add(MISSING_FILE, layout.ROOT_CONFIG, "model weights without the model's config.json: "
                "from_pretrained cannot load them", WARNING)
    sharded = any(ctx.roles[m].role is Role.MERGED_INDEX for m in merged_files)
    if adapters:
        kind = ModelKind.PEFT_ADAPTER
        shape = Layout.ADAPTERS if any(a.name != "default" for a in adapters) else Layout.ADAPTER
    elif merged_files:
        kind = ModelKind.FULL_MODEL
        shape = (Layout.DEEPSPEED if deepspeed else Layout.FSDP if fsdp
                 else Layout.SHARDED if sharded else Layout.MODEL)
    elif deepspeed:
        kind, shape = ModelKind.DEEPSPEED, Layout.DEEPSPEED
    elif fsdp:
        kind, shape = ModelKind.FSDP, Layout.FSDP
    else:
        kind, shape = ModelKind.UNKNOWN, Layout.UNKNOWN
    return Ordinary(shape, kind, adapters, kind is not ModelKind.UNKNOWN)


# --- PEFT adapters -----------------------------------------------------------------

def _adapter_folders(ctx: _Ctx) -> list[str]:
    """The folders ("" for the root, else "<name>/") holding an adapter's config or weights."""
    folders = set()
    for rel, role in ctx.roles.items():
        if role.role in (Role.PEFT_CONFIG, Role.PEFT_WEIGHTS):
            folders.add(rel.rsplit("/", 1)[0] + "/" if "/" in rel else "")
    return sorted(folders)


def _check_adapter(ctx: _Ctx, folder: str) -> Adapter:
    name = folder.rstrip("/") or "default"
    cfg_rel = folder + layout.ADAPTER_CONFIG
    weights = [folder + w for w in (layout.ADAPTER_WEIGHTS, layout.ADAPTER_WEIGHTS_BIN)
               if folder + w in ctx.by_path]
    cfg = None
    if cfg_rel not in ctx.by_path:
        ctx.add(MISSING_FILE, cfg_rel, "the adapter's config is missing: PEFT cannot load its weights")
    elif ctx.readable(cfg_rel, True):
        cfg = ctx.read_json(cfg_rel)
    peft_type = _peft_type(ctx, cfg_rel, cfg)
    if not weights:
        ctx.add(MISSING_FILE, folder + layout.ADAPTER_WEIGHTS, "the adapter's weights are missing")
    for rel in weights:
        if not ctx.readable(rel, True):
            continue
        tensors = ctx.read_tensors(rel)
        if tensors is None or peft_type is None or isinstance(peft_type, _Declared):
            continue
        wrong = peft_types.adapter_tensor_messages(peft_type, tensors)
        for message in wrong:
            ctx.add(MISSING_TENSOR, rel, message)
        if peft_type == "LORA" and not wrong:
            _check_lora_tensors(ctx, rel, tensors, cfg)
    return Adapter(name, peft_type)


def _peft_type(ctx: _Ctx, rel: str, cfg: dict | None) -> str | None:
    """The adapter's peft_type, its config checked as PEFT reads it (by PEFT's own config
    class too, at the deep level); None where it cannot be told."""
    if cfg is None:
        return None
    found = peft_types.check_adapter_config(cfg)
    for message in found.messages:
        ctx.add(BAD_CONFIG, rel, message)
    if ctx.level == DEEP and found.peft_type is not None:
        refusal = peft_types.check_with_peft(cfg)
        if refusal is not None:
            ctx.add(BAD_CONFIG, rel, refusal)
    if found.peft_type is None and isinstance(cfg.get("peft_type"), str):
        return _Declared(cfg["peft_type"][:64])   # reported as declared, never checked against
    return found.peft_type


class _Declared(str):
    """A peft_type PEFT does not know, as its config declares it."""


def _check_lora_tensors(ctx: _Ctx, rel: str, tensors: dict, cfg: dict | None) -> None:
    """A LoRA adapter's tensors: lora_A is [r, in] and lora_B [out, r], as its config says."""
    modules: dict[str, dict] = {}
    for key, t in tensors.items():
        lk = layout.parse_peft_lora_key(key)
        if lk is None:
            continue
        part = lk.part + (f".{lk.param}" if lk.param and lk.param != "weight" else "")
        modules.setdefault(lk.module, {})[part] = t
    ex = ExpertInfo(index=0, source=rel, loaded=True, modules=modules, config=cfg,
                    config_path=rel.rsplit("/", 1)[0] + "/" + layout.ADAPTER_CONFIG
                    if "/" in rel else layout.ADAPTER_CONFIG)
    _check_expert_shapes(ctx, ex, None)


# --- DeepSpeed and FSDP ------------------------------------------------------------

def _engine_dirs(ctx: _Ctx, test) -> dict[str, list[str]]:
    """Top-level directories whose name passes ``test``, with the names of their files."""
    dirs: dict[str, list[str]] = {}
    for rel in ctx.roles:
        parts = rel.split("/")
        if len(parts) >= 2 and test(parts[0]):
            dirs.setdefault(parts[0], []).append(parts[-1])
    return dirs


def _check_deepspeed(ctx: _Ctx) -> bool:
    """DeepSpeed's global_step*/ directories: each holds its model states file, and the tag
    named by ``latest`` is there. True when there is any."""
    tags = _engine_dirs(ctx, layout.is_deepspeed_dir)
    for tag, names in sorted(tags.items()):
        if not any(layout.is_deepspeed_model_states(n) for n in names):
            ctx.add(MISSING_FILE, f"{tag}/mp_rank_00_model_states.pt",
                    "DeepSpeed's model states file of this tag is missing: it cannot be resumed")
    latest = _latest_tag(ctx)
    if latest is not None and latest not in tags:
        ctx.add(MISSING_FILE, f"{latest}/", f"{layout.DEEPSPEED_LATEST} names tag {latest!r}, "
                                            "which is not in the checkpoint")
    return bool(tags)


def _latest_tag(ctx: _Ctx) -> str | None:
    """The tag DeepSpeed's ``latest`` file names (a line of text), where there is one."""
    rel = layout.DEEPSPEED_LATEST
    if rel not in ctx.by_path or not ctx.readable(rel, False):
        return None
    ctx.trace = None  # a read the replay does not record: this checkpoint is judged afresh
    try:
        text = ctx.read_prefix(rel, 257)
    except OSError as exc:
        ctx.os_problem(rel, exc)
        return None
    tag = text.decode("utf-8", "replace").strip()
    if len(text) > 256 or not tag or "/" in tag or tag in (".", ".."):
        ctx.add(BAD_CONFIG, rel, "does not hold a DeepSpeed tag (one short line)", WARNING)
        return None
    return tag


def _check_fsdp(ctx: _Ctx) -> bool:
    """FSDP's sharded state directories: each holds torch.distributed.checkpoint's
    ``.metadata`` and at least one ``.distcp`` shard. True when there is a model directory."""
    dirs = _engine_dirs(ctx, layout.is_fsdp_dir)
    for folder, names in sorted(dirs.items()):
        if layout.FSDP_METADATA not in names:
            ctx.add(MISSING_FILE, f"{folder}/{layout.FSDP_METADATA}",
                    "the sharded state's metadata is missing: torch.distributed.checkpoint cannot read it")
        if not any(n.endswith(layout.FSDP_SHARD_SUFFIX) for n in names):
            ctx.add(MISSING_FILE, f"{folder}/__0_0{layout.FSDP_SHARD_SUFFIX}",
                    "the sharded state holds no .distcp shard")
    return any(ctx.roles[rel].role is Role.ENGINE_WEIGHTS for rel in ctx.roles)
