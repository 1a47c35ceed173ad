#!/usr/bin/env python
"""Memory of the celebahq-256 architecture (google/ddpm-ema-celebahq-256, random weights: no download), measured
on the CPU, for docs/gpu.md.

Each measurement runs in a fresh process: build the model, reset the process's peak resident memory
(``/proc/self/clear_refs``), run one operation, read the new peak (``VmHWM``). The difference to the resident
memory before the operation is what the operation needed on top of the weights: its activations and
temporaries. A GPU needs about the same for the same tensors (plus the CUDA context and the caching allocator's
slack), so this is the budget to plan for.

* ``forward B``: one U-Net forward pass on B images (what inversion and editing do at every DDIM step, batched);
* ``jvp C``: C Jacobian-vector products h → ε through the decoder at once (discovery with ``chunk_size`` C);
* ``vjp C``: C vector-Jacobian products through the reusable VJP closure (built once per discovery; its saved
  activations are in the numbers).

    python benchmarks/bench_memory.py --forward 1 2 4 8 --chunks 1 2 4
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(kind: str, n: int, dtype_name: str) -> None:
    import torch

    from common import CELEBAHQ_256, random_model
    from localdiff.jacobian import decoder_operators

    torch.set_num_threads(2)
    dtype = getattr(torch, dtype_name)
    model = random_model(CELEBAHQ_256, dtype=dtype)
    params = sum(p.numel() * p.element_size() for p in model.unet.parameters())
    x = torch.randn(n if kind == "forward" else 1, 3, 256, 256, dtype=dtype)
    if kind != "forward":
        with torch.no_grad():
            enc = model.encode(x, 500)
        jvp, vjp, out = decoder_operators(lambda h: model.decode(h, enc.skips, enc.temb), enc.h, chunk_size=n)
    Path("/proc/self/clear_refs").write_text("5")  # peak resident memory := current
    before = _status_kib("VmRSS")
    if kind == "forward":
        with torch.inference_mode():
            model.eps(x, 500)
    elif kind == "jvp":
        jvp(torch.randn(n, enc.h.numel(), dtype=dtype))
    else:
        vjp(torch.randn(n, out.numel(), dtype=dtype))
    peak = _status_kib("VmHWM")
    print(json.dumps(dict(kind=kind, n=n, dtype=dtype_name, weights_mib=params / 2**20,
                          extra_mib=(peak - before) / 1024, rss_before_mib=before / 1024)))


def measure(kind: str, n: int, dtype: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", kind, str(n), dtype], capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--forward", type=int, nargs="*", default=[1, 2, 4, 8], help="batch sizes (default: 1 2 4 8)")
    p.add_argument("--chunks", type=int, nargs="*", default=[1, 2, 4], help="JVP/VJP chunk sizes (default: 1 2 4)")
    p.add_argument("--dtype", default="float32", help="(default: float32; bfloat16 halves the weights)")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child[0], int(args.child[1]), args.child[2])
        return
    from common import environment

    print(environment())
    rows = [measure("forward", b, args.dtype) for b in args.forward]
    rows += [measure(kind, c, args.dtype) for c in args.chunks for kind in ("jvp", "vjp")]
    print(f"\ncelebahq-256 architecture, {args.dtype}, weights {rows[0]['weights_mib']:.0f} MiB\n")
    print("| operation | batch / chunk | extra memory (MiB) | per image / vector (MiB) |")
    print("|---|---:|---:|---:|")
    for r in rows:
        print(f"| {r['kind']} | {r['n']} | {r['extra_mib']:.0f} | {r['extra_mib'] / r['n']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
