"""Low-rank extraction: turn a fine-tune's weight deltas into a PEFT LoRA adapter.

For a linear module with base weight W0 and fine-tuned weight W, D = W − W0 (float32) is
approximated by B·A with A = diag(√s_r)·V_rᵀ and B = U_r·diag(√s_r); ``lora_alpha = r``
makes PEFT's scale 1, so B·A is (to the certified tolerance) the best rank-r approximation.

How a module is decomposed (``decompose``, ``method="auto"``):

1. A randomized subspace iteration (Gaussian start, QR after every product, k = r + p columns
   with p = max(8, r/2), one power iteration) gives an orthonormal basis Q and the Ritz
   values σ̃ of QᵀD. Its rank-r truncation has error² E_r² = ‖D‖² − Σ_{i≤r} σ̃_i², computed
   exactly (directly, as ‖D − QQᵀD‖², where the subtraction of norms would cancel).
2. The best possible error² is E*² = ‖D‖² − Σ_{i≤r} σ_i²; only the deficit δ = E_r² − E*²
   is unknown. With M = (I − QQᵀ)D, DᵀD = (QᵀD)ᵀ(QᵀD) + MᵀM exactly, and Ky Fan's maximum
   principle (split any r-frame into its part along the top Ritz vectors W_r and the rest)
   bounds δ ≤ r·min_λ max{(1+λ)ρ², (1+1/λ)ν² − g}, where ρ = ‖M·W_r‖₂ (how much of D along
   W_r the basis still misses), g = σ̃_r² − σ̃_{r+1}² (the gap the sketch sees) and ν = ‖M‖₂;
   also δ ≤ r·ν² and δ ≤ ‖M‖²_F. ρ and g are computed. For ν, ‖M‖_F is tried first (free and
   deterministic); when that is too coarse, a Gaussian probe X of 8 columns gives a bound
   that fails with probability 1e-6 at most: ‖(MᵀM)ʲX‖²_F ≥ ν^{4j}·χ²₈ and P(χ²₈ < τ) = 1e-6.
3. The result is accepted when E_r ≤ 1.01·√(E_r² − δ_bound), i.e. when it is proven within
   1% of the exact SVD's error (in exact arithmetic), or when E_r is at float32 rounding
   level. Otherwise up to two more power iterations, then a wider sketch (k = 4r + 16, which
   brings ν under the gap of a steadily decaying spectrum) and, failing all that, the exact
   ``torch.linalg.svd``. Spectra with no gap at r (a flat noise floor, heavy tails) are what
   falls back; so are matrices too small for a sketch to pay (3k > min(out, in)).

``--energy e`` picks the smallest r with Σ_{i≤r} σ_i² ≥ e·‖D‖²; the randomized choice is
accepted only when the same bound proves that r − 1 does not reach e.

``extract(..., max_error=E)`` holds each module to a relative error of E, or to the rounding
of its merged weight in its own dtype where that is larger (``rounding_floor``). A module above
both gets the smallest rank within them from its exact singular values (``rank_for_error``);
where the randomized factors missed the bound by their 1% but the exact ones meet it, the exact
ones are kept. The modules above it are reported (``Extraction.over_bound``), not refused: the
caller decides.

This module, ``decompose`` and ``tensor_source`` import torch at their top: only the execution
of an svd migrate, the loader and the command line entry (``python -m ckpt_tools.migrate.lowrank``)
import them. What an extraction produced is in ``extraction`` (no torch).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import zlib
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import spelled
from ..fs import FileOps
from ..layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CANONICAL_KEY_PREFIX, MIGRATE_TMP_PREFIX
from ..tensor_io import bit_equal
from .decompose import (TOLERANCE, Decomposition, decompose, fro_norm, rank_for_error,
                        rounding_floor)
from .extraction import Extraction, OverBound
from .tensor_source import (OUTPUT_EMBEDDINGS, BaseMismatch, TensorSource,
                            check_same_architecture, input_embedding)

__all__ = ["Decomposition", "decompose", "rank_for_error", "rounding_floor", "TensorSource",
           "Extraction", "OverBound", "BaseMismatch", "extract", "adapter_files", "write_adapter", "main"]

# Leaf names of modules that hold a vocabulary axis: never LoRA targets, full copies instead.
_EMBEDDING_LEAVES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out",
                               "word_embeddings", "position_embeddings", "token_type_embeddings",
                               "embed_positions", "shared"})


_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}") from None


def _resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for, but torch sees no CUDA device")
    return dev


def _module_of(name: str) -> tuple[str, str]:
    module, _, leaf = name.rpartition(".")
    return module, leaf


def _to_device(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """float32 on ``dev``; a half-precision tensor crosses to a GPU before it is widened."""
    if dev.type != "cpu" and t.element_size() < 4:
        return t.to(dev).float()
    return t.to(dev, torch.float32)


def _seed_for(module: str) -> int:
    return zlib.crc32(module.encode("utf-8"))


@dataclass
class _Done:
    """One linear module, read and decomposed (a, b None: its weight did not change)."""

    module: str
    dtype: torch.dtype                 # what A/B are stored as
    bias_delta: torch.Tensor | None
    read_s: float = 0.0
    decompose_s: float = 0.0
    a: torch.Tensor | None = None
    b: torch.Tensor | None = None
    rank: int = 0
    error: float = 0.0
    exact: bool = False
    over: OverBound | None = None      # above max_error and the rounding floor
    at_floor: bool = False             # above max_error, within the rounding floor


@dataclass(frozen=True)
class _Pair:
    """The base and the fine-tune under logical names: a tied model's lm_head is its input
    embedding (``*_alias``: logical name → the tensor that holds it)."""

    base: TensorSource
    merged: TensorSource
    b_alias: dict[str, str]
    m_alias: dict[str, str]
    b_names: list[str]
    m_names: list[str]

    @classmethod
    def of(cls, bsrc: TensorSource, msrc: TensorSource) -> _Pair:
        b_alias, m_alias = _tied_aliases(bsrc), _tied_aliases(msrc)
        return cls(bsrc, msrc, b_alias, m_alias,
                   list(bsrc.names) + [n for n in b_alias if n not in bsrc],
                   list(msrc.names) + [n for n in m_alias if n not in msrc])

    def missing(self) -> tuple[str, ...]:
        """In the base, not in the fine-tune."""
        m_set = set(self.m_names)
        return tuple(n for n in self.b_names if n not in m_set and n not in self.m_alias)

    def extra(self) -> tuple[str, ...]:
        """In the fine-tune, not in the base (left out)."""
        b_set = set(self.b_names)
        return tuple(n for n in self.m_names if n not in b_set and n not in self.b_alias)

    def common(self) -> list[str]:
        b_set = set(self.b_names)
        return [n for n in self.m_names if n in b_set]

    def merged_real(self, name: str) -> str:
        return self.m_alias.get(name, name)

    def base_real(self, name: str) -> str:
        return self.b_alias.get(name, name)

    def merged_meta(self, name: str):
        return self.merged.meta(self.merged_real(name))

    def base_meta(self, name: str):
        return self.base.meta(self.base_real(name))

    def unchanged(self, name: str) -> bool:
        """Bit-equal in both; the tensors are released after the comparison."""
        m_real, b_real = self.merged_real(name), self.base_real(name)
        same = bit_equal(self.merged.get(m_real), self.base.get(b_real))
        self.merged.release(m_real)
        self.base.release(b_real)
        return same


def _tied_aliases(src: TensorSource) -> dict[str, str]:
    emb = input_embedding(src)
    if emb is None or not src.ties_embeddings():
        return {}
    return {out: emb for out in OUTPUT_EMBEDDINGS[:1] if out not in src}


@dataclass(frozen=True)
class _Split:
    """The common tensors by what becomes of them."""

    linear_weights: dict[str, str]    # module -> its 2-D weight: a LoRA target
    linear_biases: dict[str, str]     # module -> its bias: lora_B.bias when it changed
    others: list[str]                 # norms, embeddings, ...: modules_to_save when changed


def _split_tensors(pair: _Pair) -> _Split:
    """Which common tensors are linear layers; raises ``BaseMismatch`` on a shape that differs."""
    common = pair.common()
    if not common:
        raise BaseMismatch("the base and the fine-tune have no tensor name in common")
    linear_weights: dict[str, str] = {}
    others: list[str] = []
    for name in common:
        module, leaf = _module_of(name)
        dtype, shape = pair.merged_meta(name)
        b_dtype, b_shape = pair.base_meta(name)
        if shape != b_shape:
            raise BaseMismatch(f"{name}: shape {list(shape)} in the fine-tune but "
                               f"{list(b_shape)} in the base")
        is_embedding = _module_of(module)[1] in _EMBEDDING_LEAVES or module in _EMBEDDING_LEAVES
        if leaf == "weight" and len(shape) == 2 and not is_embedding and dtype.is_floating_point:
            linear_weights[module] = name
        else:
            others.append(name)
    linear_biases = {}
    for name in list(others):
        module, leaf = _module_of(name)
        if leaf == "bias" and module in linear_weights:
            linear_biases[module] = name
            others.remove(name)
    return _Split(linear_weights, linear_biases, others)


@dataclass(frozen=True)
class _Asked:
    """What the caller asked of each module's decomposition."""

    rank: int | None
    energy: float | None
    method: str
    tolerance: float
    max_error: float | None
    forced_dtype: torch.dtype | None
    dev: torch.device


