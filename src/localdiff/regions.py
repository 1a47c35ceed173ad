"""Regions for any model and any image, without a face detector: pixels grouped by how the model's own top
h-space directions move them.

At the discovery timestep, the top-``k`` right singular vectors v_1..v_k of the whole image's Jacobian
d eps / dh are found (the subspace iteration discovery uses). Each pixel p gets the profile of how strongly each
of them changes it, |J v_i|(p) over the channels, weighted by the singular value and normalised per pixel; pixels
that the same directions move together form a region. k-means (k-means++ start) clusters the profiles, with the
pixel's position as a weak extra feature so that regions stay in one piece. The result is ``n`` disjoint,
non-empty masks that cover the image, named ``region1`` .. ``regionN`` from the top of the image down.

    regions = auto_regions(editor, "church.png", 4)
    dirs = editor.discover("church.png", regions)
"""

from __future__ import annotations

import torch
from torch import Tensor

from localdiff.errors import LocalDiffError
from localdiff.images import ImageLike

# Measured on the example faces and two non-face images (docs/automatic_regions.md): below ~0.3 the regions
# scatter into speckle; above ~1 they become a plain grid of the image.
SPATIAL_WEIGHT = 0.5
SMOOTH = 3
MAX_REGIONS = 16


def kmeans(x: Tensor, n: int, *, iters: int = 100, seed: int = 0) -> Tensor:
    """Lloyd's k-means of the rows of ``x`` (m, f) into ``n`` clusters, started by k-means++ (``seed``). Returns
    the labels (m,) on the CPU, every cluster non-empty (an emptied cluster restarts at the point farthest from its centre)."""
    m = x.shape[0]
    if not 1 <= n <= m:
        raise ValueError(f"cannot make {n} clusters of {m} points")
    g = torch.Generator().manual_seed(seed)
    x = x.detach().to("cpu", torch.float64)  # small; on the CPU, where the seeded draws are
    centres = x[torch.randint(m, (1,), generator=g, device="cpu")]
    for _ in range(1, n):
        d2 = torch.cdist(x, centres).pow(2).min(1).values
        pick = torch.multinomial(d2 / d2.sum(), 1, generator=g) if d2.sum() > 0 else torch.randint(m, (1,), generator=g, device="cpu")
        centres = torch.cat([centres, x[pick]])
    labels = torch.full((m,), -1, dtype=torch.long, device="cpu")
    for _ in range(iters):
        dist = torch.cdist(x, centres)
        new = dist.argmin(1)
        for j in range(n):  # keep every cluster: an empty one takes the worst-served point
            if not (new == j).any():
                far = dist.gather(1, new[:, None]).squeeze(1).argmax()
                new[far] = j
        if torch.equal(new, labels):
            break
        labels = new
        centres = torch.stack([x[labels == j].mean(0) for j in range(n)])
    return labels


def response_profiles(responses: Tensor, sigma: Tensor, *, smooth: int = SMOOTH) -> Tensor:
    """Per pixel, how strongly each direction changes it: responses (k, C, R, R) of unit directions, their singular
    values ``sigma`` (k,) -> (R * R, k), averaged over a ``smooth`` x ``smooth`` neighbourhood (odd; 1: none) and
    each row scaled to unit length (the pattern, not the amount)."""
    amount = responses.double().pow(2).sum(1).sqrt()  # (k, R, R)
    amount = amount * (sigma.double() / sigma.double().max()).view(-1, 1, 1)
    if smooth > 1:
        amount = torch.nn.functional.avg_pool2d(amount[:, None], smooth, stride=1, padding=smooth // 2,
                                                count_include_pad=False)[:, 0]
    prof = amount.flatten(1).T
    return prof / prof.norm(dim=1, keepdim=True).clamp(min=1e-12)


def regions_from_profiles(profiles: Tensor, resolution: int, n: int, *, spatial_weight: float = SPATIAL_WEIGHT,
                          seed: int = 0) -> dict[str, Tensor]:
    """Cluster per-pixel profiles (R * R, k) into ``n`` masks (R, R), named region1.. from the top down."""
    ys, xs = torch.meshgrid(torch.arange(resolution, device="cpu"), torch.arange(resolution, device="cpu"),
                            indexing="ij")
    pos = torch.stack([ys.flatten(), xs.flatten()], 1).double() / resolution
    labels = kmeans(torch.cat([profiles.double(), spatial_weight * pos], 1), n, seed=seed)
    masks = [(labels == j).view(resolution, resolution) for j in range(n)]
    masks.sort(key=lambda m: (float(ys[m].double().mean()), float(xs[m].double().mean())))
    return {f"region{i + 1}": m for i, m in enumerate(masks)}


def auto_regions(editor, image: ImageLike, n: int, *, timestep: int | float | None = None, k: int = 8,
                 spatial_weight: float = SPATIAL_WEIGHT, smooth: int = SMOOTH, seed: int = 0) -> dict[str, Tensor]:
    """``n`` regions of ``image`` found from ``editor``'s model (see the module docstring): name -> (R, R) bool
    masks at the model's resolution, disjoint, non-empty, covering the image. ``k``: h-space directions whose
    effects are compared (more gives finer distinctions and costs more)."""
    from localdiff.config import DiscoveryConfig, timestep_fraction

    if not 2 <= n <= MAX_REGIONS:
        raise LocalDiffError(f"the number of automatic regions must be in 2..{MAX_REGIONS}, got {n}")
    if not 2 <= k <= 64:
        raise LocalDiffError(f"k (directions compared) must be in 2..64, got {k}")
    timestep = timestep_fraction(DiscoveryConfig.timestep if timestep is None else timestep,
                                 editor.model.num_train_timesteps)
    res = editor.model.resolution
    whole = torch.ones(res, res, dtype=torch.bool, device="cpu")  # masks live on the CPU, like loaded ones
    sub, _, _ = editor.region_subspaces(image, [whole], timestep=timestep, k=k, oversample=3, seed=seed,
                                        max_iter=15, tol_deg=1.0)
    responses = editor.responses(image, sub.vectors[0], timestep)
    return regions_from_profiles(response_profiles(responses.cpu(), sub.sigma[0].cpu(), smooth=smooth), res, n,
                                 spatial_weight=spatial_weight, seed=seed)
