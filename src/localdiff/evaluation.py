"""Measure edits: pixel-space locality, visibility and preservation of an edit against the reconstruction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
from torch import Tensor

from localdiff import metrics


@dataclass
class EditScore:
    """Metrics of one edit (method.md section 7), images in [0, 1]."""

    locality: float
    inside_change: float
    outside_psnr: float
    outside_ssim: float
    leakage: dict[str, float]


def score_edit(edited: Tensor, reconstruction: Tensor, mask: Tensor,
               others: Mapping[str, Tensor] | None = None) -> EditScore:
    """Score ``edited`` against the unedited ``reconstruction`` (both (C, R, R) in [-1, 1]) for region ``mask``."""
    a = (edited.float().cpu() + 1) / 2
    b = (reconstruction.float().cpu() + 1) / 2
    delta = a - b
    return EditScore(
        locality=metrics.locality(delta, mask).item(),
        inside_change=metrics.inside_change(delta, mask).item(),
        outside_psnr=metrics.outside_psnr(a, b, mask).item(),
        outside_ssim=metrics.outside_ssim(a, b, mask).item(),
        leakage={n: metrics.leakage(delta, m).item() for n, m in (others or {}).items()},
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0