def _decompose_module(pair: _Pair, split: _Split, module: str, asked: _Asked) -> _Done:
    """Read one module's weights, decompose its delta: one task of the worker pool."""
    msrc, bsrc = pair.merged, pair.base
    t0 = time.perf_counter()
    wname = split.linear_weights[module]
    w = msrc.get(pair.merged_real(wname))
    w0 = bsrc.get(pair.base_real(wname))
    dtype = asked.forced_dtype or w.dtype
    if not dtype.is_floating_point:
        dtype = torch.float32
    # The delta is formed on the device; a bit-equal pair gives an all-zero delta, which
    # decompose() leaves out. Only a non-finite delta needs a look at the bits.
    delta = _to_device(w, asked.dev) - _to_device(w0, asked.dev)
    if not bool(torch.isfinite(delta).all()):
        if not bit_equal(w, w0):
            raise ValueError(f"{wname}: NaN or Inf in the weight delta")
        delta = None
    msrc.release(pair.merged_real(wname))
    bsrc.release(pair.base_real(wname))
    bias_delta = _bias_delta(pair, split.linear_biases.get(module), dtype)
    t1 = time.perf_counter()
    done = _Done(module, dtype, bias_delta, read_s=t1 - t0)
    if delta is not None:
        dec = decompose(delta, rank=asked.rank, energy=asked.energy, method=asked.method,
                        tolerance=asked.tolerance, seed=_seed_for(module))
        if dec is not None:
            _keep_factors(done, dec, delta)
            if asked.max_error is not None and done.error > asked.max_error:
                floor = rounding_floor(msrc.get(pair.merged_real(wname))) / fro_norm(delta)
                msrc.release(pair.merged_real(wname))
                _hold_to_bound(done, dec, delta, max(asked.max_error, floor))
                done.at_floor = done.over is None
    done.decompose_s = time.perf_counter() - t1
    return done


