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

These modules import torch at their top: only the execution of an svd migrate, the loader
and the command line entry (``python -m ckpt_tools.migrate.lowrank``) import them.
"""

from __future__ import annotations

import argparse
import dataclasses
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

from ..fs import FileOps
from ..layout import ADAPTER_CONFIG, ADAPTER_WEIGHTS, CANONICAL_KEY_PREFIX, MIGRATE_TMP_PREFIX
from ..tensor_io import bit_equal
from .decompose import (TOLERANCE, Decomposition, decompose, fro_norm, rank_for_error,
                        rounding_floor)
from .tensor_source import OUTPUT_EMBEDDINGS, TensorSource, input_embedding

__all__ = ["Decomposition", "decompose", "rank_for_error", "rounding_floor", "TensorSource",
           "Extraction", "OverBound", "BaseMismatch", "extract", "adapter_files", "write_adapter", "main"]

# Leaf names of modules that hold a vocabulary axis: never LoRA targets, full copies instead.
_EMBEDDING_LEAVES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out",
                               "word_embeddings", "position_embeddings", "token_type_embeddings",
                               "embed_positions", "shared"})


@dataclass(frozen=True)
class Extraction:
    """A LoRA adapter that reproduces ``merged`` on top of ``base``, and how well it does.

    ``lora_state`` holds PEFT's saved-adapter keys (``base_model.model.<module>.lora_A.weight``,
    ``….lora_B.weight``, ``….lora_B.bias`` and the full tensors of ``modules_to_save``);
    ``adapter_config`` the keyword arguments of ``peft.LoraConfig``. ``errors`` and ``ranks``
    are per LoRA module: ‖D − B·A‖_F / ‖D‖_F with A and B as stored (in their dtype).
    ``skipped`` are modules whose weights did not change (or changed by exactly zero).
    """

    lora_state: dict[str, torch.Tensor]
    adapter_config: dict
    errors: dict[str, float]
    ranks: dict[str, int]
    max_rel_error: float
    skipped: tuple[str, ...]
    modules_to_save: tuple[str, ...]
    exact_fallbacks: int
    missing: tuple[str, ...]          # in the base, not in the fine-tune
    extra: tuple[str, ...]            # in the fine-tune, not in the base (left out)
    notes: tuple[str, ...]
    timings: dict[str, float] = field(default_factory=dict)
    device: str = "cpu"
    max_error: float | None = None    # the bound asked for (None: none)
    over_bound: tuple[OverBound, ...] = ()    # the modules above it, worst first

    @property
    def suggested_rank(self) -> int | None:
        """A ``rank`` that brings every module within the bound: the largest rank needed, and
        no lower than any module's rank now (None: some module meets it at no rank)."""
        if not self.over_bound or any(o.needed_rank is None for o in self.over_bound):
            return None
        return max([o.needed_rank for o in self.over_bound] + list(self.ranks.values()))

    @property
    def suggested_energy(self) -> float | None:
        """``energy`` ≥ 1 − E² leaves a tail of at most E²·‖D‖²: error ≤ E on any spectrum."""
        if not self.over_bound or self.max_error is None or self.max_error >= 1.0:
            return None
        return float(f"{1.0 - self.max_error ** 2:.12g}")

    def over_bound_reason(self, shown: int = 3) -> str | None:
        """One line: the modules above ``max_error`` (worst first), and what would meet it."""
        if not self.over_bound:
            return None
        parts = []
        for o in self.over_bound[:shown]:
            if o.needed_rank is None:
                need = f"no rank meets it with A and B in {o.dtype}"
            elif o.needed_rank == o.full_rank:
                need = f"needs full rank {o.full_rank}"
            else:
                need = f"needs rank {o.needed_rank} of {o.full_rank}"
            parts.append(f"{o.module} {o.error:.3g} ({need})")
        more = len(self.over_bound) - shown
        line = (f"{len(self.over_bound)} of {len(self.errors)} LoRA module(s) above --max-error "
                f"{self.max_error:g}: {', '.join(parts)}" + (f" and {more} more" if more > 0 else ""))
        rank, energy = self.suggested_rank, self.suggested_energy
        if rank is not None:
            line += f"; --rank {rank} or --energy {energy:g} would meet it"
            if rank >= max(o.full_rank for o in self.over_bound):
                line += " (full rank: the delta is not low-rank, as a full fine-tune's is not)"
        else:
            worst = max(o.error for o in self.over_bound if o.needed_rank is None)
            line += f"; --max-error {worst:.3g} would accept it"
        return line

    def summary(self) -> dict:
        """Everything but the tensors, for JSON."""
        return {
            "modules": len(self.errors), "max_rel_error": self.max_rel_error,
            "errors": self.errors, "ranks": self.ranks, "skipped": list(self.skipped),
            "modules_to_save": list(self.modules_to_save),
            "exact_fallbacks": self.exact_fallbacks, "missing": list(self.missing),
            "extra": list(self.extra), "notes": list(self.notes),
            "adapter_config": self.adapter_config, "timings": self.timings,
            "device": self.device, "max_error": self.max_error,
            "over_bound": [o.to_dict() for o in self.over_bound],
            "suggested_rank": self.suggested_rank, "suggested_energy": self.suggested_energy,
        }


