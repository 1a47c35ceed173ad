"""Image and mask I/O: load, centre-crop and resize to the model's resolution, validate, save atomically."""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Union

import numpy as np
import torch
from PIL import ExifTags, Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from localdiff.errors import LocalDiffError

log = logging.getLogger("localdiff")

ImageLike = Union[str, Path, Image.Image, np.ndarray, Tensor]

def open_image(src: str | Path, what: str = "image") -> Image.Image:
    """Open an image file fully (so errors surface here), or raise a one-line :class:`LocalDiffError`.

    A JPEG's EXIF orientation is applied (the image is turned upright, with a note), and an animated image gives
    its first frame (with a note). Images too large to be a photo (PIL's decompression-bomb limit) are refused.
    """
    path = Path(src)
    if not path.exists():
        raise LocalDiffError(f"{what} {src} does not exist")
    if path.is_dir():
        raise LocalDiffError(f"{what} {src} is a folder, not an image file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if getattr(im, "n_frames", 1) > 1:
                    log.warning("note: %s %s has %d frames; using the first", what, src, im.n_frames)
                im.load()
                orientation = im.getexif().get(ExifTags.Base.Orientation, 1)
                if orientation not in (1, None):
                    log.warning("note: %s %s is turned upright as its EXIF orientation (%d) says", what, src,
                                orientation)
                    return ImageOps.exif_transpose(im)
                return im.copy()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise LocalDiffError(f"{what} {src} is too large to open safely ({_pixels(path)}); shrink it to a few "
                             f"thousand pixels a side") from exc
    except UnidentifiedImageError as exc:
        raise LocalDiffError(f"{what} {src} is not an image PIL can read (PNG, JPEG, ...)") from exc
    except OSError as exc:
        raise LocalDiffError(f"cannot read {what} {src}: {exc}") from exc


def _pixels(path: Path) -> str:
    """'W x H pixels' read from the header alone (no decoding), for messages."""
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None  # opening reads the header only; nothing is decoded here
    try:
        with Image.open(path) as im:
            return f"{im.size[0]} x {im.size[1]} pixels"
    except OSError:
        return "too many pixels"
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def center_crop_box(w: int, h: int) -> tuple[int, int, int, int]:
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return left, top, left + side, top + side


def as_pil(img: ImageLike, what: str) -> Image.Image:
    if isinstance(img, (str, Path)):
        return open_image(img, what)
    if isinstance(img, Image.Image):
        return img
    if isinstance(img, Tensor):
        img = img.detach().cpu().numpy()
    if isinstance(img, np.ndarray):
        arr = img
        if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
            arr = np.moveaxis(arr, 0, -1)
        if arr.ndim == 3 and arr.shape[-1] == 1:
            arr = arr[..., 0]
        if arr.dtype != np.uint8:
            arr = np.clip(np.asarray(arr, dtype=np.float64), 0.0, 1.0) * 255.0
            arr = np.round(arr).astype(np.uint8)
        return Image.fromarray(arr)
    raise LocalDiffError(f"{what} must be a path, PIL image, numpy array or tensor, got {type(img).__name__}")


def load_image(img: ImageLike, resolution: int, *, name: str = "image", resize_note: bool = True) -> Tensor:
    """RGB image -> tensor (1, 3, R, R) in [-1, 1]; other sizes are centre-cropped and resized (with a notice,
    unless ``resize_note`` is off: a folder run says it once for all its images)."""
    pil = as_pil(img, "image")
    if pil.mode not in ("RGB", "RGBA", "L", "P", "LA", "PA", "1", "CMYK", "YCbCr"):
        raise LocalDiffError(f"{name} has image mode {pil.mode}, which localdiff cannot use; save it as RGB PNG")
    if pil.mode in ("RGBA", "LA", "PA") or (pil.mode == "P" and "transparency" in pil.info):
        alpha = pil.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            log.warning("note: %s has transparent pixels; the alpha channel is dropped (the colours under it are used)",
                        name)
    pil = pil.convert("RGB")
    if pil.size != (resolution, resolution):
        (log.warning if resize_note else log.debug)(
            "note: %s is %dx%d; centre-cropping and resizing it to the model's %dx%d",
            name, pil.size[0], pil.size[1], resolution, resolution,
        )
        pil = pil.crop(center_crop_box(*pil.size)).resize((resolution, resolution), Image.Resampling.LANCZOS)
    arr = np.asarray(pil, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1)[None].contiguous()


def image_size(img: ImageLike) -> tuple[int, int] | None:
    """(width, height) of an image-like input, if it has one."""
    try:
        return as_pil(img, "image").size
    except LocalDiffError:
        return None


def to_pil(x: Tensor) -> Image.Image | list[Image.Image]:
    """Tensor in [-1, 1], (3, H, W) or (B, 3, H, W) -> PIL image(s)."""
    batch = x.ndim == 4
    x = x if batch else x[None]
    arr = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    ims = [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in arr]
    return ims if batch else ims[0]


def tensor_hash(x: Tensor) -> str:
    """Short sha256 of a tensor's values (used to tie directions to their source image)."""
    return hashlib.sha256(x.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()).hexdigest()[:16]


# ---------------------------------------------------------------------- output files
def check_output_path(path: str | Path, suffixes: tuple[str, ...], what: str) -> Path:
    """Fail early (before any work) if ``path`` cannot be written or has the wrong extension."""
    p = Path(path)
    if p.suffix.lower() not in suffixes:
        raise LocalDiffError(f"{what} {path} must end in {' or '.join(suffixes)}")
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        raise LocalDiffError(f"{what} {path} is a folder; give a file name")
    if not parent.is_dir():
        raise LocalDiffError(f"cannot write {what} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise LocalDiffError(f"cannot write {what} {path}: folder {parent} is not writable")
    try:  # what os.access cannot know (/proc, read-only mounts, full disks): try it
        fd, probe = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".probe", dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise LocalDiffError(f"cannot write {what} {path}: no file can be created in {parent} "
                             f"({exc.strerror or exc}); choose another folder") from None
    return p


@contextmanager
def atomic_write(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it into place only if the block succeeds."""
    p = Path(path)
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=p.suffix, dir=p.parent if str(p.parent) else ".")
    except OSError as exc:
        raise LocalDiffError(f"cannot write {path}: {exc.strerror or exc}; choose another folder") from None
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)  # mkstemp makes the file private (0600); give it the permissions of a normal new file
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except OSError as exc:  # e.g. the disk filled up while writing
        Path(tmp).unlink(missing_ok=True)
        raise LocalDiffError(f"cannot write {path}: {exc.strerror or exc}") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_image(img: Image.Image, path: str | Path) -> None:
    with atomic_write(path) as tmp:
        img.save(tmp, format="PNG")
