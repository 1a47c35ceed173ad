"""Directions towards a reference image, fitted to the edits they make (pure functions).

"Make this mouth like that one": among the region's local h-space directions (a basis ``B``, r rows), find the
coefficients ``c`` whose edit, strength ``|c|`` along ``c @ B / |c|``, brings the region of the edited source
image closest to the reference's while changing the rest of the image as little as possible:

    minimise  sum_j  w_j (x(c)_j - target_j)^2,   target = m * reference + (1 - m) * source,
                                                   w      = m + outside_weight * (1 - m),

where ``x(c)`` is the source regenerated with the edit. The renders are the measurement: Gauss-Newton on ``c``
with the image Jacobian dx/dc taken by finite differences, one batched render of r + 1 images an iteration.
The h difference of the two images says little about how an edit moves the pixels (on the embedded model its
projection onto the region's subspace moved nothing towards the reference, docs/automatic_regions.md); the
fit asks the renders. :func:`fit_local_coefficients` adds a constraint measured on them too: only edits whose
change keeps a given share inside the region.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from localdiff.errors import LocalDiffError
from localdiff.metrics import locality

FIT_METHODS = ("measured", "projected")
OUTSIDE_WEIGHT = 1.0  # weight of a pixel outside the region against one inside (measured: docs/automatic_regions.md)
FIT_ITERATIONS = 3  # Gauss-Newton iterations (each one batched render of r + 1 images; measured: docs/automatic_regions.md)
PROBE = 0.25  # finite-difference step, as a strength (a fraction of |h|)
LINE_SEARCH = (1.0, 1.5, 2.0)  # multiples of the last Gauss-Newton step tried
SHRINK = (0.25, 0.5, 0.75)  # with a constraint, fractions of the whole edit also tried (weaker edits leak less)
RIDGE = 1e-3  # Tikhonov damping, relative to the mean diagonal of the normal matrix
BASIS_RANK_FACTOR = 3  # the measured fit's masked subspace has this many times k vectors (measured: docs/automatic_regions.md)


def reference_target(source: Tensor, reference: Tensor, mask: Tensor, outside_weight: float = OUTSIDE_WEIGHT):
    """The image the fit aims at and each pixel's weight: the reference inside ``mask`` (R, R), the source
    outside, weighted 1 inside and ``outside_weight`` outside. ``source``, ``reference``: (C, R, R).
    Returns ``(target, weights)``, both (C, R, R)."""
    if source.shape != reference.shape:
        raise LocalDiffError(f"the source is {tuple(source.shape)} and the reference {tuple(reference.shape)}; "
                             "give images of the same size")
    if outside_weight < 0:
        raise LocalDiffError(f"outside_weight must be >= 0, got {outside_weight}")
    m = mask.to(source.dtype).expand_as(source)
    return m * reference + (1 - m) * source, m + outside_weight * (1 - m)


def objective(images: Tensor, target: Tensor, weights: Tensor) -> Tensor:
    """Mean weighted squared distance of each of ``images`` (B, ...) to ``target``: (B,)."""
    return (weights * (images - target) ** 2).flatten(1).mean(dim=1)


def weighted_step(responses: Tensor, residual: Tensor, weights: Tensor, ridge: float = RIDGE) -> Tensor:
    """The coefficients ``d`` (r,) minimising sum_j w_j (sum_i d_i responses_ij - residual_j)^2 + ridge * mean
    diag(A) * |d|^2, where A = responses diag(w) responses^T: a damped weighted least-squares step.
    ``responses`` (r, n), ``residual`` and ``weights`` (n,)."""
    g = responses.double()
    w = weights.double().flatten()
    a = (g * w) @ g.T
    b = (g * w) @ residual.double().flatten()
    damp = ridge * float(a.diagonal().mean()) if len(a) else 0.0
    return torch.linalg.solve(a + damp * torch.eye(len(a), dtype=a.dtype, device=a.device), b)


def fit_coefficients(render: Callable[[Tensor], Tensor], size: int, target: Tensor, weights: Tensor, *,
                     iterations: int = FIT_ITERATIONS, probe: float = PROBE, ridge: float = RIDGE,
                     line_search: tuple[float, ...] = LINE_SEARCH,
                     constraint: Callable[[Tensor], Tensor] | None = None, minimum: float = 0.0):
    """Gauss-Newton for the coefficients of an edit: ``render`` maps coefficient rows (B, size) to images (B, ...)
    (row 0 of the first call is all zeros: the unedited image). Each iteration renders the current coefficients
    and ``probe`` along each basis vector in one batch, takes the finite-difference Jacobian and a damped
    weighted least-squares step towards ``target``. The last step is tried at each multiple in ``line_search``
    (one more batch: the renders respond less than linearly to long steps). The coefficients with the lowest
    objective are returned, with the objective of each iteration's start and of the line search's best:
    ``(coefficients (size,), objectives)``. When no step lowers the objective, the first step is returned (the
    linearised best; ``min(objectives) == objectives[0]`` tells).

    ``constraint`` (renders (B, ...) -> scores (B,)) with ``minimum``: the line search's batch also holds the
    final coefficients scaled by each of ``SHRINK``; only rendered coefficients (the iterations' and the line
    search's, never the zeros) that score at least ``minimum`` are candidates, the lowest objective among them
    wins, and the last objective is that of the returned coefficients; when none scores enough, the
    highest-scoring one is returned."""
    if iterations < 1:
        raise LocalDiffError(f"the fit needs at least one iteration, got {iterations}")
    # the fit's small linear algebra in float64 on the CPU (MPS has no float64), whatever renders the images
    target, weights = target.double().cpu(), weights.double().cpu()
    c = torch.zeros(size, dtype=torch.float64, device="cpu")
    best, best_c, history, first = float("inf"), c, [], None
    step = torch.zeros_like(c)
    candidates = []  # (objective, score, coefficients) of every rendered nonzero candidate, for the constraint
    for _ in range(iterations):
        rows = torch.cat([c[None], c[None] + probe * torch.eye(size, dtype=c.dtype, device=c.device)])
        out = render(rows).double().cpu()
        value = float(objective(out[:1], target, weights)[0])
        history.append(value)
        if value < best:
            best, best_c = value, c
        if constraint is not None and first is not None:
            candidates.append((value, float(constraint(out[:1])[0]), c))
        responses = (out[1:] - out[:1]).flatten(1) / probe
        step = weighted_step(responses, (target - out[0]).flatten(), weights, ridge)
        c = c + step
        first = c if first is None else first
    shrinks = SHRINK if constraint is not None else ()
    trials = torch.stack([c + (f - 1) * step for f in line_search] + [f * c for f in shrinks])
    out = render(trials).double().cpu()
    values = objective(out, target, weights)
    if constraint is not None:
        candidates += [(float(v), float(sc), t) for v, sc, t in zip(values, constraint(out), trials)]
        feasible = [x for x in candidates if x[1] >= minimum]
        value, _, chosen = min(feasible, key=lambda x: x[0]) if feasible else max(candidates, key=lambda x: x[1])
        return chosen, history + [value]
    i = int(values.argmin())
    history.append(float(values[i]))
    if float(values[i]) < best:
        best, best_c = float(values[i]), trials[i]
    if not best < history[0]:
        best_c = first
    return best_c, history


def check_min_locality(min_locality: float) -> None:
    """One clear error unless ``min_locality`` is a share in [0, 1)."""
    if not 0.0 <= min_locality < 1.0:
        raise LocalDiffError(f"min_locality is a share of the change inside the region, in [0, 1); got {min_locality}")


def local_combinations(responses: Tensor, mask: Tensor, min_locality: float) -> tuple[Tensor, Tensor]:
    """The combinations of a basis whose change is at least ``min_locality`` local, to first order.

    ``responses`` (r, n): each basis vector's change of the image (finite differences); ``mask`` (n,): 1 inside
    the region. A combination ``c`` changes the image by ``c @ responses``, whose locality (share of the squared
    change inside the mask, as :func:`localdiff.metrics.locality`) is the Rayleigh quotient ``c A c / c B c`` with
    ``A = R diag(m) R^T`` and ``B = R R^T``. The generalised eigenvectors ``A u = lam B u`` are A- and
    B-orthogonal, so any combination of those with ``lam >= min_locality`` is itself at least that local.
    Returns ``(U, lam)``: ``U`` (r, q) the kept eigenvectors as unit columns, most local first, and ``lam`` (r,)
    every eigenvalue, descending. When none reaches ``min_locality`` the most local one is kept (q = 1)."""
    check_min_locality(min_locality)
    g = responses.double().cpu()
    m = mask.double().cpu().flatten()
    a = (g * m) @ g.T
    b = g @ g.T
    eye = torch.eye(len(b), dtype=b.dtype, device=b.device)
    chol = torch.linalg.cholesky(b + 1e-10 * float(b.diagonal().mean()) * eye)  # responses of a real basis: B > 0
    inv = torch.linalg.solve_triangular(chol, eye, upper=False)
    lam, v = torch.linalg.eigh(inv @ a @ inv.T)
    lam, v = lam.flip(0), v.flip(1)
    u = inv.T @ v
    keep = max(1, int((lam >= min_locality).sum()))
    u = u[:, :keep]
    return u / u.norm(dim=0, keepdim=True), lam


def fit_local_coefficients(render: Callable[[Tensor], Tensor], size: int, target: Tensor, weights: Tensor,
                           mask: Tensor, min_locality: float, **kwargs):
    """:func:`fit_coefficients` for an edit whose change keeps at least ``min_locality`` of its squared change
    inside ``mask`` ((R, R) or the shape of ``target``).

    Only edits whose rendered change is that local count (``constraint`` of :func:`fit_coefficients`). The fit
    runs first in the whole basis; when none of its renders is local enough, among the combinations that are
    that local to first order (:func:`local_combinations` on the finite-difference responses of one batched
    render of the probes at zero), then among fewer, more local ones, down to the most local one (the
    first-order bound does not hold for long steps, nor for every combination of them). If no render is local
    enough, the most local edit is returned. ``kwargs`` go to :func:`fit_coefficients`. Returns
    ``(coefficients (size,), objectives, lam, kept, reached)``: ``lam`` the first-order locality of each
    generalised eigenvector, descending, ``kept`` how many combinations the returned fit used (``size``: the
    whole basis) and ``reached`` the locality of the returned edit's render."""
    probe = kwargs.get("probe", PROBE)
    rows = torch.cat([torch.zeros(1, size, dtype=torch.float64), probe * torch.eye(size, dtype=torch.float64)])
    out = render(rows).double().cpu()
    responses = (out[1:] - out[:1]).flatten(1) / probe
    m = mask.double().cpu().expand_as(target)
    u, lam = local_combinations(responses, m, min_locality)
    base, flat_mask = out[:1], m.flatten()[None, None]

    def change_locality(images: Tensor) -> Tensor:  # the image metric, of the change from the unedited render
        return locality((images - base).flatten(1)[:, None, None], flat_mask)

    def render_rows(r: Tensor) -> Tensor:  # the whole basis's first batch is the one just rendered
        return out if r.shape == rows.shape and torch.equal(r, rows) else render(r)

    best = None
    bases = [torch.eye(size, dtype=torch.float64)] + [u[:, :k] for k in range(min(u.shape[1], size - 1), 0, -1)]
    for uk in bases:
        coef, history = fit_coefficients(lambda r, uk=uk: render_rows(r.double() @ uk.T), uk.shape[1], target,
                                         weights, constraint=change_locality, minimum=min_locality, **kwargs)
        reached = float(change_locality(render(coef[None].double() @ uk.T).double().cpu())[0])
        result = (uk @ coef, history, lam, uk.shape[1], reached)
        if reached >= min_locality:
            return result
        if best is None or reached > best[4]:
            best = result
    return best


def strength_span(meta: dict, default: float, over: float = 1.0) -> float:
    """The strength range to show directions with: ``default``, or for directions towards a reference at least
    ``over`` times their largest natural strength (rounded up to 0.05), so that the fitted edit is in range."""
    strengths = meta.get("reference_strength") or {}
    if meta.get("method") != "reference" or not strengths:
        return default
    return max(default, math.ceil(over * max(strengths.values()) * 20) / 20)


def orthonormal_basis(vectors: Tensor, tol: float = 1e-6) -> Tensor:
    """Orthonormal rows spanning ``vectors`` (m, d), in order, dropping rows (numerically) in the span of the
    earlier ones: (r, d), r <= m."""
    q, r = torch.linalg.qr(vectors.T.double())
    keep = r.diagonal().abs() > tol * float(r.diagonal().abs().max())
    return q.T[keep].to(vectors.dtype)
