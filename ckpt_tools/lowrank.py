"""Low-rank extraction: turn a fine-tune's weight deltas into a PEFT LoRA adapter (SPEC §6).

For a linear module with base weight W0 and fine-tuned weight W, D = W − W0 (float32) is
approximated by B·A with A = diag(√s_r)·V_rᵀ and B = U_r·diag(√s_r); ``lora_alpha = r``
makes PEFT's scale 1, so B·A is (to the certified tolerance) the best rank-r approximation.

How a module is decomposed (``decompose``, ``method="auto"``):

1. A randomized subspace iteration (Gaussian start, QR after every product, oversampling
   p = max(8, r/2)) gives an orthonormal basis Q of k = r + p columns and the Ritz values
   σ̃ of QᵀD. Its rank-r truncation has error² E_r² = ‖D‖² − Σ_{i≤r} σ̃_i², computed exactly.
2. The best possible error² is E*² = ‖D‖² − Σ_{i≤r} σ_i²; only its deficit δ = E_r² − E*²
   is unknown. With M = (I − QQᵀ)D we have DᵀD = (QᵀD)ᵀ(QᵀD) + MᵀM, and Ky Fan's maximum
   principle bounds δ ≤ r·min_λ max{(1+λ)ρ², (1+1/λ)ν² − g}, with ρ = ‖M·W_r‖₂ (how far the
   top Ritz vectors still leak), g = σ̃_r² − σ̃_{r+1}² (the gap the sketch sees) and ν = ‖M‖₂;
   also δ ≤ r·ν² and δ ≤ ‖M‖²_F. ρ and g are computed exactly. ν gets an upper bound that
   holds except with probability 1e-6 over a separate Gaussian probe X (s = 8 columns):
   ‖(MᵀM)ʲX‖²_F ≥ ν^{4j}·χ²₈, and P(χ²₈ < τ) = 1e-6 fixes τ.
3. The result is accepted when E_r ≤ 1.01·√(E_r² − δ_bound), i.e. it is provably within 1%
   of the exact SVD's error (with that probability, in exact arithmetic), or when E_r is at
   float32 rounding level. Otherwise more power iterations are run (up to 5) and, failing
   that, the exact ``torch.linalg.svd`` is used. Flat spectra with no gap at r are the case
   that falls back.

``--energy e`` picks the smallest r with Σ_{i≤r} σ_i² ≥ e·‖D‖²; the randomized choice is
accepted only when the same bound proves that r − 1 does not reach e.

This module imports torch at its top: only the converter and the CLI entry use it.
"""

from __future__ import annotations

import argparse
import json
import math
import mmap
import os
import re
import sys
import threading
import time
import zlib
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .formats.safetensors_header import read_header
from .layout import (ADAPTER_CONFIG, ADAPTER_WEIGHTS, CANONICAL_KEY_PREFIX, MERGED_INDEX,
                     MERGED_SINGLE, ROOT_CONFIG)

__all__ = ["Decomposition", "decompose", "TensorSource", "Extraction", "extract",
           "write_adapter", "main"]

TOLERANCE = 0.01                 # randomized error ≤ (1 + TOLERANCE) × exact SVD error
FAILURE_PROBABILITY = 1e-6       # of the probabilistic bound on ‖M‖₂
_PROBE_COLUMNS = 8
_PROBE_STEPS = 3
_MAX_POWER_ITERS = 5
_F32_EPS = float(torch.finfo(torch.float32).eps)

# Leaf names of modules that hold a vocabulary axis: never LoRA targets, full copies instead.
_EMBEDDING_LEAVES = frozenset({"embed_tokens", "lm_head", "wte", "wpe", "embed_in", "embed_out",
                               "word_embeddings", "position_embeddings", "token_type_embeddings",
                               "embed_positions", "shared"})