def _bias_delta(pair: _Pair, bname: str | None, dtype: torch.dtype) -> torch.Tensor | None:
    """A linear layer's bias change in ``dtype``; None when it has no bias or it is unchanged."""
    if bname is None:
        return None
    b, b0 = pair.merged.get(pair.merged_real(bname)), pair.base.get(pair.base_real(bname))
    if bit_equal(b, b0):
        return None
    bd = b.float() - b0.float()
    if not bool(torch.isfinite(bd).all()):
        raise ValueError(f"{bname}: NaN or Inf in the bias delta")
    return bd.to(dtype) if bool((bd != 0).any()) else None


@dataclass
class _Collected:
    """The decomposed modules, gathered in the order of the fine-tune."""

    lora_state: dict[str, torch.Tensor] = field(default_factory=dict)
    errors: dict[str, float] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)
    over_bound: list[OverBound] = field(default_factory=list)
    at_floor: list[str] = field(default_factory=list)
    bias_deltas: dict[str, torch.Tensor] = field(default_factory=dict)
    out_features: dict[str, int] = field(default_factory=dict)
    skipped: list[str] = field(default_factory=list)
    same_as_base: dict[str, bool] = field(default_factory=dict)   # the other tensors
    fallbacks: int = 0
    read_s: float = 0.0
    decompose_s: float = 0.0
    stopped: bool = False      # at the first module over the bound: the rest not decomposed

    def add(self, done: _Done, shape) -> None:
        module = done.module
        self.read_s += done.read_s
        self.decompose_s += done.decompose_s
        self.out_features[module] = shape[0]
        if done.a is not None:
            self.lora_state[_lora_key(module, "lora_A", "weight")] = done.a
            self.lora_state[_lora_key(module, "lora_B", "weight")] = done.b
            self.errors[module] = done.error
            self.ranks[module] = done.rank
            self.fallbacks += int(done.exact)
            if done.over is not None:
                self.over_bound.append(done.over)
            elif done.at_floor:
                self.at_floor.append(module)
        if done.bias_delta is not None:
            self.bias_deltas[module] = done.bias_delta.cpu()
            if done.a is None:
                # A bias-only change still needs a LoRA layer for lora_B.bias.
                self.lora_state[_lora_key(module, "lora_A", "weight")] = torch.zeros(
                    1, shape[1], dtype=done.dtype)
                self.lora_state[_lora_key(module, "lora_B", "weight")] = torch.zeros(
                    shape[0], 1, dtype=done.dtype)
                self.errors[module] = 0.0
                self.ranks[module] = 1
        elif done.a is None:
            self.skipped.append(module)


