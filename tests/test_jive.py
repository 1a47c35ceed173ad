"""JIVE on synthetic blocks with planted joint and individual row spaces."""

from __future__ import annotations

import pytest
import torch

from localdiff.jacobian import largest_principal_angle, orthonormal_rows
from localdiff.jive import ajive, jive, signal_rank, signal_ranks_of


def planted(d=60, n=6, r_joint=2, r_ind=2, blocks=3, noise=1e-4, seed=0):
    g = torch.Generator().manual_seed(seed)
    basis = orthonormal_rows(torch.randn(r_joint + blocks * r_ind, d, generator=g, dtype=torch.float64))
    w = basis[:r_joint]
    inds = [basis[r_joint + i * r_ind: r_joint + (i + 1) * r_ind] for i in range(blocks)]
    xs = []
    for u in inds:
        joint_part = torch.randn(n, r_joint, generator=g, dtype=torch.float64) @ w * 3
        ind_part = torch.randn(n, r_ind, generator=g, dtype=torch.float64) @ u * 2
        xs.append(joint_part + ind_part + noise * torch.randn(n, d, generator=g, dtype=torch.float64))
    return xs, w, inds


def intersection_of_row_spaces(xs, tol=1e-3):
    """Brute-force reference: w lies in every row space iff it is an eigenvector of sum_i P_i with eigenvalue N."""
    projs = []
    for x in xs:
        _, s, vh = torch.linalg.svd(x, full_matrices=False)
        v = vh[s > s[0] * 1e-2]
        projs.append(v.T @ v)
    evals, evecs = torch.linalg.eigh(sum(projs))
    return evecs[:, evals > len(xs) - tol].T


def test_recovers_planted_joint_and_individual_spaces():
    xs, w, inds = planted()
    res = jive(xs, joint_rank=2, individual_rank=2)
    assert res.converged
    assert largest_principal_angle(w, res.joint) < 1.0
    for truth, got in zip(inds, res.individual):
        assert got.shape == (2, 60)
        assert largest_principal_angle(truth, got) < 1.0
        assert (got @ res.joint.T).abs().max() < 1e-6  # individual is orthogonal to joint
        assert torch.allclose(got @ got.T, torch.eye(2, dtype=got.dtype), atol=1e-6)  # orthonormal


def test_matches_brute_force_intersection():
    xs, _, _ = planted(noise=0.0, seed=3)
    reference = intersection_of_row_spaces(xs)
    assert reference.shape[0] == 2
    res = jive(xs, joint_rank=None, individual_rank=2)
    assert res.joint_rank == 2
    assert largest_principal_angle(reference, res.joint) < 1e-3


def test_signal_rank_is_the_largest_drop():
    assert signal_rank(torch.tensor([10.0, 9.0, 8.0, 1.0, 0.9, 0.8])) == 3
    assert signal_rank(torch.tensor([5.0, 0.1, 0.1, 0.1])) == 1
    assert signal_rank(torch.tensor([0.8, 0.5, 0.3, 0.15, 0.04, 0.04, 0.0])) == 4  # zeros ignored
    with pytest.raises(ValueError):
        signal_rank(torch.tensor([1.0, 0.0]))


def test_lock_jive_chooses_the_joint_rank_with_ajive():
    for r, seed in ((0, 2), (1, 2), (2, 3)):  # (seeds where the signal-rank rule is right; it is on 98 % of blocks)
        xs, _, _ = realistic_blocks(r_joint=r, seed=seed)
        assert signal_ranks_of(xs) == [3 + r] * 3
        assert jive(xs, joint_rank=None, individual_rank=2).joint_rank == r
    # orthogonal subspaces: a mix (a + b) / sqrt 2 is 45 degrees from both, which must not count as joint
    e = torch.eye(8, dtype=torch.float64)
    assert jive([e[:2] * torch.tensor([[2.0], [1.0]], dtype=torch.float64),
                 e[2:4] * torch.tensor([[2.0], [1.0]], dtype=torch.float64)], None, 1).joint_rank == 0


