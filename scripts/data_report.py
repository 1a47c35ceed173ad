#!/usr/bin/env python
"""What a data filter would remove from the default model's training faces (the face GAN), measured.

Scores 2,000 GAN faces (evaluation-range seeds 50,000,000+, never used for training) by left-right asymmetry
(mean |x - mirror(x)|: profiles and half-lit faces score high) and by the brightness of the central face area
(rows 16-55, columns 16-47: underexposed photos score low), prints the quantiles and saves the 16 extreme faces
of each score as grids, so the decision on filtering (model card, "data") can be checked by eye.

    python scripts/data_report.py --out runs/data_report
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from localdiff.facegan import FaceGAN
from localdiff.viz import image_grid


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--out", type=Path, default=Path("runs/data_report"))
    args = p.parse_args(argv)
    faces = FaceGAN().face_range(50_000_000, args.n)
    scores = {
        "asymmetry": (faces - faces.flip(-1)).abs().mean(dim=(1, 2, 3)),
        "face brightness": ((faces[:, :, 16:56, 16:48] + 1) / 2).mean(dim=(1, 2, 3)),
    }
    qs = torch.tensor([0.02, 0.05, 0.25, 0.5, 0.75, 0.95, 0.98])
    print("| score | " + " | ".join(f"q{int(q * 100)}" for q in qs) + " |")
    print("|---" * (len(qs) + 1) + "|")
    for name, v in scores.items():
        print(f"| {name} | " + " | ".join(f"{float(x):.3f}" for x in torch.quantile(v, qs)) + " |")
    args.out.mkdir(parents=True, exist_ok=True)
    image_grid(faces[scores["asymmetry"].argsort(descending=True)[:16]], columns=8).save(args.out / "most_asymmetric.png")
    image_grid(faces[scores["face brightness"].argsort()[:16]], columns=8).save(args.out / "darkest.png")
    print(f"wrote {args.out}/most_asymmetric.png and darkest.png")


if __name__ == "__main__":
    main()