def _worker_count(dev: torch.device, workers: int | None, prefetch: bool) -> int:
    # CPU: one single-threaded BLAS per worker and as many workers as cores, each worker
    # reading and decomposing whole modules. Small matrices gain little from a threaded BLAS,
    # and its barriers stall badly on a shared machine. GPU: up to 8 workers, since reading
    # (page faults, bf16 → float32, host-to-device copies) is what takes the time there.
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else max(
            1, torch.get_num_threads())
    return workers if prefetch else 1


def _load_cuda_backends(dev: torch.device) -> None:
    # torch loads its CUDA linear-algebra backends lazily, and that first load is not
    # thread-safe ("lazy wrapper should be called at most once"): do it here, once.
    probe = torch.eye(2, device=dev)
    torch.linalg.qr(probe)
    torch.linalg.svd(probe)
    torch.linalg.matrix_norm(probe.double(), ord=2)


def _decompose_all(pair: _Pair, split: _Split, asked: _Asked, workers: int,
                   stop_at_first_over: bool = False) -> _Collected:
    """Every linear module decomposed and every other tensor compared, by ``workers`` threads;
    with ``stop_at_first_over``, only up to the first module (in the fine-tune's order) above
    the bound: the modules queued after it are cancelled, the other tensors not compared."""
    got = _Collected()
    saved_threads = torch.get_num_threads()
    if asked.dev.type == "cpu" and workers > 1:
        torch.set_num_threads(1)
    if asked.dev.type == "cuda":
        _load_cuda_backends(asked.dev)
    modules = list(split.linear_weights)
    futures: dict[int, Future] = {}
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank") as pool:
            try:
                # At most 2 modules per worker in flight: memory stays bounded by module size.
                ahead = 2 * workers
                for i in range(min(ahead, len(modules))):
                    futures[i] = pool.submit(_decompose_module, pair, split, modules[i], asked)
                for i, module in enumerate(modules):
                    done = futures.pop(i).result()
                    if i + ahead < len(modules):
                        futures[i + ahead] = pool.submit(_decompose_module, pair, split,
                                                         modules[i + ahead], asked)
                    got.add(done, pair.merged_meta(split.linear_weights[module])[1])
                    if stop_at_first_over and done.over is not None:
                        got.stopped = True
                        for f in futures.values():
                            f.cancel()
                        return got
                # Non-linear tensors and embeddings: compared by the same workers.
                got.same_as_base = dict(zip(split.others, pool.map(pair.unchanged, split.others)))
            except BaseException:
                for f in futures.values():
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(saved_threads)
    return got


