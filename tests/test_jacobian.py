"""Jacobian subspace iteration against an explicit Jacobian + SVD."""

from __future__ import annotations

import math

import pytest
import torch
from torch.func import jacrev

from localdiff import load_model
from localdiff.jacobian import (
    decoder_operators,
    largest_principal_angle,
    orthonormal_rows,
    principal_angles,
    remaining_angle,
    subspace_iteration,
)

from conftest import REGIONS, texture


def decoder_at(model_dir, image, t: int = 500):
    """The test model's decoder at ``image`` (noise-free latent, timestep ``t``): ``(enc, decode, jvp, vjp, eps)``."""
    model = load_model(model_dir)
    with torch.no_grad():
        enc = model.encode(image, t)

    def decode(h):
        return model.decode(h, enc.skips, enc.temb)

    jvp, vjp, out = decoder_operators(decode, enc.h)
    return enc, decode, jvp, vjp, out


def matrix_operators(j: torch.Tensor):
    """jvp/vjp of the linear map x -> J x, in the batched row convention of subspace_iteration."""
    return (lambda v: v @ j.T), (lambda u: u @ j)


def test_principal_angles_are_sign_and_rotation_invariant():
    g = torch.Generator().manual_seed(0)
    a = orthonormal_rows(torch.randn(3, 20, generator=g))
    rot = torch.linalg.qr(torch.randn(3, 3, generator=g))[0]
    assert largest_principal_angle(a, -a) < 1e-5
    assert largest_principal_angle(a, rot @ a) < 1e-5
    b = orthonormal_rows(torch.randn(3, 20, generator=g))
    assert largest_principal_angle(a, b) > 10
    # a known angle: rotate one vector by 30 degrees out of the span
    e = torch.eye(4, dtype=torch.float64)
    c = torch.stack([e[0], math.cos(math.radians(30)) * e[1] + math.sin(math.radians(30)) * e[2]])
    assert abs(largest_principal_angle(e[:2], c) - 30) < 1e-6
    assert torch.allclose(principal_angles(e[:2], c), torch.tensor([0.0, 30.0], dtype=torch.float64), atol=1e-6)


def test_converges_on_clear_spectral_gap():
    g = torch.Generator().manual_seed(0)
    u = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([10.0, 8.0, 6.0] + [1.0 / (i + 1) for i in range(37)], dtype=torch.float64)
    j = (u[:, :40] * s) @ v.T
    jvp, vjp = matrix_operators(j)
    res = subspace_iteration(jvp, vjp, 40, torch.ones(1, 60), 3, max_iter=50, tol_deg=1e-3, dtype=torch.float64)
    assert res.converged == [True]
    assert res.iterations[0] < 20
    assert largest_principal_angle(v.T[:3], res.vectors[0]) < 1e-2
    assert torch.allclose(res.sigma[0], s[:3], rtol=1e-6)


def test_remaining_angle_of_a_geometric_sequence():
    theta = [10.0 * 0.8**n for n in range(12)]  # true angles to the limit
    moves = [a - b for a, b in zip(theta, theta[1:])]
    assert remaining_angle(moves[5], moves[4]) == pytest.approx(theta[6], rel=1e-9)
    assert remaining_angle(1.0, 1.0) == math.inf and remaining_angle(1.0, None) == math.inf
    assert remaining_angle(40.0, 41.0) == 90.0  # 1,600 deg by the formula; no two subspaces are that far apart