def test_ranks_are_capped_and_validated():
    xs, _, _ = planted(n=3, r_joint=1, r_ind=2)
    res = jive(xs, joint_rank=1, individual_rank=[5, 1, 2])
    assert [len(v) for v in res.individual] == [3, 1, 2]  # 5 is capped at the block's 3 rows
    with pytest.raises(ValueError):
        jive(xs, joint_rank=100, individual_rank=1)
    with pytest.raises(ValueError):
        jive([torch.randn(3, 4), torch.randn(3, 5)], 0, 1)


def test_single_region_has_no_joint_part():
    xs, _, _ = planted(blocks=1)
    res = jive(xs, joint_rank=None, individual_rank=2)
    assert res.joint_rank == 0 and res.joint.shape == (0, 60)
    _, _, vh = torch.linalg.svd(xs[0])
    assert largest_principal_angle(vh[:2], res.individual[0]) < 1e-3


def realistic_blocks(r_joint=1, blocks=3, rows=16, r_ind=3, d=400, joint_scale=0.5, noise=0.02, seed=0):
    """Blocks like the regions' Jacobian proxies: each has a few strong individual directions, nearly orthogonal
    across blocks (random in a large space), a weaker shared (joint) part and a noisy tail of singular values."""
    g = torch.Generator().manual_seed(seed)
    basis = orthonormal_rows(torch.randn(r_joint + blocks * r_ind, d, generator=g, dtype=torch.float64))
    w, inds = basis[:r_joint], [basis[r_joint + i * r_ind: r_joint + (i + 1) * r_ind] for i in range(blocks)]
    xs = []
    for u in inds:
        strengths = torch.linspace(2.0, 1.0, r_ind, dtype=torch.float64)
        x = torch.randn(rows, r_ind, generator=g, dtype=torch.float64) * strengths @ u
        if r_joint:
            x = x + joint_scale * torch.randn(rows, r_joint, generator=g, dtype=torch.float64) @ w
        x = x + noise * torch.randn(rows, d, generator=g, dtype=torch.float64)
        xs.append(x / x.norm())
    return xs, w, inds


@pytest.mark.parametrize("r_joint, seed", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)])
def test_ajive_rank_recovers_a_weak_planted_joint_part(r_joint, seed):
    from localdiff.jive import ajive_joint_rank

    xs, w, _ = realistic_blocks(r_joint=r_joint, seed=seed)
    est = ajive_joint_rank(xs, [3 + r_joint] * 3, samples=300)
    assert est.rank == r_joint, est
    if r_joint:  # the noise turns the estimate by a few degrees (6-9 degrees at this noise level)
        assert largest_principal_angle(w, est.joint) < 12.0


@pytest.mark.parametrize("r_joint, seed", [(0, 2), (1, 2), (2, 3)])
def test_ajive_recovers_planted_ranks_and_spaces(r_joint, seed):
    """The realistic regime end to end: joint rank, joint space, individual spaces and the individual-rank rule."""
    xs, w, inds = realistic_blocks(r_joint=r_joint, seed=seed)
    res = ajive(xs, individual_rank=None, samples=300)
    assert res.joint_rank == r_joint and res.estimate is not None
    assert res.signal_ranks == [3 + r_joint] * 3
    assert res.individual_signal_ranks == [3] * 3  # AJIVE's rule finds the three planted individual directions
    if r_joint:
        assert largest_principal_angle(w, res.joint) < 12.0
    for truth, got in zip(inds, res.individual):
        assert got.shape == (3, 400)  # the rule's count
        assert largest_principal_angle(truth, got) < 12.0
        assert torch.allclose(got @ got.T, torch.eye(3, dtype=got.dtype), atol=1e-8)
        if r_joint:
            assert (got @ res.joint.T).abs().max() < 1e-8


def test_ajive_individual_ranks_given_or_by_the_rule():
    xs, _, _ = realistic_blocks(r_joint=0, seed=0)
    assert [len(v) for v in ajive(xs, individual_rank=2, samples=100).individual] == [2, 2, 2]  # given: exactly
    assert [len(v) for v in ajive(xs, individual_rank=5, samples=100).individual] == [5, 5, 5]
    assert [len(v) for v in ajive(xs, individual_rank=[1, 2, 30], samples=100).individual] == [1, 2, 16]  # capped
    flat = [torch.randn(6, 50, generator=torch.Generator().manual_seed(i), dtype=torch.float64) for i in range(2)]
    assert all(len(v) >= 1 for v in ajive(flat, individual_rank=None, samples=100).individual)  # never none
    one = ajive(xs[:1], individual_rank=2)
    assert one.joint_rank == 0 and len(one.individual[0]) == 2
    forced = ajive(xs, individual_rank=2, joint_rank=1)
    assert forced.joint_rank == 1 and forced.estimate is None
    with pytest.raises(ValueError):
        ajive(xs, individual_rank=2, joint_rank=100)


