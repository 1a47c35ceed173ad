#!/usr/bin/env python
"""The default model's recipe A/B runs: short trainings at an equal budget, then one sample-quality table.

Every run starts from scratch with the same seed and sees the same number of images (``--images``; all the
CPU configurations train at about the same images/s, see ``benchmarks/bench_train.py``, so this is an equal
wall-clock budget without the noise of a shared machine). Then ``benchmarks/bench_samples.py`` scores every
run's EMA weights in one process (SWD against held-out GAN faces, held-out epsilon MSE).

Resumable: a run whose exported model exists is skipped; an interrupted one continues from its checkpoint.

    nice python scripts/recipe_ab.py --out runs/ab            # about 70 minutes on a quiet 2-core machine

(Batch size is not among the runs: ``benchmarks/bench_train.py`` shows that a larger batch trains no more images
per second on 2 cores, so it would only mean fewer optimiser steps.)
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# name -> training options; all share --warmup 50 --ema-decay 0.998 --seed 0
RUNS = {
    "A-v0-recipe": ["--arch", "v0", "--loss", "mse", "--lr", "3e-4", "--batch-size", "16"],
    "B-min-snr": ["--arch", "v0", "--loss", "min-snr", "--lr", "3e-4", "--batch-size", "16"],
    "C-min-snr-lr6e-4": ["--arch", "v0", "--loss", "min-snr", "--lr", "6e-4", "--batch-size", "16"],
    "E-attn16-min-snr": ["--arch", "attn16", "--loss", "min-snr", "--lr", "3e-4", "--batch-size", "16"],
}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("runs/ab"))
    p.add_argument("--images", type=int, default=6000, help="training images per run (default: 6000)")
    p.add_argument("--runs", nargs="*", default=list(RUNS), choices=list(RUNS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--n", type=int, default=256, help="samples per model for SWD")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps for the samples")
    args = p.parse_args(argv)
    train = _load(ROOT / "scripts" / "train_default_model.py", "train_default_model")
    for name in args.runs:
        work = args.out / name
        if (work / "model" / "unet" / "config.json").is_file():
            print(f"{name}: done, skipped")
            continue
        opts = RUNS[name]
        batch = int(opts[opts.index("--batch-size") + 1])
        steps = args.images // batch
        common = ["--work-dir", str(work), "--threads", str(args.threads), "--warmup", "50", "--ema-decay", "0.998",
                  "--checkpoint-every", "50", "--sample-every", "100000", "--resume"]
        print(f"{name}: {steps} steps", flush=True)
        train.main(opts + common + ["--steps", str(steps), "--export", str(work / "model")])
    bench = _load(ROOT / "benchmarks" / "bench_samples.py", "bench_samples")
    sys.stdout.flush()
    bench.main(["--models", *[str(args.out / r / "model") for r in args.runs], "--names", *args.runs,
                "--n", str(args.n), "--steps", str(args.steps), "--threads", str(args.threads),
                "--save-samples", str(args.out / "samples")])


if __name__ == "__main__":
    main()