def test_stopping_test_bounds_the_true_error_on_a_flat_spectrum():
    """Slow convergence (sigma_7 / sigma_3 = 0.9): the last move underestimates the error left, the estimate does not."""
    g = torch.Generator().manual_seed(3)
    u = torch.linalg.qr(torch.randn(80, 80, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(60, 60, generator=g, dtype=torch.float64))[0]
    s = torch.tensor([1.0, 0.99, 0.98] + [0.9 * 0.99**i for i in range(57)], dtype=torch.float64)
    jvp, vjp = matrix_operators((u[:, :60] * s) @ v.T)
    res = subspace_iteration(jvp, vjp, 60, torch.ones(1, 80), 3, oversample=3, max_iter=500, tol_deg=0.5,
                             dtype=torch.float64)
    true = largest_principal_angle(v.T[:3], res.vectors[0])
    assert res.converged == [True]
    assert res.last_angle_deg[0] < 0.5 * true  # stopping on the move alone would have stopped far too early
    assert true < 0.6  # the estimate is an estimate: within 20 % of the tolerance
    assert res.error_deg[0] == pytest.approx(true, rel=0.3)


def test_masked_regions_in_one_batch_match_explicit_svd():
    g = torch.Generator().manual_seed(1)
    j = torch.randn(50, 30, generator=g, dtype=torch.float64)
    masks = torch.zeros(2, 50, dtype=torch.float64)
    masks[0, :20] = 1
    masks[1, 25:] = 1
    jvp, vjp = matrix_operators(j)
    res = subspace_iteration(jvp, vjp, 30, masks, 3, oversample=5, max_iter=300, tol_deg=1e-4, dtype=torch.float64)
    for i in range(2):
        _, s, vh = torch.linalg.svd(masks[i, :, None] * j)
        assert largest_principal_angle(vh[:3], res.vectors[i]) < 0.1
        assert torch.allclose(res.sigma[i], s[:3], rtol=1e-4)


def test_decoder_jacobian_top3_matches_jacrev_svd(model_dir):
    """The real thing: masked d(eps)/dh of a U-Net with attention at the bottleneck, k = 3."""
    enc, decode, jvp, vjp, out = decoder_at(model_dir, texture())
    d = enc.h.numel()
    mask = REGIONS["mouth"][None, None].expand(1, out.shape[1], -1, -1).reshape(1, -1).float()
    inside = mask[0].bool()

    from localdiff.jacobian import ad_friendly_attention

    # Explicit Jacobian of the masked rows only (m * J is zero elsewhere): 384 VJPs instead of 3072.
    with ad_friendly_attention():
        jac = jacrev(lambda h: decode(h).reshape(-1)[inside])(enc.h).reshape(-1, d)
    _, s, vh = torch.linalg.svd(jac.double(), full_matrices=False)

    res = subspace_iteration(jvp, vjp, d, mask, 3, oversample=3, max_iter=100, tol_deg=0.01)
    assert res.converged == [True]
    assert largest_principal_angle(vh[:3], res.vectors[0]) < 1.0
    assert torch.allclose(res.sigma[0].double(), s[:3], rtol=1e-3)

    # the batched JVP/VJP closures agree with the explicit Jacobian on those rows
    v = torch.randn(2, d)
    assert torch.allclose(jvp(v)[:, inside], v @ jac.T, atol=1e-6, rtol=1e-4)
    u = torch.zeros(2, out.numel())
    u[:, inside] = torch.randn(2, int(inside.sum()))
    assert torch.allclose(vjp(u), u[:, inside] @ jac, atol=1e-6, rtol=1e-4)


def test_seed_makes_it_deterministic():
    g = torch.Generator().manual_seed(3)
    j = torch.randn(30, 20, generator=g)
    jvp, vjp = matrix_operators(j)
    a = subspace_iteration(jvp, vjp, 20, torch.ones(1, 30), 2, max_iter=5, seed=7)
    b = subspace_iteration(jvp, vjp, 20, torch.ones(1, 30), 2, max_iter=5, seed=7)
    assert torch.equal(a.vectors, b.vectors)


def test_rejects_bad_k():
    jvp, vjp = matrix_operators(torch.randn(5, 4))
    with pytest.raises(ValueError):
        subspace_iteration(jvp, vjp, 4, torch.ones(1, 5), 0)


def _explicit_ratio_top(jac: torch.Tensor, mask: torch.Tensor, basis: torch.Tensor, ridge: float = 1e-6):
    """Brute force: the generalised eigenproblem on the explicit Jacobian, restricted to span(basis), by scipy."""
    import numpy as np
    from scipy.linalg import eigh

    jb = jac.double() @ basis.double().T  # (out, q)
    m = mask.double()[:, None]
    a = (jb * m).T @ jb
    c = (jb * (1 - m)).T @ jb
    c = c + ridge * float(torch.trace(c)) / len(c) * torch.eye(len(c), dtype=torch.float64)
    evals, evecs = eigh(a.numpy(), c.numpy())
    u = torch.from_numpy(np.ascontiguousarray(evecs[:, -1]))
    v = u @ basis.double()
    return v / v.norm(), float(evals[-1])


def test_locality_ratio_matches_the_explicit_generalised_eigenproblem():
    from localdiff.jacobian import locality_ratio

    g = torch.Generator().manual_seed(0)
    jac = torch.randn(40, 10, generator=g, dtype=torch.float64)
    mask = (torch.rand(40, generator=g) < 0.3).double()
    basis = torch.eye(10, dtype=torch.float64)  # the whole space
    coef, ratios = locality_ratio(basis @ jac.T, mask)
    v = coef[0] @ basis
    ref, ref_ratio = _explicit_ratio_top(jac, mask, basis)
    assert largest_principal_angle(ref[None], v[None] / v.norm()) < 1e-6
    assert ratios[0] == pytest.approx(ref_ratio, rel=1e-8)
    assert torch.all(ratios[:-1] >= ratios[1:])  # best first
    # the ratio is the Rayleigh quotient it claims, and no basis vector does better
    jv = jac @ v
    assert float((jv**2 * mask).sum() / (jv**2 * (1 - mask)).sum()) == pytest.approx(float(ratios[0]), rel=1e-4)
    for b in basis:
        jb = jac @ b
        assert float((jb**2 * mask).sum() / (jb**2 * (1 - mask)).sum()) <= float(ratios[0]) + 1e-9


def test_ratio_directions_on_a_model_match_the_explicit_jacobian(small_dir):
    """Matrix-free (batched JVPs of the decoder in a subspace) against jacrev's full Jacobian, on the 16 px test
    model: the same best direction, and it is more local at the eps level than any basis vector."""
    from localdiff.jacobian import ad_friendly_attention, locality_ratio

    enc, decode, jvp, _, out = decoder_at(small_dir, texture(16, seed=2))
    d = enc.h.numel()
    region = torch.zeros(16, 16)
    region[2:7, 3:12] = 1
    mask = region[None].expand(out.shape[1], -1, -1).reshape(-1)
    basis = orthonormal_rows(torch.randn(8, d, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    coef, _ = locality_ratio(jvp(basis.float()), mask)
    v = coef[0] @ basis
    with ad_friendly_attention():
        jac = jacrev(lambda h: decode(h).reshape(-1))(enc.h).reshape(-1, d)
    ref, _ = _explicit_ratio_top(jac, mask, basis)
    assert largest_principal_angle(ref[None], (v / v.norm())[None]) < 0.5

    def eps_loc(w):
        jw = jac.double() @ w.double()
        return float((jw**2 * mask).sum() / (jw**2).sum())

    assert eps_loc(v) > max(eps_loc(b) for b in basis)