@pytest.mark.parametrize("r_joint, seed", [(1, 0), (2, 1)])
def test_ajive_agrees_with_mvlearn(r_joint, seed):
    """Cross-check against an independent published implementation (mvlearn's AJIVE) on the same blocks, given
    the same signal ranks: the same joint rank, joint spaces within 1 degree, the same individual spaces.
    mvlearn's views are our blocks transposed (h-space dimensions are its samples); it centres each view's
    features, so the planted blocks are made mean-free first."""
    import numpy as np

    AJIVE = pytest.importorskip("mvlearn.decomposition").AJIVE
    xs, _, _ = realistic_blocks(r_joint=r_joint, seed=seed)
    xs = [x - x.mean(dim=1, keepdim=True) for x in xs]
    xs = [x / x.norm() for x in xs]
    ranks = [3 + r_joint] * 3
    ours = ajive(xs, individual_rank=None, signal_ranks=ranks, samples=500)
    theirs = AJIVE(init_signal_ranks=ranks, n_wedin_samples=500, n_randdir_samples=500, random_state=0)
    theirs.fit([x.T.numpy() for x in xs])
    assert theirs.joint_rank_ == ours.joint_rank == r_joint
    joint = torch.from_numpy(np.ascontiguousarray(theirs.joint_scores_.T))
    assert largest_principal_angle(joint, ours.joint) < 1.0
    for mine, u in zip(ours.individual, theirs.individual_scores_):
        assert u is not None and u.shape[1] == len(mine)
        assert largest_principal_angle(torch.from_numpy(np.ascontiguousarray(u.T)), mine) < 1.0


@pytest.mark.parametrize("r_joint, seed", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (2, 1)])
def test_permutation_test_recovers_a_weak_planted_joint_part(r_joint, seed):
    """Lock et al.'s permutation test in the realistic regime, and Lock's JIVE with the rank it chooses: the
    planted joint rank and space, individual spaces orthogonal to it."""
    from localdiff.jive import permutation_joint_rank

    xs, w, inds = realistic_blocks(r_joint=r_joint, seed=seed)
    # on the blocks themselves the strong individual directions hide the weaker joint one ...
    assert permutation_joint_rank(xs, samples=100, seed=seed).rank == 0
    # ... so JIVE tests the blocks minus their individual parts
    res = jive(xs, joint_rank="permutation", individual_rank=3)
    assert res.joint_rank == r_joint and res.estimate.rank == r_joint
    if r_joint:
        assert largest_principal_angle(w, res.joint) < 12.0
    for truth, got in zip(inds, res.individual):
        assert largest_principal_angle(truth, got) < 12.0


def test_permutation_test_counts_a_part_shared_by_some_blocks():
    """Stacking adds the energy of a direction shared by two of three blocks: the permutation test counts it
    (documented), AJIVE's bounds, which ask for all blocks, do not."""
    from localdiff.jive import ajive_joint_rank

    xs, _, _ = realistic_blocks(r_joint=0, seed=4)
    g = torch.Generator().manual_seed(9)
    shared = orthonormal_rows(torch.randn(1, xs[0].shape[1], generator=g, dtype=torch.float64))
    xs = [x + (0.1 * torch.randn(x.shape[0], 1, generator=g, dtype=torch.float64) @ shared if i < 2 else 0)
          for i, x in enumerate(xs)]
    xs = [x / x.norm() for x in xs]
    res = jive(xs, joint_rank="permutation", individual_rank=3)
    assert res.joint_rank == 1 and largest_principal_angle(shared, res.joint) < 12.0
    assert ajive_joint_rank(xs, signal_ranks_of(xs), samples=300).rank == 0
    with pytest.raises(ValueError, match="permutation"):
        jive(xs, joint_rank="bounds", individual_rank=2)