def _add_lora_biases(got: _Collected, split: _Split, notes: list[str]) -> bool:
    """``lora_B.bias`` for every target once any bias changed (PEFT's lora_bias is all or
    none); whether it is on."""
    if not got.bias_deltas:
        return False
    for module in got.ranks:
        bd = got.bias_deltas.get(module)
        dtype = got.lora_state[_lora_key(module, "lora_B", "weight")].dtype
        bias = bd.to(dtype) if bd is not None else torch.zeros(got.out_features[module],
                                                                dtype=dtype)
        got.lora_state[_lora_key(module, "lora_B", "bias")] = bias.cpu()
    no_base_bias = [m for m in got.ranks if m not in split.linear_biases]
    if no_base_bias:
        notes.append(f"lora_bias is on for every target, and {len(no_base_bias)} target(s) "
                     f"have no bias in the base (e.g. {no_base_bias[0]}): PEFT warns that "
                     f"such an adapter cannot be merged")
    return True


def _add_modules_to_save(pair: _Pair, got: _Collected, others: list[str],
                         forced_dtype: torch.dtype | None,
                         notes: list[str]) -> tuple[list[str], bool]:
    """Non-linear tensors and embeddings: whole modules go to modules_to_save when any
    changed. (those modules, whether lm_head's copy must stay tied to the embedding's)"""
    changed_modules: list[str] = []
    for name in others:
        if not got.same_as_base[name]:
            module = _module_of(name)[0]
            if module not in changed_modules:
                changed_modules.append(module)
    bsrc, msrc = pair.base, pair.merged
    b_tied = bool(pair.b_alias) or (bsrc.ties_embeddings() and input_embedding(bsrc) is not None)
    m_tied = bool(pair.m_alias) or msrc.ties_embeddings()
    emb_name = input_embedding(msrc)
    emb_module = _module_of(emb_name)[0] if emb_name else None
    out_module = _module_of(OUTPUT_EMBEDDINGS[0])[0]
    ensure_tying = False
    if b_tied and m_tied and emb_module:
        if out_module in changed_modules:
            changed_modules.remove(out_module)
            if emb_module not in changed_modules:
                changed_modules.append(emb_module)
        ensure_tying = emb_module in changed_modules
    elif b_tied and (out_module in changed_modules or emb_module in changed_modules):
        notes.append("the base ties lm_head to the input embeddings but the fine-tune does not: "
                     "PEFT warns about tied layers in modules_to_save when loading")
    for module in changed_modules:
        prefix = module + "."
        for name in pair.m_names:
            if name.startswith(prefix) and "." not in name[len(prefix):]:
                t = msrc.get(pair.merged_real(name))
                if forced_dtype is not None and t.dtype.is_floating_point:
                    t = t.to(forced_dtype)
                got.lora_state[CANONICAL_KEY_PREFIX + name] = t.clone()
    if ensure_tying:
        # PEFT ties lm_head's copy to the embedding's and reads it from the file as well.
        emb = got.lora_state[CANONICAL_KEY_PREFIX + emb_name]
        got.lora_state[CANONICAL_KEY_PREFIX + OUTPUT_EMBEDDINGS[0]] = emb.clone()
    return changed_modules, ensure_tying


def _adapter_config(pair: _Pair, ranks: dict[str, int], modules_to_save: list[str],
                    lora_bias: bool, ensure_tying: bool,
                    base_model_name_or_path: str | None) -> dict:
    """The keyword arguments of ``peft.LoraConfig``: alpha = r, so that PEFT's scale is 1."""
    r_max = max(ranks.values(), default=0)
    differing = {m: r for m, r in sorted(ranks.items()) if r != r_max}
    archs = (pair.merged.config or {}).get("architectures") or []
    task_type = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None
    if base_model_name_or_path is None and pair.base.path is not None:
        base_model_name_or_path = str(pair.base.path)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(modules_to_save) or None,
        "lora_dropout": 0.0,
        "bias": "none",
        "lora_bias": lora_bias,
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    if ensure_tying:
        adapter_config["ensure_weight_tying"] = True
    return adapter_config


