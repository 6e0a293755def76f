"""Low-rank decomposition of one matrix, certified against the exact SVD (see ``lowrank``
for the method)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

TOLERANCE = 0.01                 # randomized error ≤ (1 + TOLERANCE) × exact SVD error
FAILURE_PROBABILITY = 1e-6       # of the probabilistic bound on ‖M‖₂
_PROBE_COLUMNS = 8
# Bounds on ‖M‖₂ tried in turn: 0 is ‖M‖_F (free, deterministic); then 2, 4, 8 steps of the
# probe, each continuing the last.
_PROBE_SCHEDULE = (0, 2, 4, 8)
_MAX_POWER_ITERS = 5
_F32_EPS = float(torch.finfo(torch.float32).eps)


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


def fro_norm(x: torch.Tensor) -> float:
    """‖x‖_F accurate to float64 rounding: float32 row norms, summed in float64."""
    if x.ndim < 2:
        return float(torch.linalg.vector_norm(x.double()))
    rows = torch.linalg.vector_norm(x.reshape(x.shape[0], -1), dim=1)
    return float(torch.linalg.vector_norm(rows.double()))


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
        """One more power iteration: the basis of Dᵀ·Q is already in hand (w_basis)."""
        self.q = _orth(self.d @ self.w_basis)
        self.iters += 1
        self._finish()

    def _finish(self) -> None:
        self.bt = self.d.T @ self.q                         # (QᵀD)ᵀ, n×k
        self.w_basis, r_factor = torch.linalg.qr(self.bt, mode="reduced")
        # QᵀD = R_factorᵀ · w_basisᵀ: the small SVD, in float64 on the CPU.
        u_s, s, vh_s = torch.linalg.svd(r_factor.T.double().cpu(), full_matrices=False)
        self.sigma = s                                      # float64, CPU, descending
        self.u_small = u_s.to(self.d.device, self.d.dtype)  # k×k
        self.w = self.w_basis @ vh_s.T.to(self.d.device, self.d.dtype)   # n×k right Ritz vectors
        self._probe: torch.Tensor | None = None
        self._probe_log = 0.0
        self._probe_steps = 0
        self._nu_sq = math.inf
        self._resid_sq: float | None = None
        self._leaks: dict[int, float] = {}

    def factors(self, r: int) -> tuple[torch.Tensor, torch.Tensor]:
        root = self.sigma[:r].sqrt().to(self.d.device, self.d.dtype)
        a = root[:, None] * self.w[:, :r].T
        b = (self.q @ self.u_small[:, :r]) * root[None, :]
        return a, b

    def residual_energy(self, norm_d_sq: float) -> float:
        """‖M‖²_F = ‖D − QQᵀD‖²_F, directly when the subtraction of norms would cancel."""
        if self._resid_sq is None:
            tail = norm_d_sq - float((self.sigma ** 2).sum())
            if tail > 1e-2 * norm_d_sq:
                self._resid_sq = tail
            else:
                self._resid_sq = fro_norm(torch.addmm(self.d, self.q, self.bt.T, alpha=-1)) ** 2
        return self._resid_sq

    def error_sq(self, r: int, norm_d_sq: float) -> float:
        return self.residual_energy(norm_d_sq) + float((self.sigma[r:] ** 2).sum())

    def leak(self, r: int) -> float:
        """ρ = ‖M·W_r‖₂: how much of D along the top-r Ritz vectors lies outside Q."""
        if r == 0:
            return 0.0
        if r in self._leaks:
            return self._leaks[r]
        top = self.u_small[:, :r] * self.sigma[:r].to(self.d.device, self.d.dtype)[None, :]
        resid = torch.addmm(self.d @ self.w[:, :r], self.q, top, alpha=-1)
        self._leaks[r] = float(torch.linalg.matrix_norm(resid.double(), ord=2))
        return self._leaks[r]

    def nu_bound_sq(self, steps: int) -> float:
        """An upper bound on ‖M‖₂²; ``steps=0`` gives the deterministic ‖M‖²_F.

        With steps > 0 the bound fails with probability FAILURE_PROBABILITY at most:
        ‖(MᵀM)ʲX₀‖²_F ≥ ν^{4j}·χ²₈ for a Gaussian n×8 probe X₀, so on the event χ²₈ ≥ τ
        every j gives ν² ≤ (‖(MᵀM)ʲX₀‖²_F / τ)^{1/(2j)}; the smallest over j is kept.
        More steps continue the same probe.
        """
        frobenius = self._resid_sq if self._resid_sq is not None else math.inf
        if steps == 0:
            return frobenius
        if self._probe is None:
            gen = _generator(self.d.device, self.seed ^ 0x5EED)
            x = torch.randn(self.n, _PROBE_COLUMNS, device=self.d.device, dtype=self.d.dtype,
                            generator=gen)
            nrm = float(torch.linalg.vector_norm(x))
            self._probe, self._probe_log = x / nrm, math.log(nrm)
        while self._probe_steps < steps and self._nu_sq > 0.0:
            y = self.d @ self._probe
            y = y - self.q @ (self.q.T @ y)
            x = self.d.T @ y                                # (MᵀM)·x, as y ⊥ Q
            nrm = float(torch.linalg.vector_norm(x))
            self._probe_steps += 1
            if nrm == 0.0:
                self._nu_sq = 0.0
                break
            if not math.isfinite(nrm):
                break
            self._probe_log += math.log(nrm)
            self._probe = x / nrm
            j = self._probe_steps
            self._nu_sq = min(self._nu_sq,
                              math.exp((2.0 * self._probe_log - math.log(_TAU)) / (2.0 * j)))
        return min(self._nu_sq, frobenius)

    def deficit_bound(self, r: int, norm_d_sq: float, probe_steps: int) -> float:
        """Upper bound on E_r² − E*² (module docstring, step 2)."""
        s2 = (self.sigma ** 2).tolist()
        gap = s2[r - 1] - (s2[r] if r < len(s2) else 0.0)
        nu2 = self.nu_bound_sq(probe_steps)
        rho2 = self.leak(r) ** 2
        best = min(r * nu2, self.residual_energy(norm_d_sq))
        if math.isfinite(nu2):
            for e in range(-40, 41):
                lam = 2.0 ** (e / 2.0)
                best = min(best, r * max((1.0 + lam) * rho2, (1.0 + 1.0 / lam) * nu2 - gap))
        return max(best, 0.0)

    def certify(self, r: int, norm_d_sq: float, tolerance: float, floor_sq: float,
                target: float | None) -> bool:
        """Is the rank-r truncation within ``tolerance`` of optimal (and r minimal for target)?"""
        err_sq = self.error_sq(r, norm_d_sq)
        ok = err_sq <= floor_sq
        for steps in _PROBE_SCHEDULE:
            if ok:
                break
            ok = _certified(err_sq, self.deficit_bound(r, norm_d_sq, steps), tolerance)
        if ok and target is not None and r > 1:
            # r is the smallest rank only if even the best case for r − 1 misses the target.
            below = float((self.sigma[: r - 1] ** 2).sum())
            ok = any(below + self.deficit_bound(r - 1, norm_d_sq, steps) < target
                     for steps in _PROBE_SCHEDULE)
        return ok


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


# Stage 1: modest oversampling, enough where the spectrum has a gap at r. Stage 2: a wider
# sketch, which lowers ‖M‖₂ below the gap of a steadily decaying spectrum. Each: (the sketch's
# width for a rank guess g, how many power iterations it may take to certify).
_STAGES = ((lambda g: g + max(8, g // 2), 3), (lambda g: 4 * g + 16, 3))


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
    _check_arguments(delta, rank, energy, method)
    d = delta if delta.dtype == torch.float32 else delta.float()
    norm_d = fro_norm(d)
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

    if method != "exact":
        floor_sq = _noise_floor(norm_d, d.shape) ** 2
        target = None if energy is None else energy * norm_d_sq
        guess = cap if target is None else min(cap, 32)
        for stage, (widen, iters) in enumerate(_STAGES):
            sketch, r = _sketch_for_rank(d, guess, cap, widen, method, seed + stage, target)
            if sketch is None:
                break
            r, certified = _certify(sketch, r, cap, iters, method, norm_d_sq, tolerance,
                                    floor_sq, target)
            if certified:
                a, b = sketch.factors(r)
                return finish(a, b, r, sketch.error_sq(r, norm_d_sq), False)
            guess = r
    a, b, r, tail = _exact(d, cap, energy, norm_d_sq)
    return finish(a, b, r, tail, True)


def _check_arguments(delta: torch.Tensor, rank, energy, method: str) -> None:
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


def _sketch_for_rank(d: torch.Tensor, guess: int, cap: int, widen, method: str, seed: int,
                     target: float | None) -> tuple[_Sketch | None, int | None]:
    """A sketch of one stage and the rank it gives: ``cap``, or the energy's rank, the sketch
    doubling ``guess`` until that rank fits in it. (None, None) where ``auto`` finds a sketch
    that wide not worth it (3k > min(out, in)): the exact SVD is then the cheaper way."""
    kmax = min(d.shape)
    while True:
        k = min(widen(guess), kmax)
        if method == "auto" and 3 * k > kmax:
            return None, None
        sketch = _Sketch(d, k, seed)
        sketch.iterate()
        if target is None:
            return sketch, cap
        hit = _smallest_rank_for_energy(sketch.sigma ** 2, target)
        if hit is not None and hit <= guess:
            return sketch, hit
        if guess >= cap or k == kmax:
            return sketch, min(hit or cap, cap)
        guess = min(cap, 2 * guess)


def _certify(sketch: _Sketch, r: int, cap: int, iters: int, method: str, norm_d_sq: float,
             tolerance: float, floor_sq: float, target: float | None) -> tuple[int, bool]:
    """(rank, whether the sketch's rank-r result is accepted), after up to ``iters`` power
    iterations; with an energy target the rank is chosen again after each."""
    for attempt in range(iters):
        if attempt:
            sketch.iterate()
            if target is not None:
                hit = _smallest_rank_for_energy(sketch.sigma ** 2, target)
                r = min(hit, cap) if hit is not None else r
        if method == "randomized" or sketch.certify(r, norm_d_sq, tolerance, floor_sq, target):
            return r, True
    return r, False


def rank_for_error(delta: torch.Tensor, max_error: float) -> int:
    """Smallest r whose best rank-r approximation of ``delta`` has relative error ≤ ``max_error``.

    From the exact singular values: the error² at rank r is the tail Σ_{i≥r} σ_i², summed from
    the smallest up (no cancellation). At most min(delta.shape), whose error is 0.
    """
    d = delta if delta.dtype == torch.float32 else delta.float()
    sq = torch.linalg.svdvals(d).double().cpu() ** 2
    tails = torch.cumsum(sq.flip(0), 0).flip(0)             # tails[r] = error² at rank r
    hits = torch.nonzero(tails <= (max_error * fro_norm(d)) ** 2)
    return max(1, int(hits[0])) if len(hits) else len(sq)


def rounding_floor(w: torch.Tensor) -> float:
    """‖N‖_F of the largest rounding error ``w``'s dtype allows: half a unit in the last place
    of every element. A fine-tune stored in that dtype is known to within this and no better:
    a reconstruction error below it cannot be told from the rounding of the stored weights."""
    if not w.dtype.is_floating_point:
        return 0.0
    x = w if w.dtype in (torch.float32, torch.float64) else w.float()
    _, exponent = torch.frexp(x)          # x = m·2^e, ½ ≤ |m| < 1: ulp(x) = eps·2^(e−1)
    half_ulp = torch.ldexp(torch.full_like(x, torch.finfo(w.dtype).eps / 4), exponent)
    return fro_norm(torch.where(x != 0, half_ulp, torch.zeros_like(half_ulp)))
