#!/usr/bin/env python
"""Figures of the regions localdiff finds without painted masks, for docs/automatic_regions.md.

* ``facemasks.png``: MediaPipe face-mesh parts (eyes red, brows yellow, nose blue, mouth green) on the six shipped
  example faces and on matplotlib's sample photo of Grace Hopper (public domain), above the templates.
* ``auto_regions.png``: ``auto_regions`` (3, 4 and 6 regions) of the embedded default model on two example faces
  and on scikit-learn's two sample photos (china.jpg, flower.jpg; CC BY 2.0, see sklearn/datasets/images).

Needs the [masks] and [test] extras (mediapipe, matplotlib, scikit-learn).

    python scripts/make_region_figures.py --out-dir docs/images
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from localdiff.demo import example_faces
from localdiff.editor import LocalEditor
from localdiff.facemasks import face_part_masks
from localdiff.masks import load_mask, template_path
from localdiff.regions import auto_regions

PART_COLOURS = {"eyes": (255, 0, 0), "brows": (255, 255, 0), "nose": (0, 0, 255), "mouth": (0, 255, 0)}
PALETTE = np.array([(230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180)])


def overlay(base: np.ndarray, masks: dict, colours) -> np.ndarray:
    out = base.astype(np.float32).copy()
    for (name, m), c in zip(masks.items(), colours):
        sel = m.numpy() if hasattr(m, "numpy") else m
        out[sel] = 0.5 * out[sel] + 0.5 * np.array(c, dtype=np.float32)
    return out


def square(img: Image.Image, size: int) -> np.ndarray:
    w, h = img.size
    s = min(w, h)
    box = ((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s)
    return np.asarray(img.convert("RGB").crop(box).resize((size, size), Image.Resampling.BICUBIC))


def save(grid: np.ndarray, path: Path, zoom: int) -> None:
    img = Image.fromarray(grid.clip(0, 255).astype(np.uint8))
    img.resize((img.width * zoom, img.height * zoom), Image.Resampling.NEAREST).save(path)
    print(f"wrote {path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out-dir", type=Path, default=Path("docs/images"))
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the inversions (default: 20)")
    args = p.parse_args(argv)
    import matplotlib.cbook
    from sklearn.datasets import load_sample_images

    args.out_dir.mkdir(parents=True, exist_ok=True)
    # face parts: example faces (64 px) and a real photo, each with the templates below for comparison
    columns = []
    templates = {n: load_mask(template_path(n), 64, name=n) for n in ("eyes", "nose", "mouth")}
    hopper = Image.open(matplotlib.cbook.get_sample_data("grace_hopper.jpg"))
    for img in [Image.open(f) for f in example_faces()] + [Image.fromarray(square(hopper, 64))]:
        base = square(img, 64)
        found = face_part_masks(Image.fromarray(base), list(PART_COLOURS))
        top = overlay(base, found, PART_COLOURS.values())
        bottom = overlay(base, templates, [PART_COLOURS[n] for n in templates])
        columns.append(np.concatenate([base, top, bottom], 0))
    save(np.concatenate(columns, 1), args.out_dir / "facemasks.png", 3)

    # automatic regions from the default model
    editor = LocalEditor.from_pretrained(num_inference_steps=args.steps)
    images = [Image.open(f) for f in example_faces()[:3:2]]
    images += [Image.fromarray(a) for a in load_sample_images().images]
    rows = []
    for img in images:
        base = square(img, 64)
        x = editor.prepare(Image.fromarray(base))
        tiles = [base]
        for n in (3, 4, 6):
            regions = auto_regions(editor, x, n)
            tiles.append(overlay(base, regions, PALETTE[:n]))
            print(f"  {n} regions: " + ", ".join(f"{k} {int(m.sum())} px" for k, m in regions.items()))
        rows.append(np.concatenate(tiles, 1))
    save(np.concatenate(rows, 0), args.out_dir / "auto_regions.png", 3)


if __name__ == "__main__":
    main()
