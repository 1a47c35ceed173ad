"""Top right singular vectors of masked Jacobians, without forming the Jacobian.

For regions with masks ``m_i`` and the map ``f: h -> eps`` (the decoder half of the U-Net, skips fixed),
``J_i = d(m_i * f)/dh``. Block subspace iteration (Haas et al. 2023, as used by Kouzelis et al. 2024) on
``J_i^T J_i``::

    V <- orth(randn(q, d))                       q = k + oversample, seeded
    repeat
        Y  = J V              q JVPs, all regions in one batch
        Ym = m_i * Y
        S  = Ym Ym^T          = V^T (J_i^T J_i) V: Rayleigh-Ritz on the q x q problem
        S  = U diag(sigma^2) U^T   (descending)
        Ritz vectors U^T V, singular values sigma
        V  <- orth(U^T J^T (m_i * Ym))   q VJPs
    until the estimated angle to the converged subspace is below ``tol_deg``

The stopping test compares subspaces, so it is blind to the sign flips and rotations that defeat an
elementwise ``allclose``. It does not stop on the move itself: subspace iteration converges geometrically,
``theta_n ~ rho^n``, so the move ``delta_n`` (largest principal angle between successive top-k Ritz spans)
and the ratio ``rho ~ delta_n / delta_{n-1}`` bound what is left, ``delta_n * rho / (1 - rho)``. On the
default model this estimate is within ~10 % of the true angle to a tightly converged solution, where the move
alone is off by 2x either way (0.5x on a steep spectrum, 1.6x on a flat one). :func:`subspace_iteration` is pure linear algebra over two callables;
:func:`decoder_operators` makes those callables for a model with ``torch.func`` (vmapped ``jvp`` and one
reusable ``vjp``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

Operator = Callable[[Tensor], Tensor]


@dataclass
class SubspaceResult:
    """Per region: the top-k right singular vectors (rows, orthonormal) and singular values."""

    vectors: Tensor  # (N, k, d)
    sigma: Tensor  # (N, k), descending
    iterations: list[int]
    converged: list[bool]
    last_angle_deg: list[float]  # how far the subspace moved in the last iteration
    error_deg: list[float]  # estimated angle to the converged subspace when it stopped (inf: unknown)


def largest_principal_angle(a: Tensor, b: Tensor) -> float:
    """Largest principal angle (degrees) between the row spaces of ``a`` (k, d) and ``b`` (k', d).

    Rows must be orthonormal. Computed from sines (|b - b a^T a|), accurate for tiny angles where arccos of
    cosines is not. For k' <= k it is the angle by which span(b) leaves span(a).
    """
    a = a.to(torch.float64)
    b = b.to(torch.float64)
    resid = b - (b @ a.T) @ a
    s = torch.linalg.matrix_norm(resid, ord=2).clamp(max=1.0)
    return math.degrees(math.asin(float(s)))


def principal_angles(a: Tensor, b: Tensor) -> Tensor:
    """All principal angles (degrees, ascending) between the row spaces of orthonormal ``a`` and ``b``."""
    cos = torch.linalg.svdvals(a.to(torch.float64) @ b.to(torch.float64).T).clamp(-1.0, 1.0)
    return torch.rad2deg(torch.arccos(cos)).sort().values


def orthonormal_rows(x: Tensor) -> Tensor:
    """Orthonormalise the rows of ``x`` (..., q, d) keeping their order (QR)."""
    q, _ = torch.linalg.qr(x.transpose(-1, -2))
    return q.transpose(-1, -2)


def linalg_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype for the small linear algebra (QR, Ritz rotations, JIVE) next to a model running in ``dtype``:
    float32 for the half types (CPU LAPACK has no bf16/fp16 QR, and their precision is too low for
    orthonormalisation), else ``dtype`` itself."""
    return torch.promote_types(dtype, torch.float32)


def remaining_angle(move: float, previous_move: float | None) -> float:
    """Estimated angle (degrees) still to go for a geometrically converging iteration whose last two moves were
    ``previous_move`` and ``move``: ``move * rho / (1 - rho)`` with ``rho = move / previous_move``; ``inf`` when
    the moves do not shrink (no estimate). At most 90 degrees, the largest angle between subspaces."""
    if previous_move is None or not move < previous_move:
        return math.inf
    rho = move / previous_move
    return min(90.0, move * rho / (1.0 - rho))


def fix_signs(v: Tensor) -> Tensor:
    """Make each row's largest-magnitude entry positive, so that singular vectors have deterministic signs."""
    if len(v) == 0:
        return v
    idx = v.abs().argmax(dim=-1, keepdim=True)
    return v * torch.sign(v.gather(-1, idx))


def subspace_iteration(
    jvp: Operator,
    vjp: Operator,
    dim: int,
    masks: Tensor,
    k: int,
    *,
    oversample: int = 3,
    max_iter: int = 50,
    tol_deg: float = 0.1,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    progress: bool = False,
    start: Tensor | None = None,
) -> SubspaceResult:
    """Top-``k`` right singular vectors of ``m_i * J`` for every mask ``m_i`` (rows of ``masks``, (N, out)).

    ``jvp`` maps tangents (m, dim) to (m, out), i.e. ``V -> (J V^T)^T``; ``vjp`` maps cotangents (m, out) to
    (m, dim). All still-unconverged regions share one batched call of each per iteration; a region stops
    iterating once converged: when :func:`remaining_angle` of its last two moves is below ``tol_deg``, or its
    move is below ``tol_deg / 10`` (at the float noise floor the moves stop shrinking). ``seed`` fixes the start,
    independent of ``device``. ``dtype`` is the model's: tangents and cotangents go to ``jvp``/``vjp`` in it, while
    the orthonormalisation and the results use :func:`linalg_dtype` (float32 for bfloat16/float16 models).
    ``start`` (N, q', d), q' <= k + oversample, warm-starts the iteration (e.g. from a neighbouring timestep's
    vectors); the remaining rows of the block are random as without it.
    """
    n_regions = masks.shape[0]
    q = min(k + oversample, dim)
    if not 1 <= k <= q:
        raise ValueError(f"k must be in 1..{dim}, got {k}")
    work = linalg_dtype(dtype)
    masks = masks.to(device=device, dtype=work)
    gen = torch.Generator().manual_seed(seed)
    init = torch.randn(n_regions, q, dim, generator=gen, dtype=torch.float64, device="cpu")  # same start on any device
    if start is not None:
        if start.shape[0] != n_regions or start.shape[1] > q or start.shape[2] != dim:
            raise ValueError(f"start must have shape ({n_regions}, <= {q}, {dim}), got {tuple(start.shape)}")
        init[:, :start.shape[1]] = start.detach().to("cpu", torch.float64)
    v = orthonormal_rows(init).to(device=device, dtype=work)

    vectors = torch.zeros(n_regions, k, dim, dtype=work, device=device)
    sigma = torch.zeros(n_regions, k, dtype=work, device=device)
    iterations = [0] * n_regions
    converged = [False] * n_regions
    last_angle = [float("nan")] * n_regions
    error = [math.inf] * n_regions
    prev: list[Tensor | None] = [None] * n_regions
    active = list(range(n_regions))

    bar = tqdm(total=max_iter, desc="subspace iteration", disable=not progress, leave=False)
    for it in range(1, max_iter + 1):
        va = v[active]  # (A, q, d)
        y = jvp(va.reshape(-1, dim).to(dtype)).to(work).reshape(len(active), q, -1)
        ym = y * masks[active, None, :]
        gram = (ym.double() @ ym.double().transpose(-1, -2))  # (A, q, q) = V^T J_i^T J_i V
        evals, evecs = torch.linalg.eigh(gram)
        evals, evecs = evals.flip(-1), evecs.flip(-1)  # descending
        rot = evecs.transpose(-1, -2).to(work)  # (A, q, q)
        ritz = orthonormal_rows(rot @ va)
        cotangents = (ym * masks[active, None, :]).reshape(-1, ym.shape[-1]).to(dtype)
        z = vjp(cotangents).to(work).reshape(len(active), q, dim)
        v_next = orthonormal_rows(rot @ z)

        still = []
        for j, r in enumerate(active):
            iterations[r] = it
            vectors[r] = ritz[j, :k]
            sigma[r] = evals[j, :k].clamp(min=0).sqrt().to(work)
            if prev[r] is not None:
                move = largest_principal_angle(prev[r], ritz[j, :k])
                error[r] = remaining_angle(move, None if math.isnan(last_angle[r]) else last_angle[r])
                last_angle[r] = move
                if error[r] < tol_deg or move < 0.1 * tol_deg:
                    converged[r] = True
            prev[r] = ritz[j, :k]
            v[r] = v_next[j]
            if not converged[r]:
                still.append(r)
        active = still
        bar.update(1)
        if it > 1:
            bar.set_postfix(left=f"{max(error):.3g} deg")
        if not active:
            break
    bar.close()
    return SubspaceResult(vectors, sigma, iterations, converged, last_angle, error)


def project_out(vectors: Tensor, null: Tensor) -> Tensor:
    """Rows of ``vectors`` (r, d) projected onto the orthogonal complement of the rows of ``null`` (orthonormal),
    re-orthonormalised in order: v <- v - N^T N v (LOCO Edit's null-space projection)."""
    projected = vectors - (vectors @ null.T) @ null
    return orthonormal_rows(projected.double()).to(vectors.dtype)


def locality_ratio(responses: Tensor, mask: Tensor, *, ridge: float = 1e-6) -> tuple[Tensor, Tensor]:
    """Directions in a subspace that put the most of their response inside a region (a generalised eigenproblem).

    ``responses`` (q, out) are ``J b_j`` for an orthonormal basis b_1..b_q of the subspace, ``mask`` (out,) the
    region (weights in [0, 1]). For ``v = sum_j u_j b_j`` the ratio of in-region to out-of-region energy is
    ``u^T A u / u^T C u`` with ``A = Y diag(m) Y^T`` and ``C = Y diag(1 - m) Y^T``; its stationary points solve
    ``A u = lambda C u``. ``C`` gets ``ridge * tr(C) / q`` on its diagonal so that a direction with no outside
    response stays finite. Returns ``(coefficients (q, q): row i is u_i, ratios (q,))``, best first; the
    directions are ``coefficients @ basis``. Float64 throughout.
    """
    y = responses.to(torch.float64)
    m = mask.to(torch.float64).reshape(1, -1)
    a = (y * m) @ y.T
    c = (y * (1 - m)) @ y.T
    q = len(y)
    c = c + ridge * abs(float(torch.trace(c))) / max(q, 1) * torch.eye(q, dtype=torch.float64, device=y.device)
    a, c = (a + a.T) / 2, (c + c.T) / 2
    chol = torch.linalg.cholesky(c)
    inv = torch.linalg.solve_triangular(chol, torch.eye(q, dtype=torch.float64, device=y.device), upper=False)
    evals, evecs = torch.linalg.eigh(inv @ a @ inv.T)
    u = (inv.T @ evecs).flip(-1).T  # rows, descending ratio
    return u / u.norm(dim=1, keepdim=True), evals.flip(-1)


# ---------------------------------------------------------------------- torch.func operators
@contextmanager
def ad_friendly_attention():
    """Use the math SDPA kernel: the fused CPU/GPU kernels have no forward-mode AD (method.md section 8)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        yield


def decoder_operators(decode: Callable[[Tensor], Tensor], h0: Tensor, *, chunk_size: int | None = None):
    """Batched JVP and VJP callables of ``decode`` at ``h0`` (shape (1, *h_shape)).

    Returns ``(jvp, vjp, out)`` where ``jvp``: (m, d) -> (m, out_dim) and ``vjp``: (m, out_dim) -> (m, d), and
    ``out`` is ``decode(h0)``. The VJP closure is built once and reused, so each call costs a backward pass
    only; ``chunk_size`` bounds how many tangents go through the decoder at once (memory).
    """
    from torch.func import jvp as fjvp
    from torch.func import vjp as fvjp
    from torch.func import vmap

    h0 = h0.detach()
    with ad_friendly_attention():
        out, vjp_fn = fvjp(decode, h0)
    out = out.detach()

    def jvp_single(v: Tensor) -> Tensor:
        return fjvp(decode, (h0,), (v.view_as(h0),))[1].reshape(-1)

    def vjp_single(u: Tensor) -> Tensor:
        return vjp_fn(u.view_as(out))[0].reshape(-1)

    def jvp(vs: Tensor) -> Tensor:
        with ad_friendly_attention():
            return vmap(jvp_single, chunk_size=chunk_size)(vs).detach()

    def vjp(us: Tensor) -> Tensor:
        with ad_friendly_attention():
            return vmap(vjp_single, chunk_size=chunk_size)(us).detach()

    return jvp, vjp, out
