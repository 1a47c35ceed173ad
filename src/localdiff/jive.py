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


def _top_right_singular(x: Tensor, r: int) -> tuple[Tensor, Tensor]:
    if r == 0:
        return x.new_zeros(0), x.new_zeros(0, x.shape[-1])
    _, s, vh = torch.linalg.svd(x, full_matrices=False)
    return s[:r], vh[:r]


def auto_joint_rank(blocks: list[Tensor], max_angle_deg: float = 30.0) -> int:
    """How many directions lie close to every block's row space (AJIVE-style rank choice).

    Candidates are the right singular vectors of the stacked orthonormal bases of the blocks' row spaces, in
    order; a candidate is joint when its angle to *each* block's row space is below ``max_angle_deg``. The count
    of leading joint candidates is returned.
    """
    if len(blocks) < 2:
        return 0
    bases = []
    for x in blocks:
        _, s, vh = torch.linalg.svd(x.to(torch.float64), full_matrices=False)
        keep = s > s[0] * 1e-6 if len(s) else s.bool()
        bases.append(vh[keep])
    _, _, cand = torch.linalg.svd(torch.cat(bases), full_matrices=False)
    rank = 0
    for w in cand:
        worst = max(math.degrees(math.acos(min(1.0, float(torch.linalg.norm(b @ w))))) for b in bases)
        if worst >= max_angle_deg:
            break
        rank += 1
    return rank


def jive(
    blocks: list[Tensor],
    joint_rank: int | None,
    individual_rank: int | list[int],
    *,
    normalize: bool = True,
    max_iter: int = 200,
    tol: float = 1e-10,
    joint_angle_deg: float = 30.0,
) -> JiveResult:
    """Split ``blocks`` (each (n_i, d), same d) into a joint row space and individual ones.

    ``joint_rank=None`` chooses it with :func:`auto_joint_rank`. ``individual_rank`` is one rank for all blocks or
    one per block; each is capped by what the block has left after the joint part. With ``normalize`` each block
    is divided by its Frobenius norm first, so that no region dominates the joint space.
    """
    if not blocks:
        raise ValueError("jive needs at least one block")
    d = blocks[0].shape[-1]
    if any(x.ndim != 2 or x.shape[-1] != d for x in blocks):
        raise ValueError("jive blocks must be 2-D with the same number of columns")
    out_dtype = blocks[0].dtype
    xs = [x.to(torch.float64) for x in blocks]
    if normalize:
        xs = [x / x.norm().clamp(min=1e-300) for x in xs]
    if joint_rank is None:
        joint_rank = auto_joint_rank(xs, joint_angle_deg)
    ranks = [individual_rank] * len(xs) if isinstance(individual_rank, int) else list(individual_rank)
    if len(ranks) != len(xs):
        raise ValueError("one individual rank per block is needed")
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
    return JiveResult(w.to(out_dtype), individual, individual_sigma, joint_rank, it, converged, resid)