_OUTPUT_EMBEDDINGS = ("lm_head.weight", "embed_out.weight")
_INPUT_EMBEDDING_LEAVES = ("embed_tokens", "wte", "embed_in", "word_embeddings")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
if hasattr(torch, "float8_e4m3fn"):
    _SAFETENSORS_DTYPES.update({"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2})


# --------------------------------------------------------------------------------------------
# Decomposition of one matrix
# --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Decomposition:
    """D ≈ B·A. ``A`` is [rank, in], ``B`` is [out, rank], both float32 on D's device."""

    A: torch.Tensor
    B: torch.Tensor
    rank: int
    rel_error: float          # ‖D − B·A‖_F / ‖D‖_F
    exact_used: bool          # the exact SVD was computed (by request or as the fallback)


def _chi2_8_lower_quantile(p: float) -> float:
    """τ with P(χ²₈ < τ) = p (closed form of the χ² CDF for 8 degrees of freedom, bisection)."""
    def cdf(t: float) -> float:
        x = t / 2.0
        return -math.expm1(-x) - math.exp(-x) * (x + x * x / 2.0 + x ** 3 / 6.0)

    lo, hi = 0.0, 8.0
    for _ in range(200):
        mid = (lo + hi) / 2.0
        if cdf(mid) < p:
            lo = mid
        else:
            hi = mid
    return lo


_TAU = _chi2_8_lower_quantile(FAILURE_PROBABILITY)


def _orth(x: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(x, mode="reduced").Q


def _generator(device: torch.device, seed: int) -> torch.Generator:
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    return gen


def _noise_floor(norm_d: float, shape: tuple[int, int]) -> float:
    """An error this small is float32 rounding of D itself: no method can tell them apart."""
    return 4.0 * _F32_EPS * math.sqrt(min(shape)) * norm_d


def _smallest_rank_for_energy(sq: torch.Tensor, target: float) -> int | None:
    """Smallest r with sum(sq[:r]) ≥ target (sq float64, descending), or None."""
    cum = torch.cumsum(sq, 0)
    hits = torch.nonzero(cum >= target)
    return int(hits[0]) + 1 if len(hits) else None


class _Sketch:
    """Randomized subspace iteration on D with its certificate (see the module docstring)."""

    def __init__(self, d: torch.Tensor, k: int, seed: int):
        self.d = d
        self.m, self.n = d.shape
        self.k = k
        self.seed = seed
        gen = _generator(d.device, seed)
        omega = torch.randn(self.n, k, device=d.device, dtype=d.dtype, generator=gen)
        self.q = _orth(d @ omega)
        self.iters = 0
        self._finish()

    def iterate(self) -> None:
        # The orthonormal basis of Dᵀ·Q is already in hand (self.w spans it).
        self.q = _orth(self.d @ self.w_basis)
        self.iters += 1
        self._finish()

    def _finish(self) -> None:
        bt = self.d.T @ self.q                              # (QᵀD)ᵀ, n×k
        self.w_basis, r_factor = torch.linalg.qr(bt, mode="reduced")
        # QᵀD = R_factorᵀ · w_basisᵀ; the small SVD in float64 on the CPU.
        u_s, s, vh_s = torch.linalg.svd(r_factor.T.double().cpu(), full_matrices=False)
        self.sigma = s                                      # float64, CPU, descending
        self.u_small = u_s.to(self.d.device, self.d.dtype)  # k×k
        self.w = self.w_basis @ vh_s.T.to(self.d.device, self.d.dtype)   # n×k right Ritz vectors
        self._nu_bound: float | None = None

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.sigma[:r].sqrt().to(self.d.device, self.d.dtype)
        a = root[:, None] * self.w[:, :r].T
        b = (self.q @ self.u_small[:, :r]) * root[None, :]
        return a, b

    def residual_energy(self, norm_d_sq: float) -> float:
        """‖M‖²_F = ‖D − QQᵀD‖²_F, directly when subtraction would cancel."""
        head = float((self.sigma ** 2).sum())
        tail = norm_d_sq - head
        if tail > 1e-3 * norm_d_sq:
            return tail
        m = self.d - self.q @ (self.w_basis @ self._r_t()).T
        return float(torch.linalg.vector_norm(m).double() ** 2)

    def _r_t(self) -> torch.Tensor:
        # (QᵀD)ᵀ = w_basis · R_factor; rebuild it from the Ritz decomposition.
        return (self.w * self.sigma.to(self.d.device, self.d.dtype)[None, :]) @ self.u_small.T \
            @ torch.linalg.pinv(self.w_basis.T @ self.w_basis) if False else \
            self.w_basis.T @ (self.d.T @ self.q)

    def leak(self, r: int) -> float:
        """ρ = ‖M·W_r‖₂: how much of D's energy along the top Ritz vectors Q misses."""
        wr = self.w[:, :r]
        resid = self.d @ wr - self.q @ (self.u_small[:, :r]
                                        * self.sigma[:r].to(self.d.device, self.d.dtype)[None, :])
        return float(torch.linalg.matrix_norm(resid.double(), ord=2)) if r else 0.0

    def nu_bound_sq(self) -> float:
        """An upper bound on ‖M‖₂², valid except with probability FAILURE_PROBABILITY."""
        if self._nu_bound is not None:
            return self._nu_bound
        gen = _generator(self.d.device, self.seed ^ 0x5EED)
        x = torch.randn(self.n, _PROBE_COLUMNS, device=self.d.device, dtype=self.d.dtype,
                        generator=gen)
        log_norm = math.log(float(torch.linalg.vector_norm(x)))
        x = x / torch.linalg.vector_norm(x)
        best = math.inf
        for step in range(1, _PROBE_STEPS + 1):
            y = self.d @ x
            y = y - self.q @ (self.q.T @ y)
            x = self.d.T @ y                                # (MᵀM)·x, since y ⊥ Q
            nrm = float(torch.linalg.vector_norm(x))
            if nrm == 0.0 or not math.isfinite(nrm):
                best = 0.0 if nrm == 0.0 else best
                break
            log_norm += math.log(nrm)
            x = x / nrm
            # ‖(MᵀM)^j X₀‖²_F ≥ ν^{4j}·χ²₈  ⇒  ν² ≤ (‖(MᵀM)^j X₀‖²_F / τ)^{1/(2j)}
            best = min(best, math.exp((2.0 * log_norm - math.log(_TAU)) / (2.0 * step)))
        self._nu_bound = best
        return best

    def deficit_bound(self, r: int, norm_d_sq: float, resid_sq: float) -> float:
        """Upper bound on E_r² − E*² (module docstring, step 2)."""
        s2 = (self.sigma ** 2).tolist()
        gap = s2[r - 1] - (s2[r] if r < len(s2) else 0.0)
        nu2 = self.nu_bound_sq()
        rho = self.leak(r)
        rho2 = rho * rho
        best = min(r * nu2, resid_sq)
        if math.isfinite(nu2):
            for e in range(-24, 25):
                lam = 2.0 ** (e / 2.0)
                best = min(best, r * max((1.0 + lam) * rho2, (1.0 + 1.0 / lam) * nu2 - gap))
        return max(best, 0.0)


def _certified(err_sq: float, deficit: float, tolerance: float) -> bool:
    return err_sq <= (1.0 + tolerance) ** 2 * max(err_sq - deficit, 0.0)


def _exact(d: torch.Tensor, rank: int | None, energy: float | None, norm_d_sq: float):
    u, s, vh = torch.linalg.svd(d, full_matrices=False)
    s64 = s.double().cpu()
    r = rank if rank is not None else min(d.shape)
    if energy is not None:
        hit = _smallest_rank_for_energy(s64 ** 2, energy * norm_d_sq)
        r = min(r, hit if hit is not None else len(s64))
    root = s[:r].clamp_min(0).sqrt()
    a = root[:, None] * vh[:r]
    b = u[:, :r] * root[None, :]
    tail = float((s64[r:] ** 2).sum())
    return a, b, r, tail


def decompose(delta: torch.Tensor, *, rank: int | None = None, energy: float | None = None,
              method: str = "auto", tolerance: float = TOLERANCE,
              seed: int = 0) -> Decomposition | None:
    """Best rank-r factors B·A of ``delta`` (float32), or None when the delta is zero.

    Give ``rank``, or ``energy`` (the share of Σs² to keep; the smallest such rank is
    chosen), or both (``rank`` then caps the energy's rank). ``method``: ``"auto"``
    (randomized, certified within ``tolerance`` of the exact SVD's error, exact fallback),
    ``"randomized"`` (no fallback), ``"exact"``. ``seed`` makes the randomized path
    deterministic. Raises ValueError for a non-finite delta.
    """
    if rank is None and energy is None:
        raise ValueError("give rank, energy, or both")
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be at least 1, got {rank}")
    if energy is not None and not 0.0 < energy <= 1.0:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if method not in ("auto", "randomized", "exact"):
        raise ValueError(f"unknown method {method!r}")
    if delta.ndim != 2:
        raise ValueError(f"delta must be a matrix, got shape {tuple(delta.shape)}")
    d = delta if delta.dtype == torch.float32 else delta.float()
    norm_d = float(torch.linalg.vector_norm(d))
    if not math.isfinite(norm_d):
        raise ValueError("delta has NaN or Inf entries")
    if norm_d == 0.0:
        return None
    norm_d_sq = norm_d * norm_d
    kmax = min(d.shape)
    cap = min(rank, kmax) if rank is not None else kmax

    def finish(a, b, r, err_sq, exact_used):
        rel = math.sqrt(max(err_sq, 0.0)) / norm_d
        return Decomposition(A=a.contiguous(), B=b.contiguous(), rank=r, rel_error=rel,
                             exact_used=exact_used)

    def exact():
        a, b, r, tail = _exact(d, cap, energy, norm_d_sq)
        return finish(a, b, r, tail, True)

    if method == "exact":
        return exact()

    floor_sq = _noise_floor(norm_d, d.shape) ** 2
    guess = cap if energy is None else min(cap, 32)
    while True:
        p = max(8, guess // 2)
        k = min(guess + p, kmax)
        if method == "auto" and 3 * k > kmax:
            return exact()
        sketch = _Sketch(d, k, seed)
        if energy is None:
            r = cap
            break
        sq = sketch.sigma ** 2
        hit = _smallest_rank_for_energy(sq, energy * norm_d_sq)
        if hit is not None and hit <= k - p // 2:
            r = min(hit, cap)
            break
        if hit is None and k - p // 2 >= cap:
            r = cap
            break
        if k == kmax:
            r = min(hit or k, cap)
            break
        guess = min(cap, 2 * guess)

    for _ in range(1, _MAX_POWER_ITERS + 1):
        sketch.iterate()
        if energy is not None and r < cap:
            sq = sketch.sigma ** 2
            hit = _smallest_rank_for_energy(sq, energy * norm_d_sq)
            if hit is not None:
                r = min(hit, cap)
        resid_sq = sketch.residual_energy(norm_d_sq)
        err_sq = resid_sq + float((sketch.sigma[r:] ** 2).sum())
        if method == "randomized":
            break
        if err_sq <= floor_sq:
            ok = True
        else:
            ok = _certified(err_sq, sketch.deficit_bound(r, norm_d_sq, resid_sq), tolerance)
        if ok and energy is not None and 1 < r < cap:
            # r is the smallest rank only if even the best case for r − 1 misses the target.
            head_below = float((sketch.sigma[: r - 1] ** 2).sum())
            ok = head_below + sketch.deficit_bound(r - 1, norm_d_sq, resid_sq) < energy * norm_d_sq
        if ok:
            break
    else:
        return exact()
    a, b = sketch.factors(r)
    return finish(a, b, r, err_sq, False)
