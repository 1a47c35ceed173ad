"""Pictures of edits: direction grids with region outlines and difference heatmaps, sweep strips and GIFs."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torch import Tensor

from localdiff.images import atomic_write, to_pil

OUTLINE = (0, 255, 128)
_LABEL_H = 14


def display_scale(resolution: int) -> int:
    """Integer upscaling so that small models' images are large enough to see (about 128 px or more)."""
    return max(1, 128 // resolution)


def outline(img: Image.Image, mask: Tensor, color=OUTLINE) -> Image.Image:
    """Draw the boundary of ``mask`` (bool (R, R), at the image's resolution) onto a copy of ``img``."""
    m = mask.cpu().numpy().astype(bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    edge = m & ~inner
    arr = np.asarray(img.convert("RGB")).copy()
    arr[edge] = color
    return Image.fromarray(arr)


def heatmap(diff: Tensor, vmax: float | None = None) -> Image.Image:
    """|difference| (C, H, W) averaged over channels -> black-red-yellow-white heat image."""
    d = diff.detach().float().cpu().abs().mean(0)
    scale = vmax if vmax else float(d.max().clamp(min=1e-8))
    v = (d / scale).clamp(0, 1).numpy()
    rgb = np.stack([np.clip(3 * v, 0, 1), np.clip(3 * v - 1, 0, 1), np.clip(3 * v - 2, 0, 1)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


def _font():
    return ImageFont.load_default()


def direction_grid(
    rows: Sequence[tuple[str, Tensor, Tensor]],
    strengths: Sequence[float],
) -> Image.Image:
    """One row per direction: ``(label, images (S, C, R, R) in [-1, 1], mask (R, R))`` for ``strengths``.

    Each row shows the edits from the most negative to the most positive strength with the region outlined,
    and a last column with the heatmap of |x(+s) - x(-s)| (same colour scale for all rows).
    """
    res = rows[0][1].shape[-1]
    k = display_scale(res)
    cell = res * k
    n_cols = len(strengths) + 1
    label_w = 70
    grid = Image.new("RGB", (label_w + n_cols * cell, _LABEL_H + len(rows) * cell), "white")
    draw = ImageDraw.Draw(grid)
    font = _font()
    for j, s in enumerate(strengths):
        draw.text((label_w + j * cell + 2, 1), f"{s:+.3g}", fill="black", font=font)
    draw.text((label_w + len(strengths) * cell + 2, 1), "|diff|", fill="black", font=font)
    vmax = max(float((imgs[-1] - imgs[0]).abs().mean(0).max()) for _, imgs, _ in rows) or 1e-8
    for i, (label, imgs, mask) in enumerate(rows):
        y = _LABEL_H + i * cell
        draw.text((2, y + cell // 2 - 6), label, fill="black", font=font)
        for j, im in enumerate(to_pil(imgs)):
            tile = outline(im, mask).resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + j * cell, y))
        hm = outline(heatmap(imgs[-1] - imgs[0], vmax), mask, (0, 160, 255))
        grid.paste(hm.resize((cell, cell), Image.Resampling.NEAREST), (label_w + len(strengths) * cell, y))
    return grid


def edit_grid(editor, image, dirs, strength: float, n: int = 5) -> tuple[Image.Image, dict[str, Tensor]]:
    """``image`` edited along every local direction of ``dirs`` at ``n`` strengths in [-strength, strength].

    Returns the grid picture and the edits themselves, ``{direction name: (n, C, R, R)}``, for reuse.
    """
    strengths = symmetric_strengths(strength, n)
    local = dirs.local()
    batch = editor.render(image, [[(d, s)] for d in local for s in strengths])
    frames = {d.name: batch[i * n:(i + 1) * n] for i, d in enumerate(local)}
    rows = [(d.name, frames[d.name], dirs.masks[d.region]) for d in local]
    return direction_grid(rows, strengths), frames


def enlarge(img: Image.Image) -> Image.Image:
    """A square image upscaled (nearest) by :func:`display_scale`, for display."""
    cell = img.size[0] * display_scale(img.size[0])
    return img.resize((cell, cell), Image.Resampling.NEAREST)


def tile(images: Sequence[Image.Image], columns: int) -> Image.Image:
    """Equal-sized square PIL images in rows of ``columns``, upscaled for display."""
    cells = [enlarge(im) for im in images]
    cell = cells[0].size[0]
    rows = -(-len(cells) // columns)
    out = Image.new("RGB", (columns * cell, rows * cell), "white")
    for i, im in enumerate(cells):
        out.paste(im, ((i % columns) * cell, (i // columns) * cell))
    return out


def strip(images: Tensor, mask: Tensor | None = None) -> Image.Image:
    """A horizontal strip of images (B, C, R, R) in [-1, 1], upscaled for display."""
    ims = to_pil(images)
    return tile([outline(im, mask) for im in ims] if mask is not None else ims, len(ims))


def save_gif(images: Tensor, path: str | Path, *, duration_ms: int = 120, bounce: bool = True) -> None:
    """Animated GIF of a sweep (B, C, R, R) in [-1, 1]; ``bounce`` plays it forwards then backwards."""
    frames = [enlarge(im) for im in to_pil(images)]
    if bounce and len(frames) > 2:
        frames = frames + frames[-2:0:-1]
    with atomic_write(path) as tmp:
        frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=duration_ms, loop=0)


def symmetric_strengths(max_strength: float, n: int) -> list[float]:
    """``n`` strengths evenly from ``-max_strength`` to ``+max_strength`` (n odd includes 0)."""
    return torch.linspace(-max_strength, max_strength, n).tolist()


def image_grid(images: Tensor, columns: int | None = None) -> Image.Image:
    """Images (B, C, R, R) in [-1, 1] tiled in a near-square grid, upscaled for display."""
    return tile(to_pil(images), columns or int(np.ceil(np.sqrt(len(images)))))


def method_panel(reconstruction: Tensor, edits: dict[str, Tensor], masks: dict[str, Tensor]) -> Image.Image:
    """Rows = regions, columns = the reconstruction then each method's edit (``{method: (regions, C, R, R)}``,
    rows in the order of ``masks``), each with the region outlined; labelled columns."""
    methods = list(edits)
    cells = []
    for j, (region, mask) in enumerate(masks.items()):
        cells.append(outline(to_pil(reconstruction), mask))
        cells += [outline(to_pil(edits[m][j]), mask) for m in methods]
    grid = tile(cells, 1 + len(methods))
    cell = grid.size[0] // (1 + len(methods))
    out = Image.new("RGB", (grid.size[0] + 48, grid.size[1] + _LABEL_H), "white")
    out.paste(grid, (48, _LABEL_H))
    draw = ImageDraw.Draw(out)
    for i, label in enumerate(["input"] + methods):
        draw.text((48 + i * cell + 2, 1), label, fill="black", font=_font())
    for j, region in enumerate(masks):
        draw.text((2, _LABEL_H + j * cell + cell // 2), region, fill="black", font=_font())
    return out


def curves_figure(points: dict[str, list[tuple[float, float, float]]], target: float, path: str | Path) -> None:
    """Locality and outside PSNR against inside change, one line per method (``{method: [(change, locality,
    psnr), ...]}``); the matched-visibility target as a dashed line. Needs matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for method, pts in points.items():
        pts = sorted(pts)
        xs = [p[0] for p in pts]
        axes[0].plot(xs, [p[1] for p in pts], marker="o", label=method)
        axes[1].plot(xs, [p[2] for p in pts], marker="o", label=method)
    for ax, ylabel in zip(axes, ["locality (share of change inside the region)", "outside PSNR (dB)"]):
        ax.axvline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_xlabel("inside change (mean |Δ| in the region)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
