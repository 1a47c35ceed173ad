"""``localdiff demo``: the whole method on the embedded default model, offline, in well under two minutes.

It takes a shipped example face, discovers local directions for the eyes, nose and mouth at once, writes the
directions file, a grid and one sweep GIF per region, transfers the directions to other shipped faces and prints
the locality / visibility / preservation of what it made.
"""

from __future__ import annotations

import csv
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from localdiff.config import DiscoveryConfig
from localdiff.editor import LocalEditor
from localdiff.evaluation import EditScore, mean_std, score_edit
from localdiff.images import save_image, to_pil
from localdiff.masks import load_mask, template_path

log = logging.getLogger("localdiff")

EXAMPLES_DIR = Path(__file__).parent / "examples"
DEMO_REGIONS = ("eyes", "nose", "mouth")


@dataclass
class DemoSettings:
    """What the demo runs with (chosen by measurement on evaluation faces; see docs/defaults.md)."""

    regions: tuple[str, ...] = DEMO_REGIONS
    strength: float = 0.5  # v2: locality flat from 0.25 to 1, the inside change 0.065 -> 0.099 from 0.25 to 0.5
    num_steps: int = 20  # the CLI's default --steps for the demo
    columns: int = 5  # strengths in the grid, which are also the sweep frames
    transfer_faces: int = 2
    # one local direction per region: the grid's rows are the three sweeps (keeps the demo near a minute on 2 cores)
    discover: DiscoveryConfig = field(default_factory=lambda: DiscoveryConfig.fast(individual_rank=1))


def example_faces() -> list[Path]:
    return sorted(EXAMPLES_DIR.glob("face_*.png"))


def run_demo(editor: LocalEditor, out_dir: Path, settings: DemoSettings | None = None) -> list[dict]:
    """Run the demo into ``out_dir``; returns the metric rows it printed."""
    from localdiff.viz import edit_grid, save_gif, strip

    s = settings or DemoSettings()
    out_dir.mkdir(parents=True, exist_ok=True)
    faces = example_faces()
    if len(faces) < 1 + s.transfer_faces:
        raise FileNotFoundError(f"the shipped example faces are missing from {EXAMPLES_DIR}")
    res = editor.model.resolution
    masks = {r: load_mask(template_path(r), res, name=r) for r in s.regions}
    source = editor.prepare(faces[0], name=faces[0].name)
    t0 = time.perf_counter()

    log.info("discovering local directions for %s on %s ...", ", ".join(s.regions), faces[0].name)
    dirs = editor.discover(source, masks, s.discover)
    dirs.save(out_dir / "directions.safetensors")
    grid, frames = edit_grid(editor, source, dirs, s.strength, s.columns)
    save_image(grid, out_dir / "grid.png")
    t_discover = time.perf_counter() - t0

    firsts = [dirs[r][0] for r in s.regions]
    for d in firsts:  # the grid's rows are the sweeps: strengths -s .. +s
        save_gif(frames[d.name], out_dir / f"sweep_{d.region}.gif")
        save_image(strip(frames[d.name], masks[d.region]), out_dir / f"sweep_{d.region}.png")

    rows: list[dict] = []
    scores: dict[tuple[str, str], list[EditScore]] = {}
    panel = []
    for j, face in enumerate(faces[: 1 + s.transfer_faces]):
        image = source if j == 0 else editor.prepare(face, name=face.name)
        recon = editor.invert(image).reconstruction
        if j == 0:  # already rendered: the last column of the grid is strength +s
            edited = torch.stack([frames[d.name][-1] for d in firsts])
        else:
            edited = editor.render(image, [[(d, s.strength)] for d in firsts])
        panel.append(torch.cat([image, recon.cpu(), edited.cpu()]))
        for d, e in zip(firsts, edited):
            others = {n: m for n, m in masks.items() if n != d.region}
            kind = "source" if j == 0 else "transfer"
            scores.setdefault((d.region, kind), []).append(score_edit(e, recon[0], masks[d.region], others))
    _save_panel(panel, masks, s.regions, out_dir / "transfer.png")
    elapsed = time.perf_counter() - t0

    for (region, kind), sc in scores.items():
        loc, loc_sd = mean_std([x.locality for x in sc])
        ins, ins_sd = mean_std([x.inside_change for x in sc])
        psnr, psnr_sd = mean_std([x.outside_psnr for x in sc])
        rows.append(dict(region=region, images=kind, n=len(sc), locality=loc, locality_std=loc_sd,
                         inside_change=ins, inside_change_std=ins_sd, outside_psnr=psnr, outside_psnr_std=psnr_sd))
    with open(out_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(format_table(rows))
    print(f"discovery + grid {t_discover:.1f} s, everything {elapsed:.1f} s; outputs in {out_dir}")
    return rows


def format_table(rows: list[dict]) -> str:
    lines = [f"{'region':<8}{'images':<10}{'n':>3}  {'locality':>13}  {'inside |d|':>13}  {'outside PSNR':>14}"]
    for r in rows:
        lines.append(
            f"{r['region']:<8}{r['images']:<10}{r['n']:>3}  {r['locality']:>6.3f} ± {r['locality_std']:<4.2f}"
            f"  {r['inside_change']:>6.3f} ± {r['inside_change_std']:<4.3f}"
            f"  {r['outside_psnr']:>6.1f} ± {r['outside_psnr_std']:<4.1f} dB"
        )
    return "\n".join(lines)


def _save_panel(rows: list[torch.Tensor], masks: dict, regions, path: Path) -> None:
    """Rows: faces; columns: input, reconstruction, then the first direction of each region."""
    from localdiff.viz import outline, tile

    ims = [outline(im, masks[regions[j - 2]]) if j >= 2 else im
           for row in rows for j, im in enumerate(to_pil(row))]
    save_image(tile(ims, rows[0].shape[0]), path)