def extract(base, merged, *, rank: int | None = None, energy: float | None = None,
            device: str = "auto", out_dtype=None, method: str = "auto",
            tolerance: float = TOLERANCE, base_model_name_or_path: str | None = None,
            prefetch: bool = True, workers: int | None = None,
            max_error: float | None = None, stop_at_first_over: bool = False) -> Extraction:
    """Extract a LoRA adapter that turns ``base`` into ``merged``.

    ``base`` and ``merged`` are anything ``TensorSource.open`` takes. Every 2-D ``.weight``
    of a module that is not an embedding or ``lm_head`` is a linear layer: its delta is
    decomposed at ``rank`` (or the smallest rank keeping ``energy`` of it). Changed biases of
    linear layers become ``lora_B.bias`` (``lora_bias=True``); other changed tensors (norms)
    and a changed embedding or ``lm_head`` are copied whole into ``modules_to_save``.
    Bit-equal tensors and zero deltas are left out. Modules are read and decomposed by
    ``workers`` threads (default: one per core on the CPU, each with a single-threaded BLAS;
    up to 8 on a GPU), at most two modules per worker in memory; ``prefetch=False`` means one
    module at a time. On the CPU, torch's intra-op thread count is 1 while this runs (it is
    restored afterwards), so concurrent extractions in one process should not be mixed.
    A/B are stored in the fine-tune's dtype unless ``out_dtype`` says otherwise.

    ``max_error``: a module whose relative error is above it, and above the rounding floor of
    its merged weight (``rounding_floor``: no reconstruction can be told from the stored
    weights more finely), goes to ``over_bound`` with the smallest rank that would meet it
    (from its exact singular values); the caller decides what that means. Raises
    ``stop_at_first_over``: the caller only wants to know whether every module meets
    ``max_error``; the extraction stops at the first module (in the fine-tune's order) that
    does not, and returns an incomplete ``Extraction`` (``complete`` False: its errors and
    ``over_bound`` cover the modules decomposed so far, it has no adapter config). A full
    fine-tune is then told apart after one module instead of all of them. Raises
    ``BaseMismatch`` (before any tensor is read) when ``base`` is of another architecture
    (``model_type``, ``architectures`` or the sizes in the configs differ), shares no tensor
    with ``merged``, or holds one of another shape.
    """
    if rank is None and energy is None:
        raise ValueError("give rank, energy, or both")
    if max_error is not None and not max_error > 0.0:
        raise ValueError(f"max_error must be positive, got {max_error}")
    t_start = time.perf_counter()
    dev = _resolve_device(device)
    asked = _Asked(rank, energy, method, tolerance, max_error, _resolve_dtype(out_dtype), dev)
    bsrc, msrc = TensorSource.open(base), TensorSource.open(merged)
    check_same_architecture(bsrc, msrc)
    pair = _Pair.of(bsrc, msrc)
    missing, extra = pair.missing(), pair.extra()
    split = _split_tensors(pair)
    workers = _worker_count(dev, workers, prefetch)
    got = _decompose_all(pair, split, asked, workers, stop_at_first_over and max_error is not None)
    if got.stopped:
        return Extraction(
            lora_state={}, adapter_config={}, errors=got.errors, ranks=got.ranks,
            max_rel_error=max(got.errors.values(), default=0.0), skipped=tuple(got.skipped),
            modules_to_save=(), exact_fallbacks=got.fallbacks, missing=missing, extra=extra,
            notes=(), timings={"total_s": time.perf_counter() - t_start, "read_s": got.read_s,
                               "decompose_s": got.decompose_s, "workers": workers},
            device=str(dev), max_error=max_error, over_bound=tuple(got.over_bound),
            complete=False)

    notes: list[str] = []
    lora_bias = _add_lora_biases(got, split, notes)
    changed_modules, ensure_tying = _add_modules_to_save(pair, got, split.others,
                                                         asked.forced_dtype, notes)
    adapter_config = _adapter_config(pair, got.ranks, changed_modules, lora_bias, ensure_tying,
                                     base_model_name_or_path)
    if extra:
        notes.append(f"{len(extra)} tensor(s) of the fine-tune are not in the base and are "
                     f"left out (e.g. {extra[0]})")
    if missing:
        notes.append(f"{len(missing)} tensor(s) of the base are not in the fine-tune "
                     f"(e.g. {missing[0]})")
    if got.at_floor:
        notes.append(f"{len(got.at_floor)} module(s) above max_error {max_error:g} are within the "
                     f"rounding of the merged weights in their dtype (e.g. {got.at_floor[0]}, "
                     f"{got.errors[got.at_floor[0]]:.3g}): accepted, the checkpoint holds them no "
                     f"more precisely")
    return Extraction(
        lora_state=got.lora_state, adapter_config=adapter_config, errors=got.errors,
        ranks=got.ranks, max_rel_error=max(got.errors.values(), default=0.0),
        skipped=tuple(got.skipped), modules_to_save=tuple(sorted(changed_modules)),
        exact_fallbacks=got.fallbacks, missing=missing, extra=extra, notes=tuple(notes),
        timings={"total_s": time.perf_counter() - t_start, "read_s": got.read_s,
                 "decompose_s": got.decompose_s, "workers": workers},
        device=str(dev), max_error=max_error,
        over_bound=tuple(sorted(got.over_bound, key=lambda o: (-o.error, o.module))))


