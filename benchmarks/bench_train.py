#!/usr/bin/env python
"""Training throughput of the default model's recipe options, measured in one run (images/s, higher is better).

Each configuration runs ``--warmup`` untimed optimiser steps, then ``--steps`` timed ones on the same random
batches (the face GAN is left out: it costs the same for every configuration). Ratios are against the first row.

    python benchmarks/bench_train.py --threads 2
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "train_default_model", Path(__file__).resolve().parents[1] / "scripts" / "train_default_model.py")
train = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train)

CONFIGS = [  # (arch, precision, batch size)
    ("v0", "fp32", 16), ("attn16", "fp32", 16), ("v0", "fp32", 32), ("attn16", "fp32", 32), ("v0", "fp32", 64),
]
BF16 = [("v0", "bf16", 16), ("attn16", "bf16", 16)]  # with --bf16 (slow on CPUs without AVX512-BF16/AMX)


def images_per_second(arch: str, precision: str, batch: int, steps: int, warmup: int, loss: str = "mse") -> float:
    torch.manual_seed(0)
    unet, scheduler = train.make_model(arch)
    unet.train()
    opt = torch.optim.AdamW(unet.parameters(), lr=1e-4)
    alphas = scheduler.alphas_cumprod
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1
    noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    dtype = torch.bfloat16 if precision == "bf16" else None
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        value, _ = train.diffusion_loss(unet, x0, t, noise, alphas, loss=loss, autocast_dtype=dtype)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
    return steps * batch / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--bf16", action="store_true", help="also time bf16 autocast")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| arch | precision | batch | images/s | ratio |\n|---|---|---:|---:|---:|")
    base = None
    for arch, precision, batch in CONFIGS + (BF16 if args.bf16 else []):
        ips = images_per_second(arch, precision, batch, args.steps, args.warmup)
        base = base or ips
        print(f"| {arch} | {precision} | {batch} | {ips:.1f} | {ips / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