@dataclass(frozen=True)
class OverBound:
    """A module whose relative error at the rank used is above the bound asked for."""

    module: str
    error: float                 # ‖D − B·A‖_F / ‖D‖_F, A and B as stored
    bound: float                 # max(max_error, the merged weight's rounding floor / ‖D‖_F)
    rank: int                    # the rank used
    needed_rank: int | None      # the smallest rank within the bound (None: no rank, in dtype)
    full_rank: int               # min(out, in)
    dtype: str                   # of A and B

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class BaseMismatch(ValueError):
    """The base given is not the fine-tune's: another architecture, or tensors of other shapes."""


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


def extract(base, merged, *, rank: int | None = None, energy: float | None = None,
            device: str = "auto", out_dtype=None, method: str = "auto",
            tolerance: float = TOLERANCE, base_model_name_or_path: str | None = None,
            prefetch: bool = True, workers: int | None = None,
            max_error: float | None = None) -> Extraction:
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
    forced_dtype = _resolve_dtype(out_dtype)
    bsrc, msrc = TensorSource.open(base), TensorSource.open(merged)
    _check_same_architecture(bsrc, msrc)
    notes: list[str] = []

    # Logical names: a tied model's lm_head is its input embedding.
    def aliases(src: TensorSource) -> dict[str, str]:
        emb = input_embedding(src)
        if emb is None or not src.ties_embeddings():
            return {}
        return {out: emb for out in OUTPUT_EMBEDDINGS[:1] if out not in src}

    b_alias, m_alias = aliases(bsrc), aliases(msrc)
    b_names = list(bsrc.names) + [n for n in b_alias if n not in bsrc]
    m_names = list(msrc.names) + [n for n in m_alias if n not in msrc]
    b_set, m_set = set(b_names), set(m_names)
    missing = tuple(n for n in b_names if n not in m_set and n not in m_alias)
    extra = tuple(n for n in m_names if n not in b_set and n not in b_alias)
    common = [n for n in m_names if n in b_set]
    if not common:
        raise BaseMismatch("the base and the fine-tune have no tensor name in common")

    def real(src_alias, name):
        return src_alias.get(name, name)

    def meta(src, src_alias, name):
        return src.meta(real(src_alias, name))

    linear_weights: dict[str, str] = {}     # module -> weight name
    others: list[str] = []
    for name in common:
        module, leaf = _module_of(name)
        dtype, shape = meta(msrc, m_alias, name)
        b_dtype, b_shape = meta(bsrc, b_alias, name)
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

    def process(module: str) -> _Done:
        """Read one module's weights, decompose its delta: one task of the worker pool."""
        t0 = time.perf_counter()
        wname = linear_weights[module]
        w = msrc.get(real(m_alias, wname))
        w0 = bsrc.get(real(b_alias, wname))
        dtype = forced_dtype or w.dtype
        if not dtype.is_floating_point:
            dtype = torch.float32
        # The delta is formed on the device; a bit-equal pair gives an all-zero delta, which
        # decompose() leaves out. Only a non-finite delta needs a look at the bits.
        delta = _to_device(w, dev) - _to_device(w0, dev)
        if not bool(torch.isfinite(delta).all()):
            if not bit_equal(w, w0):
                raise ValueError(f"{wname}: NaN or Inf in the weight delta")
            delta = None
        msrc.release(real(m_alias, wname))
        bsrc.release(real(b_alias, wname))
        bias_delta = None
        bname = linear_biases.get(module)
        if bname is not None:
            b, b0 = msrc.get(real(m_alias, bname)), bsrc.get(real(b_alias, bname))
            if not bit_equal(b, b0):
                bd = b.float() - b0.float()
                if not bool(torch.isfinite(bd).all()):
                    raise ValueError(f"{bname}: NaN or Inf in the bias delta")
                if bool((bd != 0).any()):
                    bias_delta = bd.to(dtype)
        t1 = time.perf_counter()
        done = _Done(module, dtype, bias_delta, read_s=t1 - t0)
        if delta is not None:
            dec = decompose(delta, rank=rank, energy=energy, method=method,
                            tolerance=tolerance, seed=_seed_for(module))
            if dec is not None:
                _keep_factors(done, dec, delta)
                if max_error is not None and done.error > max_error:
                    floor = rounding_floor(msrc.get(real(m_alias, wname))) / fro_norm(delta)
                    msrc.release(real(m_alias, wname))
                    _hold_to_bound(done, dec, delta, max(max_error, floor))
                    done.at_floor = done.over is None
        done.decompose_s = time.perf_counter() - t1
        return done

    lora_state: dict[str, torch.Tensor] = {}
    errors: dict[str, float] = {}
    ranks: dict[str, int] = {}
    over_bound: list[OverBound] = []
    at_floor: list[str] = []
    bias_deltas: dict[str, torch.Tensor] = {}
    out_features: dict[str, int] = {}
    skipped: list[str] = []
    fallbacks = 0
    t_read = t_decompose = 0.0

    # CPU: one single-threaded BLAS per worker and as many workers as cores, each worker
    # reading and decomposing whole modules. Small matrices gain little from a threaded BLAS,
    # and its barriers stall badly on a shared machine. GPU: up to 8 workers, since reading
    # (page faults, bf16 → float32, host-to-device copies) is what takes the time there.
    if workers is None:
        workers = min(8, os.cpu_count() or 1) if dev.type == "cuda" else max(
            1, torch.get_num_threads())
    workers = workers if prefetch else 1
    saved_threads = torch.get_num_threads()
    if dev.type == "cpu" and workers > 1:
        torch.set_num_threads(1)
    if dev.type == "cuda":
        # torch loads its CUDA linear-algebra backends lazily, and that first load is not
        # thread-safe ("lazy wrapper should be called at most once"): do it here, once.
        probe = torch.eye(2, device=dev)
        torch.linalg.qr(probe)
        torch.linalg.svd(probe)
        torch.linalg.matrix_norm(probe.double(), ord=2)
    modules = list(linear_weights)
    futures: dict[int, Future] = {}
    try:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="lowrank") as pool:
            try:
                # At most 2 modules per worker in flight: memory stays bounded by module size.
                ahead = 2 * workers
                for i in range(min(ahead, len(modules))):
                    futures[i] = pool.submit(process, modules[i])
                for i, module in enumerate(modules):
                    done = futures.pop(i).result()
                    if i + ahead < len(modules):
                        futures[i + ahead] = pool.submit(process, modules[i + ahead])
                    t_read += done.read_s
                    t_decompose += done.decompose_s
                    shape = meta(msrc, m_alias, linear_weights[module])[1]
                    out_features[module] = shape[0]
                    if done.a is not None:
                        lora_state[_lora_key(module, "lora_A", "weight")] = done.a
                        lora_state[_lora_key(module, "lora_B", "weight")] = done.b
                        errors[module] = done.error
                        ranks[module] = done.rank
                        fallbacks += int(done.exact)
                        if done.over is not None:
                            over_bound.append(done.over)
                        elif done.at_floor:
                            at_floor.append(module)
                    if done.bias_delta is not None:
                        bias_deltas[module] = done.bias_delta.cpu()
                        if done.a is None:
                            # A bias-only change still needs a LoRA layer for lora_B.bias.
                            lora_state[_lora_key(module, "lora_A", "weight")] = torch.zeros(
                                1, shape[1], dtype=done.dtype)
                            lora_state[_lora_key(module, "lora_B", "weight")] = torch.zeros(
                                shape[0], 1, dtype=done.dtype)
                            errors[module] = 0.0
                            ranks[module] = 1
                    elif done.a is None:
                        skipped.append(module)
                # Non-linear tensors and embeddings: compared by the same workers.
                def unchanged(name: str) -> bool:
                    m_real, b_real = real(m_alias, name), real(b_alias, name)
                    same = bit_equal(msrc.get(m_real), bsrc.get(b_real))
                    msrc.release(m_real)
                    bsrc.release(b_real)
                    return same

                same_as_base = dict(zip(others, pool.map(unchanged, others)))
            except BaseException:
                for f in futures.values():
                    f.cancel()
                raise
    finally:
        torch.set_num_threads(saved_threads)

    lora_bias = bool(bias_deltas)
    if lora_bias:
        for module in ranks:
            bd = bias_deltas.get(module)
            dtype = lora_state[_lora_key(module, "lora_B", "weight")].dtype
            bias = bd.to(dtype) if bd is not None else torch.zeros(out_features[module],
                                                                    dtype=dtype)
            lora_state[_lora_key(module, "lora_B", "bias")] = bias.cpu()
        no_base_bias = [m for m in ranks if m not in linear_biases]
        if no_base_bias:
            notes.append(f"lora_bias is on for every target, and {len(no_base_bias)} target(s) "
                         f"have no bias in the base (e.g. {no_base_bias[0]}): PEFT warns that "
                         f"such an adapter cannot be merged")

    # Non-linear tensors and embeddings: whole modules go to modules_to_save when any changed.
    changed_modules: list[str] = []
    for name in others:
        if not same_as_base[name]:
            module = _module_of(name)[0]
            if module not in changed_modules:
                changed_modules.append(module)
    b_tied = bool(b_alias) or (bsrc.ties_embeddings() and input_embedding(bsrc) is not None)
    m_tied = bool(m_alias) or msrc.ties_embeddings()
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
    m_names_set = set(m_names)
    for module in changed_modules:
        prefix = module + "."
        for name in m_names:
            if name.startswith(prefix) and "." not in name[len(prefix):]:
                t = msrc.get(real(m_alias, name))
                if forced_dtype is not None and t.dtype.is_floating_point:
                    t = t.to(forced_dtype)
                lora_state[CANONICAL_KEY_PREFIX + name] = t.clone()
    if ensure_tying:
        # PEFT ties lm_head's copy to the embedding's and reads it from the file as well.
        emb = lora_state[CANONICAL_KEY_PREFIX + emb_name]
        lora_state[CANONICAL_KEY_PREFIX + OUTPUT_EMBEDDINGS[0]] = emb.clone()
    del m_names_set

    r_max = max(ranks.values(), default=0)
    differing = {m: r for m, r in sorted(ranks.items()) if r != r_max}
    config = msrc.config or {}
    archs = config.get("architectures") or []
    task_type = "CAUSAL_LM" if any(str(a).endswith("ForCausalLM") for a in archs) else None
    if base_model_name_or_path is None and bsrc.path is not None:
        base_model_name_or_path = str(bsrc.path)
    adapter_config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model_name_or_path,
        "r": r_max,
        "lora_alpha": r_max,
        "rank_pattern": differing,
        "alpha_pattern": dict(differing),
        "target_modules": sorted(ranks),
        "modules_to_save": sorted(changed_modules) or None,
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
    if extra:
        notes.append(f"{len(extra)} tensor(s) of the fine-tune are not in the base and are "
                     f"left out (e.g. {extra[0]})")
    if missing:
        notes.append(f"{len(missing)} tensor(s) of the base are not in the fine-tune "
                     f"(e.g. {missing[0]})")
    if at_floor:
        notes.append(f"{len(at_floor)} module(s) above max_error {max_error:g} are within the "
                     f"rounding of the merged weights in their dtype (e.g. {at_floor[0]}, "
                     f"{errors[at_floor[0]]:.3g}): accepted, the checkpoint holds them no more "
                     f"precisely")
    total = time.perf_counter() - t_start
    return Extraction(
        lora_state=lora_state, adapter_config=adapter_config, errors=errors, ranks=ranks,
        max_rel_error=max(errors.values(), default=0.0), skipped=tuple(skipped),
        modules_to_save=tuple(sorted(changed_modules)), exact_fallbacks=fallbacks,
        missing=missing, extra=extra, notes=tuple(notes),
        timings={"total_s": total, "read_s": t_read, "decompose_s": t_decompose,
                 "workers": workers},
        device=str(dev), max_error=max_error,
        over_bound=tuple(sorted(over_bound, key=lambda o: (-o.error, o.module))))


# What makes two configs of one model_type different models: the same tensor names can then
# still have the same shapes (another depth: the extra layers would be left out unnoticed).
_ARCHITECTURE_KEYS = ("model_type", "architectures", "num_hidden_layers", "hidden_size",
                      "intermediate_size", "num_attention_heads", "num_key_value_heads")


def _check_same_architecture(bsrc: TensorSource, msrc: TensorSource) -> None:
    """The configs' architecture keys, where both record them."""
    b_cfg, m_cfg = bsrc.config or {}, msrc.config or {}
    for key in _ARCHITECTURE_KEYS:
        b_val, m_val = b_cfg.get(key), m_cfg.get(key)
        if b_val and m_val and b_val != m_val:
            raise BaseMismatch(f"{key} {json.dumps(b_val)} in the base but {json.dumps(m_val)} "
                               f"in the fine-tune")


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
            print(f"error: nothing written: {result.over_bound_reason()}", file=sys.stderr)
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
