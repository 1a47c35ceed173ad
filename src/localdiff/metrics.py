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


# ---------------------------------------------------------------------- sample quality (SWD)
# Sliced Wasserstein distance on Laplacian-pyramid patches (Karras et al. 2018, "Progressive Growing of GANs",
# appendix D): a sample-quality number that needs no pretrained feature network. Each pyramid level gives 7x7
# patch descriptors, normalised per colour channel within each set, and the distance between the two sets of
# descriptors is the sliced Wasserstein distance over random unit directions.

_BINOMIAL_5 = (1.0, 4.0, 6.0, 4.0, 1.0)


def _blur(x: Tensor) -> Tensor:
    k = torch.tensor(_BINOMIAL_5, dtype=x.dtype, device=x.device)
    k = (k[:, None] * k[None, :]) / 256.0
    c = x.shape[1]
    return F.conv2d(F.pad(x, (2, 2, 2, 2), mode="reflect"), k.expand(c, 1, 5, 5), groups=c)


def laplacian_pyramid(images: Tensor, num_levels: int) -> list[Tensor]:
    """Band-pass levels, finest first, of (B, C, H, W) images; the last level is the coarsest Gaussian level.

    Levels halve the resolution: ``num_levels`` = 3 on 64 px images gives 64, 32 and 16 px levels.
    """
    levels, x = [], images
    for _ in range(num_levels - 1):
        down = _blur(x)[..., ::2, ::2]
        up = F.interpolate(down, size=x.shape[-2:], mode="bilinear", align_corners=False)
        levels.append(x - up)
        x = down
    levels.append(x)
    return levels


def patch_descriptors(level: Tensor, num_patches: int, *, patch_size: int = 7, generator=None) -> Tensor:
    """``num_patches`` random ``patch_size`` x ``patch_size`` patches per image: (B * num_patches, C * p * p)."""
    b, c, h, w = level.shape
    if h < patch_size or w < patch_size:
        raise ValueError(f"a {h}x{w} pyramid level is smaller than the {patch_size}px patches")
    rows = torch.randint(0, h - patch_size + 1, (b, num_patches), generator=generator)
    cols = torch.randint(0, w - patch_size + 1, (b, num_patches), generator=generator)
    offs = torch.arange(patch_size)
    r = (rows[..., None] + offs)[..., :, None].expand(b, num_patches, patch_size, patch_size)
    q = (cols[..., None] + offs)[..., None, :].expand(b, num_patches, patch_size, patch_size)
    flat = level.reshape(b, c, h * w)
    index = (r * w + q).reshape(b, 1, -1).expand(b, c, -1).to(level.device)
    patches = flat.gather(2, index).reshape(b, c, num_patches, patch_size * patch_size)
    return patches.permute(0, 2, 1, 3).reshape(b * num_patches, c * patch_size * patch_size)


def _normalise_descriptors(desc: Tensor, channels: int) -> Tensor:
    """Zero mean, unit standard deviation per colour channel (over all descriptors and patch pixels)."""
    d = desc.reshape(desc.shape[0], channels, -1)
    mean = d.mean(dim=(0, 2), keepdim=True)
    std = d.std(dim=(0, 2), keepdim=True).clamp(min=1e-8)
    return ((d - mean) / std).reshape(desc.shape)


def sliced_wasserstein(a: Tensor, b: Tensor, *, num_projections: int = 512, repeats: int = 4,
                       generator=None) -> float:
    """Sliced Wasserstein-1 distance between two equally sized point sets (N, D): the mean over random unit
    directions of the 1-D W1 distance between the projected sets (sorted projections matched in order)."""
    if a.shape != b.shape:
        raise ValueError(f"sliced_wasserstein needs equally sized sets, got {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.double(), b.double()
    total = 0.0
    for _ in range(repeats):
        dirs = torch.randn(a.shape[1], num_projections, generator=generator, dtype=torch.float64)
        dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(a.device)
        pa, _ = torch.sort((a @ dirs).T.contiguous(), dim=1)  # sorting rows is 3-4x faster than columns
        pb, _ = torch.sort((b @ dirs).T.contiguous(), dim=1)
        total += float((pa - pb).abs().mean())
    return total / repeats


def swd(images_a: Tensor, images_b: Tensor, *, num_levels: int | None = None, patches_per_image: int = 128,
        num_projections: int = 512, repeats: int = 4, seed: int = 0) -> dict[str, float]:
    """Sliced Wasserstein distance between two image sets on Laplacian-pyramid patches (Karras et al. 2018).

    ``images_*``: (N, C, H, W) in [-1, 1] (or any common range), the same N. Returns ``{"<res>px": value, ...,
    "mean": value}`` with each level's distance multiplied by 1e3, as the paper reports it. Lower is better;
    two sets drawn from the same distribution score near their sampling-noise floor.
    """
    if images_a.shape != images_b.shape:
        raise ValueError(f"swd needs two sets of the same shape, got {tuple(images_a.shape)} and "
                         f"{tuple(images_b.shape)}")
    size = images_a.shape[-1]
    if num_levels is None:  # down to 16 px, as the paper does
        num_levels = max(1, int(math.log2(size // 16)) + 1)
    g = torch.Generator().manual_seed(seed)
    result: dict[str, float] = {}
    levels_a = laplacian_pyramid(images_a.double(), num_levels)
    levels_b = laplacian_pyramid(images_b.double(), num_levels)
    c = images_a.shape[1]
    for la, lb in zip(levels_a, levels_b):
        state = g.get_state()  # the same patch positions in both sets: identical sets score exactly 0
        da = _normalise_descriptors(patch_descriptors(la, patches_per_image, generator=g), c)
        g.set_state(state)
        db = _normalise_descriptors(patch_descriptors(lb, patches_per_image, generator=g), c)
        result[f"{la.shape[-1]}px"] = 1e3 * sliced_wasserstein(da, db, num_projections=num_projections,
                                                               repeats=repeats, generator=g)
    result["mean"] = sum(result.values()) / len(result)
    return result


@torch.no_grad()
def heldout_eps_errors(eps_fn, alphas_cumprod: Tensor, images: Tensor, *, batch_size: int = 64,
                       seed: int = 1234) -> tuple[Tensor, Tensor]:
    """Per-image epsilon-prediction MSE of ``eps_fn(x_t, t)`` on held-out ``images`` (N, C, H, W), and the
    timesteps: image i is noised at timestep floor((i + 1/2) T / N) (evenly over 0 .. T-1) with noise fixed by
    ``seed``, so every model is scored on the same inputs. Returns ``(errors (N,), timesteps (N,))``."""
    n, num_t = images.shape[0], alphas_cumprod.shape[0]
    t = ((2 * torch.arange(n) + 1) * num_t) // (2 * n)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(seed))
    errors = []
    for s in range(0, n, batch_size):
        x0, e, ts = images[s:s + batch_size], noise[s:s + batch_size], t[s:s + batch_size]
        a = alphas_cumprod[ts].to(x0.dtype)[:, None, None, None]
        pred = eps_fn(a.sqrt() * x0 + (1 - a).sqrt() * e, ts).float().cpu()
        errors.append((pred - e).pow(2).mean(dim=(1, 2, 3)))
    return torch.cat(errors), t


def heldout_eps_mse(eps_fn, alphas_cumprod: Tensor, images: Tensor, **kwargs) -> float:
    """Mean of :func:`heldout_eps_errors`: one number per model, lower is better."""
    return float(heldout_eps_errors(eps_fn, alphas_cumprod, images, **kwargs)[0].mean())