def _keep_factors(done: _Done, dec: Decomposition, delta: torch.Tensor) -> None:
    """A and B in their stored dtype, and their error as stored."""
    a, b = dec.A.to(done.dtype), dec.B.to(done.dtype)
    if done.dtype == torch.float32:
        done.error = dec.rel_error
    else:    # the error of the factors as stored
        done.error = (fro_norm(torch.addmm(delta, b.float(), a.float(), alpha=-1))
                      / fro_norm(delta))
    done.a, done.b, done.rank, done.exact = a.cpu(), b.cpu(), dec.rank, dec.exact_used


def _hold_to_bound(done: _Done, dec: Decomposition, delta: torch.Tensor, bound: float) -> None:
    """``done.error`` is above ``max_error``: within ``bound`` after all, or ``done.over``."""
    if done.error <= bound:
        return
    needed = rank_for_error(delta, bound)
    if needed <= dec.rank and not dec.exact_used:
        # the randomized result is within 1% of the exact one, and that 1% crossed the bound
        _keep_factors(done, decompose(delta, rank=dec.rank, method="exact"), delta)
        if done.error <= bound:
            return
    done.over = OverBound(
        module=done.module, error=done.error, bound=bound, rank=done.rank,
        needed_rank=needed if needed > done.rank else None, full_rank=min(delta.shape),
        dtype=str(done.dtype).removeprefix("torch."))


def _lora_key(module: str, part: str, param: str) -> str:
    return f"{CANONICAL_KEY_PREFIX}{module}.{part}.{param}"


# --------------------------------------------------------------------------------------------
# Writing the adapter
# --------------------------------------------------------------------------------------------

def adapter_files(extraction: Extraction, *, use_peft: bool = True) -> list[tuple[str, Callable[[str], None]]]:
    """The files of the adapter as (name, writer of that file at a path), the weights first.

    With ``use_peft`` the config file is written by ``peft.LoraConfig(...).save_pretrained``
    (exactly what PEFT writes); without it the same keyword arguments are written as JSON,
    which PEFT reads into the same ``LoraConfig`` and which spares the CLI peft's import
    (seconds).
    """
    from safetensors.torch import save_file

    from ..canonical import peft_config_writer

    config = extraction.adapter_config
    if not config.get("target_modules"):
        raise ValueError("nothing to write: no linear module of the fine-tune differs from the "
                         "base, and PEFT needs at least one LoRA target")

    def weights(path: str) -> None:
        save_file({k: v.contiguous() for k, v in extraction.lora_state.items()}, path,
                  metadata={"format": "pt"})

    def plain_config(path: str) -> None:
        Path(path).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")

    return [(ADAPTER_WEIGHTS, weights),
            (ADAPTER_CONFIG, peft_config_writer(config) if use_peft else plain_config)]


