"""Plot a training run's curves for the model card: loss and in-run sample quality against images seen.

Reads ``loss.csv`` (one row per optimiser step) and ``swd.csv`` (the EMA weights scored every few thousand steps,
written by ``scripts/train_default_model.py --swd-every``) from a run folder, e.g. ``training/v2``::

    python scripts/plot_training.py training/v2 --out src/localdiff/default_model/curves.png

Left: the training loss (the objective, e.g. min-SNR-weighted) and the plain epsilon MSE, each as a running mean
over ``--window`` steps. Right: SWD x1e3 against held-out GAN faces (mean and per pyramid level), with the
GAN-vs-GAN floor as a dashed line when ``--floor`` is given. Needs matplotlib (``pip install -e ".[eval]"``).
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_csv(path: Path) -> list[dict[str, float]]:
    with open(path, newline="") as f:
        return [{k: float(v) for k, v in row.items() if v not in ("", None)} for row in csv.DictReader(f)]


def running_mean(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", type=Path, help="folder with loss.csv (and swd.csv)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--batch-size", type=int, default=16, help="images per step, for the x axis (default: 16)")
    p.add_argument("--window", type=int, default=100, help="steps in the loss's running mean (default: 100)")
    p.add_argument("--floor", type=float, default=None, help="SWD of GAN vs GAN faces, drawn as a dashed line")
    args = p.parse_args(argv)
    loss_path = args.run / "loss.csv"
    if not loss_path.is_file():
        print(f"error: {loss_path} not found; give the folder a training run wrote (e.g. training/v2)", file=sys.stderr)
        return 2
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('error: plotting needs matplotlib; run: pip install -e ".[eval]"', file=sys.stderr)
        return 2

    loss = read_csv(loss_path)
    swd_path = args.run / "swd.csv"
    swd = read_csv(swd_path) if swd_path.is_file() else []
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    images = [row["step"] * args.batch_size / 1000 for row in loss]
    for key, label in (("loss", "training objective"), ("mse", "epsilon MSE")):
        if all(key in row for row in loss):
            axes[0].plot(images, running_mean([row[key] for row in loss], args.window), label=label)
    axes[0].set(xlabel="images seen (thousands)", ylabel=f"running mean over {args.window} steps", yscale="log",
                title="training loss")
    axes[0].legend()
    if swd:
        x = [row["images_seen"] / 1000 for row in swd]
        axes[1].plot(x, [row["swd_mean"] for row in swd], "o-", label="mean")
        for key in ("swd_64px", "swd_32px", "swd_16px"):
            axes[1].plot(x, [row[key] for row in swd], ".--", alpha=0.6, label=key.removeprefix("swd_"))
        if args.floor is not None:
            axes[1].axhline(args.floor, color="grey", ls=":", label="GAN vs GAN")
        axes[1].legend()
    else:
        axes[1].text(0.5, 0.5, "no swd.csv yet", ha="center", va="center", transform=axes[1].transAxes)
    axes[1].set(xlabel="images seen (thousands)", ylabel="SWD x1e3", title="samples vs held-out GAN faces")
    fig.tight_layout()
    tmp = args.out.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
