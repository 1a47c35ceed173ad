"""Metrics on hand-made images with known answers."""

from __future__ import annotations

import math

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