def write_adapter(extraction: Extraction, out_dir, *, use_peft: bool = True,
                  fs: FileOps | None = None) -> list[Path]:
    """Write ``adapter_model.safetensors`` and ``adapter_config.json`` into ``out_dir``
    (``adapter_files``) through the commit protocol: both are written and fsynced in a
    temporary directory inside ``out_dir``, then renamed into place, the weights first, so
    that a config never names weights that are not there."""
    from .. import commit
    from ..fs import local_or

    fs = local_or(fs)
    files = adapter_files(extraction, use_peft=use_peft)
    out = Path(out_dir)
    fs.makedirs(str(out))
    staging = commit.EntriesCommit(str(out), tuple(name for name, _ in files), fs,
                                   tmp_prefix=f"{MIGRATE_TMP_PREFIX}adapter-")

    def write(tmp: str) -> None:
        for name, produce in files:
            fs.write_file(os.path.join(tmp, name), produce)

    commit.commit(staging, write)
    staging.cleanup()
    return [out / name for name, _ in files]


# --------------------------------------------------------------------------------------------
# python -m ckpt_tools.migrate.lowrank
# --------------------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ckpt_tools.migrate.lowrank",
        description="Extract a LoRA adapter from a fine-tuned model and its base.")
    p.add_argument("base", help="base model directory, weights file or cached hub id")
    p.add_argument("merged", help="fine-tuned (merged) model, same forms")
    p.add_argument("out", help="directory for adapter_model.safetensors + adapter_config.json")
    p.add_argument("--rank", type=int, help="LoRA rank (with --energy: the largest rank)")
    p.add_argument("--energy", type=float,
                   help="keep this share of each delta's squared singular values (e.g. 0.99)")
    p.add_argument("--max-error", type=float, metavar="E",
                   help="fail, writing nothing, when a module's relative error is above E "
                        "(and above its weights' rounding); default: report it only")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--out-dtype", choices=sorted(_DTYPES), help="dtype of A/B (default: the "
                   "fine-tune's)")
    p.add_argument("--method", choices=("auto", "randomized", "exact"), default="auto")
    p.add_argument("--no-prefetch", action="store_true", help="read one module at a time")
    p.add_argument("--peft-config", action="store_true",
                   help="write adapter_config.json through peft.LoraConfig (imports peft)")
    p.add_argument("--json", action="store_true", help="print a JSON summary on stdout")
    return p


def _flags(parser: argparse.ArgumentParser) -> dict[str, str]:
    """This script's flag of each argument (``max_error`` → ``--max-error``)."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.rank is None and args.energy is None:
        _parser().error("give --rank, --energy, or both")
    if args.max_error is not None and not 0.0 < args.max_error < math.inf:
        _parser().error("--max-error must be a positive number")
    try:
        result = extract(args.base, args.merged, rank=args.rank, energy=args.energy,
                         device=args.device, out_dtype=args.out_dtype, method=args.method,
                         prefetch=not args.no_prefetch, max_error=args.max_error)
        if result.over_bound:
            if args.json:
                print(json.dumps(result.summary(), indent=2, sort_keys=True))
            why = spelled(result.over_bound_reason(), _flags(_parser()))
            print(f"error: nothing written: {why}", file=sys.stderr)
            return 1
        t0 = time.perf_counter()
        write_adapter(result, args.out, use_peft=args.peft_config)
        write_s = time.perf_counter() - t0
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    summary["timings"]["write_s"] = write_s
    if args.json:
        print(json.dumps(summary, indent=2, sort_keys=True))
    else:
        worst = max(result.errors, key=result.errors.get) if result.errors else None
        print(f"{len(result.errors)} LoRA module(s), r={result.adapter_config['r']}, "
              f"max relative error {result.max_rel_error:.3g}"
              + (f" ({worst})" if worst else "")
              + f", {result.exact_fallbacks} exact fallback(s), {len(result.skipped)} unchanged, "
              f"{len(result.modules_to_save)} module(s) saved whole; "
              f"{result.timings['total_s'] + write_s:.2f} s on {result.device}")
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
