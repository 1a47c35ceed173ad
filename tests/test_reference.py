"""The reference fit's math (localdiff.reference) against brute-force least squares on small problems."""

from __future__ import annotations

import pytest
import torch

from localdiff.errors import LocalDiffError
from localdiff.metrics import locality
from localdiff.reference import (fit_coefficients, fit_local_coefficients, local_combinations, objective,
                                 orthonormal_basis, reference_target, strength_span, weighted_step)


def weighted_problem(r=4, n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    responses = torch.randn(r, n, generator=g, dtype=torch.float64)
    residual = torch.randn(n, generator=g, dtype=torch.float64)
    weights = torch.rand(n, generator=g, dtype=torch.float64) * 2
    return responses, residual, weights


def test_weighted_step_is_the_weighted_least_squares_solution():
    responses, residual, weights = weighted_problem()
    ridge = 0.05
    damp = ridge * float(((responses * weights) @ responses.T).diagonal().mean())
    # brute force: the stacked system [sqrt(w) G^T; sqrt(damp) I] d = [sqrt(w) y; 0]
    a = torch.cat([weights.sqrt()[:, None] * responses.T, damp ** 0.5 * torch.eye(len(responses), dtype=torch.float64)])
    b = torch.cat([weights.sqrt() * residual, torch.zeros(len(responses), dtype=torch.float64)])
    expected = torch.linalg.lstsq(a, b[:, None]).solution[:, 0]
    torch.testing.assert_close(weighted_step(responses, residual, weights, ridge), expected, rtol=1e-9, atol=1e-12)


def test_weighted_step_ignores_zero_weight_pixels():
    responses, residual, weights = weighted_problem()
    weights[::2] = 0
    moved = residual.clone()
    moved[::2] += 100.0  # what the zero-weight pixels want must not matter
    torch.testing.assert_close(weighted_step(responses, moved, weights, 0.0), weighted_step(responses, residual, weights, 0.0))


def test_fit_on_a_linear_render_reaches_the_optimum_in_one_iteration():
    g = torch.Generator().manual_seed(1)
    r, n = 3, 40
    base = torch.randn(n, generator=g, dtype=torch.float64)
    gain = torch.randn(r, n, generator=g, dtype=torch.float64)
    target = torch.randn(n, generator=g, dtype=torch.float64)
    weights = torch.ones(n, dtype=torch.float64)
    calls = []

    def render(rows):
        calls.append(len(rows))
        return base + rows @ gain

    c, history = fit_coefficients(render, r, target, weights, iterations=1, ridge=0.0, line_search=(1.0,))
    expected = torch.linalg.lstsq(gain.T, (target - base)[:, None]).solution[:, 0]
    torch.testing.assert_close(c, expected, rtol=1e-8, atol=1e-10)
    assert calls == [r + 1, 1]  # one batch of probes, one of the line search
    assert history[-1] < history[0]


def test_fit_lowers_the_objective_of_a_saturating_render():
    g = torch.Generator().manual_seed(2)
    r, n = 4, 60
    gain = torch.randn(r, n, generator=g, dtype=torch.float64)
    target = 0.8 * torch.tanh(torch.randn(r, generator=g, dtype=torch.float64) @ gain)
    weights = torch.rand(n, generator=g, dtype=torch.float64)

    def render(rows):  # responds less than linearly to long steps, like the regenerations
        return torch.tanh(rows @ gain)

    c, history = fit_coefficients(render, r, target, weights, iterations=3)
    start = float(objective(render(torch.zeros(1, r, dtype=torch.float64)), target, weights)[0])
    assert history[0] == pytest.approx(start)
    assert float(objective(render(c[None]), target, weights)[0]) < 0.05 * start
    assert float(objective(render(c[None]), target, weights)[0]) == pytest.approx(min(history))


def test_target_is_the_reference_inside_and_the_source_outside():
    source, reference = torch.zeros(3, 4, 4), torch.ones(3, 4, 4)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    target, weights = reference_target(source, reference, mask, outside_weight=0.5)
    assert torch.equal(target[:, mask], torch.ones(3, 4)) and torch.equal(target[:, ~mask], torch.zeros(3, 12))
    assert torch.equal(weights[:, mask], torch.ones(3, 4)) and torch.equal(weights[:, ~mask], torch.full((3, 12), 0.5))
    with pytest.raises(LocalDiffError, match="outside_weight"):
        reference_target(source, reference, mask, outside_weight=-1)


def test_basis_keeps_the_span_and_drops_dependent_rows():
    g = torch.Generator().manual_seed(3)
    a = torch.randn(3, 20, generator=g, dtype=torch.float64)
    rows = torch.cat([a, a[:1] + 2 * a[2:3]])  # the fourth row lies in the span of the first three
    basis = orthonormal_basis(rows)
    assert basis.shape == (3, 20)
    torch.testing.assert_close(basis @ basis.T, torch.eye(3, dtype=torch.float64))
    torch.testing.assert_close(rows @ basis.T @ basis, rows)  # every row is in the span


def test_strength_span_reaches_the_fitted_edit():
    """Grids, sweeps and sliders of directions towards a reference reach their natural strength; others keep the
    default range."""
    meta = dict(method="reference", reference_strength={"mouth": 0.42, "eyes": 1.234})
    assert strength_span(meta, 0.3) == pytest.approx(1.25)
    assert strength_span(meta, 0.3, over=1.5) == pytest.approx(1.9)
    assert strength_span(dict(method="reference", reference_strength={"mouth": 0.1}), 0.3) == 0.3
    assert strength_span(dict(method="ratio"), 0.3) == 0.3


def test_fit_that_cannot_improve_returns_its_first_step():
    """A render that every move takes further from the target: no evaluated coefficients beat the unedited
    image, and the fit returns its first (linearised) step rather than no edit at all."""
    g = torch.Generator().manual_seed(4)
    r, n = 2, 30
    gain = torch.randn(r, n, generator=g, dtype=torch.float64)
    target = torch.full((n,), -0.01, dtype=torch.float64)
    weights = torch.ones(n, dtype=torch.float64)
    seen = []

    def render(rows):
        seen.append(rows.clone())
        return rows ** 2 @ gain.abs()  # every pixel only brightens, whichever way a coefficient moves

    c, history = fit_coefficients(render, r, target, weights, iterations=2)
    assert min(history) == history[0]
    torch.testing.assert_close(c, seen[1][0])  # the base of the second iteration: the first step
    assert float(c.norm()) > 0


def locality_problem(r=5, n=60, seed=5):
    g = torch.Generator().manual_seed(seed)
    responses = torch.randn(r, n, generator=g, dtype=torch.float64)
    mask = torch.zeros(n, dtype=torch.float64)
    mask[: n // 4] = 1
    responses[0, n // 4:] *= 0.1  # one basis vector changes mostly the inside
    return responses, mask, g


def quotient(c, responses, mask):
    change = c @ responses
    return float((mask * change**2).sum() / (change**2).sum())


def test_local_combinations_are_the_generalised_eigenvectors_of_locality():
    responses, mask, g = locality_problem()
    a, b = (responses * mask) @ responses.T, responses @ responses.T
    brute = torch.linalg.eigvals(torch.linalg.solve(b, a)).real.sort(descending=True).values
    u, lam = local_combinations(responses, mask, 0.3)
    torch.testing.assert_close(lam, brute, rtol=1e-8, atol=1e-10)
    assert u.shape == (5, int((brute >= 0.3).sum())) and 1 <= u.shape[1] < 5
    for j in range(u.shape[1]):  # each kept column's change is exactly as local as its eigenvalue
        assert quotient(u[:, j], responses, mask) == pytest.approx(float(lam[j]), rel=1e-8)
    # any combination of the kept columns is at least min_locality local (measured like the image metric)
    for _ in range(200):
        c = u @ torch.randn(u.shape[1], generator=g, dtype=torch.float64)
        change = (c @ responses).reshape(1, 1, -1)
        assert float(locality(change, mask.reshape(1, -1))) >= 0.3 - 1e-9


def test_local_combinations_keep_the_most_local_one_when_none_is_local_enough():
    responses, mask, g = locality_problem()
    u, lam = local_combinations(responses, mask, 0.999)
    assert u.shape == (5, 1)
    best = max(quotient(torch.randn(5, generator=g, dtype=torch.float64), responses, mask) for _ in range(2000))
    assert quotient(u[:, 0], responses, mask) == pytest.approx(float(lam[0]))
    assert best <= float(lam[0]) + 1e-9  # no random combination beats it
    with pytest.raises(LocalDiffError, match="min_locality"):
        local_combinations(responses, mask, 1.0)


def test_local_fit_trades_the_objective_for_locality():
    """On a linear render: with a ``min_locality`` the unconstrained optimum meets (0, or just under its own
    locality) the fit is that optimum; with a higher one the fitted change is at least that local, at a higher
    objective."""
    responses, mask, g = locality_problem()
    base = torch.zeros(60, dtype=torch.float64)
    target = torch.randn(60, generator=g, dtype=torch.float64)
    weights = torch.ones(60, dtype=torch.float64)

    calls = []

    def render(rows):
        calls.append(len(rows))
        return base + rows @ responses

    free, free_history = fit_coefficients(render, 5, target, weights, iterations=1, ridge=0.0, line_search=(1.0,))
    calls.clear()
    same, _, lam, kept, _ = fit_local_coefficients(render, 5, target, weights, mask, 0.0, iterations=1, ridge=0.0,
                                               line_search=(1.0,))
    assert calls == [6, 4, 1]  # probes at zero (rendered once), line search + 3 shrinks, the returned edit
    assert kept == 5
    torch.testing.assert_close(same, free, rtol=1e-6, atol=1e-8)
    free_locality = quotient(free, responses, mask)
    same, _, lam, kept, _ = fit_local_coefficients(render, 5, target, weights, mask, free_locality - 0.01,
                                                   iterations=1, ridge=0.0, line_search=(1.0,))
    assert kept == 5 and int((lam >= free_locality - 0.01).sum()) < 5  # local enough: the whole basis's fit
    torch.testing.assert_close(same, free, rtol=1e-6, atol=1e-8)
    local, history, lam, kept, reached = fit_local_coefficients(render, 5, target, weights, mask, 0.5)
    assert kept < 5 and float(lam[kept - 1]) >= 0.5
    assert quotient(local, responses, mask) >= 0.5 and reached == pytest.approx(quotient(local, responses, mask))
    assert quotient(free, responses, mask) < 0.5  # the constraint was needed
    assert min(free_history) < min(history) < history[0]  # worse than free, better than no edit


def test_constrained_fit_checks_the_renders_not_the_first_order_bound():
    """A render whose change leaks outside the region quadratically with the step: first order it is all inside,
    but the unconstrained fit's long step is not local. With the constraint the returned coefficients' render is
    at least ``minimum`` local; when nothing is, the most local candidate is returned."""
    n = 40
    mask = torch.zeros(n, dtype=torch.float64)
    mask[:10] = 1
    gain = torch.zeros(1, n, dtype=torch.float64)
    gain[0, :10] = 1.0
    target = torch.zeros(n, dtype=torch.float64)
    target[:10] = 2.0  # the inside wants a long step
    weights = mask + 0.01 * (1 - mask)  # the objective barely minds the outside; the constraint does

    def render(rows):
        return rows @ gain + (rows**2).sum(1, keepdim=True) * (1 - mask) * 0.5

    def change_locality(images):
        return ((images**2 * mask).sum(1) / (images**2).sum(1).clamp(min=1e-30))

    free, _ = fit_coefficients(render, 1, target, weights)
    assert float(change_locality(render(free[None]))[0]) < 0.5
    local, history = fit_coefficients(render, 1, target, weights, constraint=change_locality, minimum=0.5)
    assert float(change_locality(render(local[None]))[0]) >= 0.5 and float(local.norm()) > 0
    assert history[-1] == pytest.approx(float(objective(render(local[None]), target, weights)[0]))
    assert history[-1] < history[0]  # still closer to the target than no edit
    most, _ = fit_coefficients(render, 1, target, weights, constraint=change_locality, minimum=0.99)
    assert float(change_locality(render(most[None]))[0]) < 0.99  # none is that local: the most local one
    assert float(change_locality(render(most[None]))[0]) > float(change_locality(render(free[None]))[0])


def test_local_fit_falls_back_to_fewer_combinations_when_no_render_is_local_enough():
    """Two combinations that are local to first order, but every edit that uses both leaks (an interaction that
    probes along one combination at a time cannot see): the fit in both finds no local enough render, the fit in
    the most local one alone does."""
    n = 40
    mask = torch.zeros(n, dtype=torch.float64)
    mask[:10] = 1
    gain = torch.zeros(2, n, dtype=torch.float64)
    gain[0, :5], gain[1, 5:10], gain[1, 10:] = 1.0, 1.0, 0.05  # the second one leaks a little, linearly
    target = torch.zeros(n, dtype=torch.float64)
    target[:10] = 2.0
    weights = torch.ones(n, dtype=torch.float64)

    def render(rows):  # and a lot when both are used
        both = (rows.abs() > 1e-6).all(dim=1, keepdim=True)
        return rows @ gain + both.double() * (1 - mask) * 5.0

    coef, history, lam, kept, reached = fit_local_coefficients(render, 2, target, weights, mask, 0.9)
    assert float(lam[1]) >= 0.9  # both pass the first-order test
    assert kept == 1 and reached >= 0.9 and abs(float(coef[1])) < 1e-9 and float(coef[0]) > 0.5
    assert history[-1] < history[0]


def test_basis_rank_is_checked_before_the_inversions(editor):
    """``basis_rank`` sizes the measured fit's masked subspace: a value h-space has no room for, a non-integer,
    or one given to the projected fit (which has no basis to size) is one clear error, before any inversion."""
    from conftest import REGIONS, texture

    image, other = texture(seed=1), texture(seed=2)
    cached = len(editor._cache)
    top = min(512, 64 * 8 * 8 - 3)  # MAX_K, and h-space's dimensions less the default oversample
    for bad in (0, -2, 2.5, True, top + 1):
        with pytest.raises(LocalDiffError, match=rf"basis_rank must be an integer in 1\.\.{top} .*got {bad!r}"):
            editor.reference_directions(image, other, {"mouth": REGIONS["mouth"]}, basis_rank=bad)
    with pytest.raises(LocalDiffError, match="basis_rank sizes the measured fit's basis"):
        editor.reference_directions(image, other, {"mouth": REGIONS["mouth"]}, fit="projected", basis_rank=4)
    assert len(editor._cache) == cached  # nothing was inverted
