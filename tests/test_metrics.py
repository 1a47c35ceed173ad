"""Metrics on hand-made images with known answers."""

from __future__ import annotations

import math

import pytest
import torch

from localdiff import metrics

from conftest import box


def images():
    g = torch.Generator().manual_seed(0)
    ref = torch.rand(3, 16, 16, generator=g)
    mask = box(16, (4, 8), (4, 12))
    return ref, mask


def test_change_only_inside_mask():
    ref, mask = images()
    edited = ref.clone()
    edited[:, mask] += 0.1
    delta = edited - ref
    assert metrics.locality(delta, mask).item() == 1.0
    assert abs(metrics.inside_change(delta, mask).item() - 0.1) < 1e-6
    assert metrics.outside_psnr(edited, ref, mask).item() >= 119.0  # identical outside: capped at 120 dB
    assert abs(metrics.outside_ssim(edited, ref, mask).item() - 1.0) < 0.05
    other = box(16, (10, 14), (0, 16))
    assert metrics.leakage(delta, other).item() == 0.0


def test_uniform_change_scores_the_mask_area():
    ref, mask = images()
    delta = torch.full_like(ref, 0.05)
    area = mask.float().mean().item()
    assert abs(metrics.locality(delta, mask).item() - area) < 1e-6
    assert abs(metrics.outside_psnr(ref + delta, ref, mask).item() - 10 * math.log10(1 / 0.05**2)) < 1e-3
    assert abs(metrics.random_direction_locality_expectation(mask) - area) < 1e-9


def test_change_only_outside_mask():
    ref, mask = images()
    delta = torch.zeros_like(ref)
    delta[:, ~mask] = 0.2
    assert metrics.locality(delta, mask).item() == 0.0
    assert metrics.inside_change(delta, mask).item() == 0.0


def test_ssim_and_psnr_known_values():
    ref, _ = images()
    assert torch.allclose(metrics.ssim_map(ref, ref), torch.ones(1, 16, 16), atol=1e-6)
    noisy = (ref + 0.3 * torch.randn(ref.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert metrics.ssim_map(noisy, ref).mean() < 0.8
    assert abs(metrics.psnr(ref + 0.1, ref).item() - 20.0) < 1e-4


def test_batched_metrics():
    ref, mask = images()
    deltas = torch.stack([torch.zeros_like(ref), torch.zeros_like(ref)])
    deltas[0][:, mask] = 1.0
    deltas[1] += 1.0
    loc = metrics.locality(deltas, mask)
    assert loc.shape == (2,) and loc[0] == 1.0 and abs(loc[1] - mask.float().mean()) < 1e-6


# ---------------------------------------------------------------------- SWD
def test_sliced_wasserstein_of_a_shifted_set_has_the_closed_form():
    """Shifting every point by d moves each 1-D projection by <d, u>, so SWD = |d| E|u_1| over unit u."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(500, 8, generator=g)
    d = torch.tensor([0.5, -0.2, 0.3, 0.0, 0.1, 0.0, -0.4, 0.2])
    dim = a.shape[1]
    expected = d.norm().item() * math.gamma(dim / 2) / (math.sqrt(math.pi) * math.gamma((dim + 1) / 2))
    got = metrics.sliced_wasserstein(a, a + d, num_projections=4096, repeats=1, generator=g)
    assert abs(got - expected) < 0.03 * expected, (got, expected)
    assert metrics.sliced_wasserstein(a, a, generator=g) == 0.0


def test_laplacian_pyramid_reconstructs_the_image():
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    levels = metrics.laplacian_pyramid(x, 3)
    assert [lv.shape[-1] for lv in levels] == [32, 16, 8]
    rec = levels[-1]
    for band in reversed(levels[:-1]):
        rec = torch.nn.functional.interpolate(rec, size=band.shape[-2:], mode="bilinear", align_corners=False) + band
    assert (rec - x).abs().max() < 1e-6


def _blobs(n, seed, size=32):
    """Random smooth images: a few Gaussian blobs of random colour on a flat background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    out = torch.zeros(n, 3, size, size)
    for i in range(n):
        for _ in range(4):
            cy, cx = torch.rand(2, generator=g) * size
            r = 2 + 4 * torch.rand(1, generator=g)
            out[i] += torch.rand(3, 1, 1, generator=g) * torch.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r**2))
    return out * 2 - 1


def test_swd_is_zero_on_identical_sets_and_grows_with_a_distribution_shift():
    def swd(x, y):  # fewer patches and projections than the paper's, to keep the test quick
        return metrics.swd(x, y, patches_per_image=64, num_projections=256, repeats=2)

    a, b = _blobs(64, 0), _blobs(64, 1)  # two samples of the same distribution
    same = swd(a, a.clone())
    assert set(same) == {"32px", "16px", "mean"} and same["mean"] == 0.0
    floor = swd(a, b)["mean"]
    noisy = b + 0.1 * torch.randn(b.shape, generator=torch.Generator().manual_seed(2))
    blurred = metrics.laplacian_pyramid(b, 2)[1]
    blurred = torch.nn.functional.interpolate(blurred, size=32, mode="bilinear", align_corners=False)
    assert swd(a, noisy)["mean"] > 2 * floor
    assert swd(a, blurred)["32px"] > 1.3 * swd(a, b)["32px"]  # blobs are smooth already
    with pytest.raises(ValueError):
        swd(a, b[:10])


def test_heldout_eps_mse_is_zero_for_the_true_noise_and_one_for_zeros():
    alphas = torch.linspace(0.999, 0.01, 1000)
    images = torch.zeros(20, 3, 8, 8)  # x_t = sqrt(1 - a) eps, so eps is known exactly

    def exact(x, t):
        return x / (1 - alphas[t])[:, None, None, None].sqrt()

    assert metrics.heldout_eps_mse(exact, alphas, images, batch_size=7) < 1e-10
    zero = metrics.heldout_eps_mse(lambda x, t: torch.zeros_like(x), alphas, images)
    assert abs(zero - 1.0) < 0.1
    errors, t = metrics.heldout_eps_errors(lambda x, t: torch.zeros_like(x), alphas, images, batch_size=7)
    assert errors.shape == t.shape == (20,) and len(set(t.tolist())) == 20 and abs(float(errors.mean()) - zero) < 1e-6
