"""Locality and preservation metrics (method.md section 7), as pure functions on tensors.

Images are (3, H, W) or (B, 3, H, W) tensors in [0, 1]; masks are (H, W) bool/float tensors, broadcast over
channels (and batch). ``delta = edited - reconstruction``: comparing with the alpha = 0 reconstruction keeps
inversion error out of the edit's score.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

_EPS = 1e-20


def _sum_hw(x: Tensor) -> Tensor:
    """Sum over channels and pixels, keep the batch (if any)."""
    return x.sum(dim=(-3, -2, -1))


def locality(delta: Tensor, mask: Tensor) -> Tensor:
    """Share of the squared change inside the mask: sum(m * d^2) / sum(d^2). 1 = all change inside."""
    m = mask.to(delta.dtype)
    total = _sum_hw(delta**2)
    return _sum_hw(m * delta**2) / total.clamp(min=_EPS)


def leakage(delta: Tensor, other_mask: Tensor) -> Tensor:
    """Share of the squared change that lands in another region (same formula as :func:`locality`)."""
    return locality(delta, other_mask)


def inside_change(delta: Tensor, mask: Tensor) -> Tensor:
    """Mean absolute change over the pixels (and channels) of the mask: is the edit visible?"""
    m = mask.to(delta.dtype).expand_as(delta)
    return _sum_hw(m * delta.abs()) / _sum_hw(m).clamp(min=1)


def outside_psnr(edited: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """PSNR (dB, peak 1) between ``edited`` and ``reference`` over the pixels outside the mask."""
    out = (1 - mask.to(edited.dtype)).expand_as(edited)
    mse = _sum_hw(out * (edited - reference) ** 2) / _sum_hw(out).clamp(min=1)
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-12))


def psnr(a: Tensor, b: Tensor) -> Tensor:
    """Plain PSNR (dB, peak 1) over the whole image."""
    mse = ((a - b) ** 2).mean(dim=(-3, -2, -1))
    return 10 * torch.log10(1.0 / mse.clamp(min=1e-12))


def _gaussian_window(size: int, sigma: float, dtype, device) -> Tensor:
    x = torch.arange(size, dtype=dtype, device=device) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def ssim_map(a: Tensor, b: Tensor, *, window: int = 7, sigma: float = 1.5) -> Tensor:
    """Per-pixel SSIM (Wang et al. 2004, Gaussian window, peak 1), averaged over channels: (B, H, W)."""
    a = a if a.ndim == 4 else a[None]
    b = b if b.ndim == 4 else b[None]
    c = a.shape[1]
    w = _gaussian_window(window, sigma, a.dtype, a.device).expand(c, 1, window, window)
    pad = window // 2

    def blur(x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, (pad,) * 4, mode="reflect"), w, groups=c)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a**2
    var_b = blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(dim=1)


def outside_ssim(edited: Tensor, reference: Tensor, mask: Tensor) -> Tensor:
    """Mean SSIM over the pixels outside the mask."""
    s = ssim_map(edited, reference)
    out = (1 - mask.to(s.dtype)).expand_as(s)
    result = (s * out).sum(dim=(-2, -1)) / out.sum(dim=(-2, -1)).clamp(min=1)
    return result if edited.ndim == 4 else result[0]


def eps_locality(jv: Tensor, mask: Tensor) -> Tensor:
    """Jacobian-level locality |m * J v|^2 / |J v|^2 for eps-space responses ``jv`` (..., C, H, W)."""
    return locality(jv, mask)


def random_direction_locality_expectation(mask: Tensor) -> float:
    """What a direction with spatially uniform effect scores: the mask's area fraction."""
    return float(mask.float().mean()) if mask.numel() else math.nan
