#!/usr/bin/env python
"""One Jacobian subspace-iteration step (k JVPs + k VJPs), decoder-only split vs the full U-Net.

Both variants compute the same thing, J v and J^T u for J = d eps / d h at one (x_t, t):

* split: ``decoder_operators`` on ``h -> decode(h, skips, temb)`` (what localdiff does: the encoder runs once
  per image, the VJP closure is built once per discovery and reused by every iteration);
* full: the same torch.func calls on ``h -> U-Net(x_t, t)`` with the mid-block output replaced by h, rebuilt
  every step, as a straightforward implementation through the whole network would be.

Models have random weights built from diffusers configs (no download): google/ddpm-ema-celebahq-256's
architecture and a 64 px model. Usage::

    python benchmarks/bench_subspace.py                 # CPU, both models (the 256 px one takes minutes)
    python benchmarks/bench_subspace.py --device cuda
    python benchmarks/bench_subspace.py --models 64     # only the 64 px model
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import CELEBAHQ_256, PIXEL_64, environment, random_model, timeit  # noqa: E402

from localdiff.jacobian import decoder_operators  # noqa: E402


def full_unet_function(model, x, t):
    """h -> eps through the whole U-Net (encoder recomputed), h substituted for the mid-block output."""

    def f(h):
        enc = model.encode(x, t)
        return model.decode(h, enc.skips, enc.temb)

    return f


def bench(name: str, config: dict, k: int, device: str, dtype: torch.dtype, repeat: int) -> dict:
    model = random_model(config, device=device, dtype=dtype)
    r = model.resolution
    x = torch.randn(1, 3, r, r, generator=torch.Generator().manual_seed(0)).to(device, dtype)
    t = 500
    with torch.no_grad():
        enc = model.encode(x, t)
    d = enc.h.numel()
    v = torch.randn(k, d, device=device, dtype=dtype)

    def decode(h):
        return model.decode(h, enc.skips, enc.temb)

    build = timeit(lambda: decoder_operators(decode, enc.h), repeat=repeat, device=device)
    jvp, vjp, out = decoder_operators(decode, enc.h)
    u = torch.randn(k, out.numel(), device=device, dtype=dtype)

    def split_step():
        jvp(v)
        vjp(u)

    full = full_unet_function(model, x, t)

    def full_step():
        fj, fv, _ = decoder_operators(full, enc.h)
        fj(v)
        fv(u)

    with torch.no_grad():
        decode_pass = timeit(lambda: decode(enc.h), repeat=repeat, device=device)
        forward_pass = timeit(lambda: model.unet(x, t), repeat=repeat, device=device)
    split = timeit(split_step, repeat=repeat, device=device)
    fullt = timeit(full_step, repeat=repeat, device=device)
    params = sum(p.numel() for p in model.unet.parameters()) / 1e6
    return dict(name=name, params=params, d=d, forward=forward_pass, decode=decode_pass, build=build,
                split=split, full=fullt, ratio=fullt / split, passes=split / decode_pass)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--models", nargs="+", default=["64", "256"], choices=["64", "256"])
    args = p.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    print(environment(args.device), f"dtype {args.dtype}, k={args.k}")
    print(f"{'model':<22}{'params':>8}{'dim h':>8}{'forward':>9}{'decode':>9}{'split step':>12}"
          f"{'full step':>11}{'full/split':>11}{'step/decode':>12}")
    configs = {"64": ("64 px (random)", PIXEL_64), "256": ("celebahq-256 (random)", CELEBAHQ_256)}
    for key in args.models:
        name, config = configs[key]
        r = bench(name, config, args.k, args.device, dtype, args.repeat)
        print(f"{r['name']:<22}{r['params']:>7.1f}M{r['d']:>8}{r['forward']:>8.3f}s{r['decode']:>8.3f}s"
              f"{r['split']:>11.3f}s{r['full']:>10.3f}s{r['ratio']:>10.2f}x{r['passes']:>11.1f}x", flush=True)
    print("split step = k vmapped JVPs + k vmapped VJPs through the decoder (VJP closure built once; building it "
          "costs about one decoder forward). step/decode = split step in decoder forward passes (ideal: 2k).")


if __name__ == "__main__":
    main()
