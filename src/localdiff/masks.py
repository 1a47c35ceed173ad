"""Region masks: loading user masks and the shipped templates for the default model's aligned faces.

A mask is a bool tensor (R, R) at the model's resolution: True inside the region. Users give masks as image
files (white = region; or, for images with transparency, the opaque pixels) or, with the embedded default
model, by template name (``eyes``, ``nose``, ``mouth``, ``hair``): the templates fit its aligned 64x64 faces.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from localdiff.errors import LocalDiffError
from localdiff.images import ImageLike, as_pil, center_crop_box

log = logging.getLogger("localdiff")

_MASK_MODES = {"1", "L", "P", "LA", "RGB", "RGBA"}
TEMPLATE_DIR = Path(__file__).parent / "templates"


def template_names() -> list[str]:
    """Names of the shipped region templates (for the default model's 64x64 aligned faces)."""
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.png"))


def pixel_masks(masks: list[Tensor], channels: int, like: Tensor) -> Tensor:
    """(R, R) masks as rows over every output element (N, channels * R * R), on ``like``'s device and dtype: the
    masks the Jacobian code multiplies flattened outputs with."""
    stack = torch.stack([m.to(like.device, like.dtype) for m in masks])
    return stack[:, None].expand(-1, channels, -1, -1).reshape(len(masks), -1)


def template_path(name: str) -> Path:
    path = TEMPLATE_DIR / f"{name}.png"
    if not path.is_file():
        known = ", ".join(template_names()) or "none"
        raise LocalDiffError(f"no mask template named {name!r} (templates: {known}); give NAME=MASK.png for your own mask")
    return path


def load_mask(mask: ImageLike, resolution: int, *, name: str, image_size: tuple[int, int] | None = None) -> Tensor:
    """A region mask -> bool tensor (R, R).

    Accepts a file, PIL image, array or tensor. White (or, for images with transparency, opaque) pixels are
    inside; a soft (grey-level) mask is thresholded at 50 % grey, with a note, and a mask of one grey level is
    refused. A mask must have the size of the image it belongs to (it is then cropped and resized with it,
    nearest neighbour) or the model's resolution; it must be neither empty nor the whole image.
    """
    if isinstance(mask, Tensor) and mask.dtype == torch.bool:
        mask = mask.to(torch.uint8) * 255
    if isinstance(mask, np.ndarray) and mask.dtype == bool:
        mask = mask.astype(np.uint8) * 255
    pil = as_pil(mask, f"mask {name!r}")
    if pil.mode not in _MASK_MODES:
        raise LocalDiffError(
            f"mask {name!r} has image mode {pil.mode}; save it as an 8-bit black-and-white PNG (white = region)"
        )
    if pil.mode in ("RGBA", "LA") and pil.getchannel("A").getextrema()[0] < 255:
        grey = pil.getchannel("A")
    else:
        grey = pil.convert("L")
    size = grey.size
    if size != (resolution, resolution):
        if image_size is not None and size != tuple(image_size):
            raise LocalDiffError(
                f"mask {name!r} is {size[0]}x{size[1]} but the image is {image_size[0]}x{image_size[1]}; "
                f"give a mask of the image's size or of the model's ({resolution}x{resolution})"
            )
        grey = grey.crop(center_crop_box(*size)).resize((resolution, resolution), Image.Resampling.NEAREST)
    values = np.asarray(grey)
    low, high = int(values.min()), int(values.max())
    if low == high and 0 < low < 255:
        raise LocalDiffError(f"mask {name!r} is one grey level ({low}) everywhere; paint the region white (255) on "
                             f"black (0)")
    soft = float(((values > 15) & (values < 240)).mean())
    if soft > 0.01:
        log.warning("note: mask %r is soft (%.0f%% of its pixels are grey); localdiff uses the pixels at least 50%% "
                    "white as the region", name, 100 * soft)
    m = torch.from_numpy(values >= 128)
    frac = float(m.float().mean())
    if frac == 0.0:
        raise LocalDiffError(f"mask {name!r} is empty (no white pixels) at {resolution}x{resolution}; paint the region white")
    if frac == 1.0:
        raise LocalDiffError(f"mask {name!r} covers the whole image; a region must leave something outside it")
    return m


def save_masks(masks: dict[str, Tensor], out_dir: Path) -> list[Path]:
    """Write each mask as a white-on-black PNG ``out_dir/<part>.png`` (each file written whole, then renamed)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for part, m in masks.items():
        path = out_dir / f"{part}.png"
        tmp = path.with_name(f".{path.name}.tmp")
        Image.fromarray(m.numpy().astype(np.uint8) * 255, mode="L").save(tmp, format="PNG")
        tmp.replace(path)
        paths.append(path)
    return paths
