"""The ``localdiff`` command line: discover, edit, sweep, info.

Every user mistake ends with one line on stderr (``localdiff: error: ...``), exit status 2 and no output file:
outputs are checked before any work starts and written through a temporary file that is renamed into place.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Sequence

import torch

from localdiff.demo import DemoSettings
from localdiff.directions import Directions
from localdiff.config import DISCOVERY_METHODS, EDIT_RANGE, EDIT_SCHEDULE, NUM_INFERENCE_STEPS, DiscoveryConfig
from localdiff.editor import LocalEditor
from localdiff.errors import LocalDiffError
from localdiff.images import check_output_path, open_image, save_image, to_pil
from localdiff.masks import load_mask, template_path
from localdiff.model import default_model_path, load_model, quiet_diffusers
from localdiff.reference import FIT_METHODS, strength_span

log = logging.getLogger("localdiff")

GRID_STRENGTH = EDIT_RANGE
GRID_COLUMNS = 5


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors in one line with exit status 2."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"localdiff: error: {message} (see {self.prog} --help)\n")


def _finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _share(text: str) -> float:
    value = _finite_float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a share in [0, 1)")
    return value


def _timestep(text: str) -> int | float:
    """A timestep: a whole number is a training timestep t (e.g. 700), a number with a point a fraction of T
    (e.g. 0.7). The model's range is checked once it is loaded."""
    try:
        return int(text)
    except ValueError:
        pass
    value = _finite_float(text)
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is neither a fraction of T in (0, 1] nor a whole timestep t")
    return value


def _angle(text: str) -> float:
    value = _finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is not an angle >= 0 (degrees)")
    return value


def _whole_number(text: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < minimum:
        raise argparse.ArgumentTypeError(f"{text} must be at least {minimum}")
    return value


def _positive_int(text: str) -> int:
    return _whole_number(text, 1)


def _joint_rank(text: str) -> int | str | None:
    """A JIVE joint rank: a whole number >= 0, ``auto`` (AJIVE's bounds) or ``permutation`` (Lock's test)."""
    if text in ("auto", "permutation"):
        return None if text == "auto" else text
    return _whole_number(text, 0)


def _rank_or_auto_positive(text: str) -> int | None:
    """A count of directions: a whole number >= 1, or ``auto``."""
    return None if text == "auto" else _whole_number(text, 1)


STEPS_WHY = "50 steps reconstruct faces at about 32 dB; the demo takes 20 (about 24 dB) to run in under a minute"


def _model_options(p: argparse.ArgumentParser, steps_default: int | None, steps_note: str = "as discovered",
                   why: str = "") -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", metavar="M", help="diffusers model folder or hub id (default: the embedded model)")
    g.add_argument("--device", default="cpu", help="torch device, e.g. cpu, cuda, cuda:1 (default: cpu)")
    g.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="(default: float32)")
    g.add_argument("--steps", type=_positive_int, default=steps_default, metavar="N",
                   help="DDIM steps for inversion and regeneration"
                   + (f" (default: {steps_default}{'; ' + why if why else ''})" if steps_default
                      else f" (default: {steps_note})"))
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars or notes")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="localdiff", description="Unsupervised local editing with pretrained diffusion models.")
    from localdiff import __version__

    parser.add_argument("--version", action="version", version=f"localdiff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("discover", help="find local edit directions for regions of an image (or a folder)")
    p.add_argument("image", nargs="?", help="input image (resized to the model's resolution)")
    p.add_argument("--mask", action="append", default=[], metavar="NAME=MASK.png",
                   help="a region: its name and a mask image (white = region), or the name of a template of the "
                        "default model (eyes, nose, mouth, hair); repeat for several regions")
    p.add_argument("--auto-masks", metavar="PARTS",
                   help="regions found on the face by MediaPipe's face mesh, e.g. eyes,mouth (parts: eyes, brows, "
                        "nose, mouth, face; needs pip install -e \".[masks]\")")
    p.add_argument("--auto-regions", type=_positive_int, metavar="N",
                   help="instead of masks: N regions found from the model itself (pixels grouped by how its top "
                        "h-space directions move them; any model, any image), named region1..regionN")
    p.add_argument("--regions-out", metavar="DIR", help="with --auto-regions: also write the regions as DIR/<name>.png")
    p.add_argument("--reference", metavar="REF", help="instead of unsupervised directions: one direction per region "
                   "that moves the image's region towards this image's (e.g. a smile from another face)")
    p.add_argument("--reference-fit", choices=FIT_METHODS,
                   help="with --reference: 'measured' fits the edit to renders of the image (about 3 x (basis + 1) "
                        "renders); 'projected' projects the h difference onto the region's subspace (no renders, "
                        "but on the embedded model it barely moves the region) (default: measured)")
    p.add_argument("--min-locality", type=_share, metavar="L",
                   help="with --reference: keep only edits with at least this share of their squared change inside "
                        "the region (e.g. 0.6; measured on the fit's renders): more local, but the region moves less "
                        "far towards the reference (default: no constraint)")
    p.add_argument("--out", metavar="DIRS.safetensors", help="where to write the directions")
    _batch_options(p, "discover")
    p.add_argument("--grid", metavar="GRID.png", help="also write a grid of edits (rows: directions)")
    p.add_argument("--grid-strength", type=_finite_float, metavar="S",
                   help=f"grid columns run from -S to +S (default: {GRID_STRENGTH}; with --reference, the largest natural "
                        "strength if that is more)")
    _discovery_options(p)
    _model_options(p, NUM_INFERENCE_STEPS, why=STEPS_WHY)

    p = sub.add_parser("edit", help="apply one or more directions to an image, or to a folder of images")
    p.add_argument("image", nargs="?", help="the image to edit (PNG/JPEG; resized to the model's resolution)")
    p.add_argument("--directions", required=True, metavar="DIRS.safetensors",
                   help="a directions file written by 'localdiff discover'")
    p.add_argument("--direction", action="append", required=True, metavar="NAME[:INDEX]",
                   help="a direction, e.g. mouth or mouth:1 or joint:0; repeat to compose edits")
    p.add_argument("--strength", action="append", type=_finite_float, required=True, metavar="S",
                   help="one strength per --direction, or one for all (units of |h|)")
    p.add_argument("--out", metavar="OUT.png", help="where to write the edited image (PNG)")
    _batch_options(p, "edit")
    _edit_options(p)

    p = sub.add_parser("sweep", help="animate one direction from -S to +S (GIF plus a PNG strip)")
    p.add_argument("image", help="the image to edit (PNG/JPEG; resized to the model's resolution)")
    p.add_argument("--directions", required=True, metavar="DIRS.safetensors",
                   help="a directions file written by 'localdiff discover'")
    p.add_argument("--direction", required=True, metavar="NAME[:INDEX]", help="the direction, e.g. mouth or mouth:1")
    p.add_argument("--out", required=True, metavar="SWEEP.gif", help="the GIF; the strip goes beside it as .png")
    p.add_argument("--max-strength", type=_finite_float, metavar="S",
                   help=f"sweep from -S to +S (default: {GRID_STRENGTH}; for directions towards a reference, the "
                        "largest natural strength if that is more)")
    p.add_argument("--frames", type=_positive_int, default=9, help="number of strengths (default: 9)")
    _edit_options(p)

    p = sub.add_parser("masks", help="face-part masks of a face photo (MediaPipe face mesh), one PNG per part")
    p.add_argument("image", help="a face photo (small images are upsampled for detection)")
    p.add_argument("--out-dir", required=True, metavar="DIR", help="writes DIR/<part>.png at the image's size")
    p.add_argument("--parts", default="eyes,brows,nose,mouth,face", metavar="PARTS",
                   help="comma-separated parts (default: eyes,brows,nose,mouth,face)")
    p.add_argument("--quiet", action="store_true", help="only errors")

    p = sub.add_parser("info", help="print what a directions file holds")
    p.add_argument("directions", metavar="DIRS.safetensors")

    p = sub.add_parser("sample", help="draw images from the model (deterministic DDIM from seeded noise)")
    p.add_argument("-n", type=_positive_int, default=16, help="number of images (default: 16)")
    p.add_argument("--out", metavar="GRID.png", help="write the images as one grid, enlarged for viewing")
    p.add_argument("--out-dir", metavar="DIR",
                   help="write each image as DIR/seed<S>_<i>.png at the model's resolution")
    p.add_argument("--seed", type=int, default=0, help="(default: 0)")
    _model_options(p, NUM_INFERENCE_STEPS)

    p = sub.add_parser("demo", help="run the whole method on the embedded default model and shipped faces")
    p.add_argument("--out-dir", default="localdiff-demo", metavar="DIR", help="(default: ./localdiff-demo)")
    _model_options(p, DemoSettings.num_steps)

    from localdiff.baselines import METHODS

    p = sub.add_parser("eval", help="locality and transfer of localdiff vs the baselines, at matched edit visibility")
    p.add_argument("--out-dir", default="localdiff-eval", metavar="DIR", help="(default: ./localdiff-eval)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--faces", type=_positive_int, default=None, metavar="N",
                     help="evaluation faces from the face GAN's evaluation seeds (default: 32; --quick: 2)")
    src.add_argument("--images", metavar="DIR", help="evaluate on the PNG/JPEG images in DIR instead")
    p.add_argument("--mask", action="append", metavar="NAME[=MASK.png]",
                   help="regions: template names or NAME=MASK.png (default: the eyes, nose and mouth templates)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), metavar="M",
                   help=f"methods to compare (default: all of {', '.join(METHODS)}); a variant is "
                        f"NAME:key=value,... e.g. jive:k=16,joint_rank=permutation")
    p.add_argument("--target-change", type=_finite_float, default=None, metavar="D",
                   help="matched visibility: mean |change| inside the region, images in [0, 1] (default: 0.08)")
    p.add_argument("--schedule", choices=["all", "window", "single"], default=EDIT_SCHEDULE,
                   help=f"h-space edit schedule (default: {EDIT_SCHEDULE})")
    p.add_argument("--no-transfer", action="store_true", help="skip the transfer evaluation")
    p.add_argument("--joint-rank", type=_joint_rank, default=None, metavar="R",
                   help="JIVE joint rank for the jive method: a number, auto (AJIVE's bounds) or permutation "
                        "(default: auto)")
    p.epilog = ("Finished faces are recorded in OUT_DIR/progress/ as the run goes: run the same command again after "
                "an interruption and it goes on from there.")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 2 faces, 10 steps, short iterations, 3 strengths (numbers are not meaningful)")
    _model_options(p, None, f"{DemoSettings.num_steps}; --quick: 10")

    p = sub.add_parser("serve", help="the web UI (Gradio): paint regions, discover, slide, compare, transfer")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=_positive_int, default=7860, help="(default: 7860)")
    _model_options(p, NUM_INFERENCE_STEPS)
    return parser


def _discovery_options(p: argparse.ArgumentParser) -> None:
    d = DiscoveryConfig()
    g = p.add_argument_group("discovery")
    g.add_argument("--method", choices=DISCOVERY_METHODS, default=d.method,
                   help="how the regions' Jacobian subspaces become local directions: jive (AJIVE split, the "
                        "paper), masked (top singular vectors), nullspace (projected off the outside's), ratio "
                        f"(most in-region per out-of-region change) (default: {d.method})")
    g.add_argument("--timestep", type=_timestep, default=d.timestep, metavar="T",
                   help="discovery timestep: a fraction of T (0.7) or a whole training timestep t (700) "
                        f"(default: {d.timestep})")
    g.add_argument("--k", type=_positive_int, default=d.k, help=f"singular vectors per region (default: {d.k})")
    g.add_argument("--oversample", type=lambda t: _whole_number(t, 0), default=d.oversample, metavar="P",
                   help=f"extra vectors the subspace iteration carries (default: {d.oversample})")
    g.add_argument("--joint-rank", type=_joint_rank, default=d.joint_rank, metavar="R",
                   help="jive: joint rank, auto (AJIVE's bounds) or permutation (Lock et al.'s test and "
                        "alternation) (default: auto)")
    g.add_argument("--individual-rank", type=_rank_or_auto_positive, default=_FOLLOW_K, metavar="R",
                   help=f"local directions per region, or auto (jive: AJIVE's rule) (default: {d.individual_rank}, "
                        f"at most k)")
    g.add_argument("--rest-block", action="store_true",
                   help="jive: add the rest of the image as a block, so that global modes have a block to be "
                        "joint with")
    g.add_argument("--track", action="store_true",
                   help="also follow the directions to every DDIM step (per-step directions; edits then need the "
                        "same --steps)")
    g.add_argument("--seed", type=int, default=d.seed, help=f"start of the subspace iteration (default: {d.seed})")
    g.add_argument("--max-iter", type=_positive_int, default=d.max_iter, metavar="N",
                   help=f"subspace iteration limit (default: {d.max_iter})")
    g.add_argument("--tol-deg", type=_angle, default=d.tol_deg, metavar="DEG",
                   help=f"stop when the subspaces are estimated this close to converged (default: {d.tol_deg})")
    g.add_argument("--chunk-size", type=_positive_int, default=d.chunk_size, metavar="N",
                   help="Jacobian-vector products per batch (default: all at once; lower it when a large model "
                        "runs out of GPU memory, see docs/gpu.md)")


_FOLLOW_K = object()  # --individual-rank not given: DiscoveryConfig.replace keeps the default rank, at most --k


def _discovery_config(args) -> DiscoveryConfig:
    rank = {} if args.individual_rank is _FOLLOW_K else dict(individual_rank=args.individual_rank)
    return DiscoveryConfig().replace(method=args.method, timestep=args.timestep, k=args.k, oversample=args.oversample,
                                     joint_rank=args.joint_rank, rest_block=args.rest_block, track=args.track,
                                     seed=args.seed, max_iter=args.max_iter, tol_deg=args.tol_deg,
                                     chunk_size=args.chunk_size, **rank)


def _batch_options(p: argparse.ArgumentParser, command: str) -> None:
    g = p.add_argument_group("a folder of images (also under accelerate launch, see docs/batch.md)")
    g.add_argument("--images", metavar="DIR", help=f"{command} every PNG/JPEG image in DIR (sorted) instead of one image")
    g.add_argument("--out-dir", metavar="OUT",
                   help="with --images: writes OUT/<name>." + ("png" if command == "edit" else "safetensors")
                        + " per image and OUT/results.csv; images already done are skipped")
    if command == "edit":
        g.add_argument("--batch-size", type=_positive_int, default=8, metavar="B",
                       help="with --images: images per pass through the U-Net (default: 8)")
    else:
        g.add_argument("--mean", action="store_true",
                       help="with --images: one set of directions discovered jointly over all the images (their "
                            "masked Jacobians stacked), written to --out")


def _edit_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--schedule", choices=["all", "window", "single"], default=EDIT_SCHEDULE,
                   help="DDIM steps that get the edit: all, window (T down to the edit timestep) or single "
                        f"(default: {EDIT_SCHEDULE})")
    p.add_argument("--edit-timestep", type=_timestep, metavar="T",
                   help="where window/single edits end: a fraction of T or a whole timestep t (default: the "
                        "directions' discovery timestep)")
    p.add_argument("--asymmetric", action="store_true", help="Asyrp's asymmetric step (edited eps for x0 only)")
    p.add_argument("--allow-foreign-model", action="store_true",
                   help="apply directions discovered with a different model")
    _model_options(p, None)


# ---------------------------------------------------------------------- commands
def _device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise LocalDiffError(f"--device {name} is not a torch device (try cpu or cuda)") from None
    if dev.type == "meta":
        raise LocalDiffError("--device meta holds shapes but no numbers, so nothing can be computed on it; use cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise LocalDiffError(f"--device {name}: no CUDA GPU is available here; use --device cpu")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise LocalDiffError(f"--device {name}: MPS is not available here; use --device cpu")
    try:
        torch.zeros(1, device=dev)
    except (RuntimeError, AssertionError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LocalDiffError(f"--device {name} cannot be used here ({first}); use --device cpu") from None
    return dev


def _editor(args, num_steps: int, device: str | None = None) -> LocalEditor:
    source = args.model or default_model_path()
    if source is None:
        raise LocalDiffError("no --model given and no embedded default model is installed; pass --model PATH_OR_HUB_ID")
    device, dtype = _device(device or args.device), getattr(torch, args.dtype)
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("note: float16 on the CPU is about 20 times slower than float32 (the CPU has no fast float16 "
                    "kernels); use --dtype float32 here, float16 on a GPU")
    model = load_model(source, device=device, torch_dtype=dtype)
    return LocalEditor(model, num_inference_steps=num_steps, progress=not args.quiet)


def _parse_masks(specs: Sequence[str]) -> tuple[dict[str, Path], set[str]]:
    """``NAME=MASK.png`` (a user mask) or ``NAME`` (a shipped template), in the order given."""
    masks: dict[str, Path] = {}
    templates: set[str] = set()
    for spec in specs:
        name, sep, path = spec.partition("=")
        if (sep and not path) or not name:
            raise LocalDiffError(
                f"--mask {spec!r}: write it as NAME=MASK.png (e.g. --mask mouth=mouth.png) or a template name"
            )
        if name in masks:
            raise LocalDiffError(f"region name {name!r} is given twice; each --mask needs its own name")
        if sep:
            open_image(path, f"mask {name!r}")  # exists and is an image
            masks[name] = Path(path)
        else:
            masks[name] = template_path(name)
            templates.add(name)
    return masks, templates


def _check_regions(args) -> None:
    given = sum(map(bool, (args.mask, args.auto_masks, args.auto_regions)))
    if given == 0:
        raise LocalDiffError("give the regions: --mask NAME=MASK.png (or a template name), --auto-masks eyes,mouth or "
                             "--auto-regions N")
    if args.auto_regions and given > 1:
        raise LocalDiffError("--auto-regions divides the whole image; give it without --mask or --auto-masks")
    if args.regions_out and not args.auto_regions:
        raise LocalDiffError("--regions-out writes the regions of --auto-regions; give --auto-regions N too")
    if (args.reference_fit or args.min_locality is not None) and not args.reference:
        raise LocalDiffError(f"{'--reference-fit' if args.reference_fit else '--min-locality'} is about directions "
                             "towards a reference; give --reference REF too")
    if args.min_locality is not None and args.reference_fit == "projected":
        raise LocalDiffError("--min-locality constrains the measured fit; drop it or --reference-fit projected")


def _given_masks(args, editor: LocalEditor, templates: set[str], masks: dict) -> dict:
    """The --mask regions: templates loaded at the model's resolution, user masks as their paths."""
    if templates and args.model:
        log.warning("note: mask templates fit the default model's aligned 64x64 faces; check them on your images")
    res = editor.model.resolution
    return {n: load_mask(p, res, name=n) if n in templates else p for n, p in masks.items()}


def _face_parts(args, image, masks: dict) -> dict:
    """The --auto-masks regions found on ``image`` (none without --auto-masks)."""
    if not args.auto_masks:
        return {}
    from localdiff.facemasks import face_part_masks, parse_parts

    parts = parse_parts(args.auto_masks)
    twice = [n for n in parts if n in masks]
    if twice:
        raise LocalDiffError(f"region {twice[0]!r} is given by --mask and --auto-masks; give it once")
    found = face_part_masks(image, parts)
    log.info("found %s on the face", ", ".join(f"{n} ({int(m.sum())} px)" for n, m in found.items()))
    return found


def cmd_discover(args) -> int:
    from localdiff.viz import edit_grid

    _check_regions(args)
    if args.images:
        return _discover_folder(args)
    if args.image is None:
        raise LocalDiffError("give the IMAGE to discover on, or --images DIR (with --out-dir OUT) for a folder")
    if args.out_dir or args.mean:
        raise LocalDiffError(f"{'--out-dir' if args.out_dir else '--mean'} goes with --images DIR; for one image "
                             f"give --out DIRS.safetensors")
    if args.out is None:
        raise LocalDiffError("give --out DIRS.safetensors: where to write the directions")
    out = check_output_path(args.out, (".safetensors",), "--out")
    grid = check_output_path(args.grid, (".png",), "--grid") if args.grid else None
    image = open_image(args.image)
    masks, templates = _parse_masks(args.mask)
    found = _face_parts(args, image, masks)
    editor = _editor(args, args.steps)
    cfg = _discovery_config(args)
    masks = _given_masks(args, editor, templates, masks)
    masks.update(found)
    if args.auto_regions:
        from localdiff.masks import save_masks
        from localdiff.regions import auto_regions

        image = editor.prepare(image)
        masks = auto_regions(editor, image, args.auto_regions, timestep=args.timestep, seed=args.seed)
        log.info("found %s", ", ".join(f"{n} ({int(m.sum())} px)" for n, m in masks.items()))
        if args.regions_out:
            save_masks(masks, Path(args.regions_out))
    region_masks = editor.prepare_masks(masks, image)
    image = editor.prepare(image)
    if args.reference:
        reference = editor.prepare(open_image(args.reference, "reference"))
        dirs = editor.reference_directions(image, reference, region_masks, cfg, fit=args.reference_fit or FIT_METHODS[0],
                                           min_locality=args.min_locality, reference_name=Path(args.reference).name)
        dirs.save(out)
        log.info("wrote %s; to move each region to the reference's, edit with: %s", out,
                 ", ".join(f"--direction {r}:0 --strength {s:.3f}" for r, s in dirs.meta["reference_strength"].items()))
    else:
        dirs = editor.discover(image, region_masks, cfg)
        dirs.save(out)  # first: interrupting the grid keeps the finished discovery
        log.info("wrote %s (%s; %s)", out, ", ".join(f"{r}: {len(dirs.individual[r])}" for r in dirs.regions),
                 _locality_note(dirs))
    if grid is not None:
        span = args.grid_strength if args.grid_strength is not None else strength_span(dirs.meta, GRID_STRENGTH)
        save_image(edit_grid(editor, image, dirs, span, GRID_COLUMNS)[0], grid)
        log.info("wrote %s", grid)
    return 0


def _locality_note(dirs: Directions) -> str:
    return "eps-level locality of each region's first direction: " + ", ".join(
        f"{r} {dirs.meta['eps_locality'][r][0]:.2f}" for r in dirs.regions)


def _discover_folder(args) -> int:
    """discover --images DIR: one directions file per image (--out-dir), or one jointly over all (--mean --out)."""
    from localdiff.batch import Workers, list_images, run_folder, summary

    if args.image:
        raise LocalDiffError("give one IMAGE or --images DIR, not both")
    if args.auto_regions or args.reference:
        raise LocalDiffError(f"{'--auto-regions' if args.auto_regions else '--reference'} works on one image; give "
                             f"--mask or --auto-masks with --images")
    if args.grid:
        raise LocalDiffError("--grid draws one image's edits; leave it out with --images (edit the folder instead)")
    images = list_images(args.images)
    workers = Workers()
    if args.mean:
        if args.out_dir:
            raise LocalDiffError("--mean writes one directions file: give --out DIRS.safetensors, not --out-dir")
        if args.out is None:
            raise LocalDiffError("--mean needs --out DIRS.safetensors: where to write the joint directions")
        if args.auto_masks:
            raise LocalDiffError("--mean uses the same regions on every image: give --mask (templates or mask files)")
        if workers.count > 1:
            raise LocalDiffError("--mean is one joint computation; run it in one process (without accelerate launch)")
        out = check_output_path(args.out, (".safetensors",), "--out")
    else:
        if args.out:
            raise LocalDiffError("with --images each image's directions go to --out-dir OUT (OUT/<name>.safetensors); "
                                 "--out is for one image or --mean")
        if not args.out_dir:
            raise LocalDiffError("give --out-dir OUT: where to write one directions file per image")
        out_dir = _check_out_dir(args.out_dir, f"{images[0].stem}.safetensors")
    masks, templates = _parse_masks(args.mask)
    editor = _editor(args, args.steps, device=workers.device(args.device))
    editor.progress = False
    cfg = _discovery_config(args)
    given = _given_masks(args, editor, templates, masks)
    _resize_note(editor, workers)
    if args.mean:
        return _discover_mean(args, editor, images, given, cfg, out)

    def job(paths: list[Path]) -> list:
        results = []
        for path in paths:
            try:
                image = open_image(path)
                region_masks = editor.prepare_masks({**given, **_face_parts(args, image, given)}, image)
                dirs = editor.discover(_folder_image(editor, image, path), region_masks, cfg)
                results.append(dirs.save)
            except LocalDiffError as exc:
                results.append(exc)
        return results

    rows = run_folder(images, out_dir, ".safetensors", job, batch_size=1, workers=workers,
                      progress=not args.quiet, desc="discover")
    return _folder_report(rows, images, out_dir, summary, workers)


def _discover_mean(args, editor: LocalEditor, images: list[Path], masks: dict, cfg, out: Path) -> int:
    loaded, failed = [], 0
    for path in images:
        try:
            loaded.append(_folder_image(editor, open_image(path), path))
        except LocalDiffError as exc:
            print(f"localdiff: {exc}", file=sys.stderr)
            failed += 1
    if not loaded:
        raise LocalDiffError(f"none of the {len(images)} images in {args.images} could be read")
    region_masks = editor.prepare_masks(masks, loaded[0])
    editor.progress = not args.quiet
    log.info("discovering jointly over %d images ...", len(loaded))
    dirs = editor.discover(loaded if len(loaded) > 1 else loaded[0], region_masks, cfg)
    dirs.save(out)
    log.info("wrote %s (joint over %d images; %s)", out, len(loaded), _locality_note(dirs))
    return 1 if failed else 0


def _folder_image(editor: LocalEditor, image, path: Path) -> torch.Tensor:
    """An image of a folder at the model's resolution, without a resize note each (the run says it once)."""
    from localdiff.images import load_image

    return load_image(image, editor.model.resolution, name=str(path), resize_note=False)


def _resize_note(editor: LocalEditor, workers) -> None:
    if workers.is_main:
        r = editor.model.resolution
        log.info("note: images that are not %dx%d are centre-cropped and resized to it", r, r)


def _folder_report(rows, images, out_dir: Path, summary, workers) -> int:
    done, failed, missing = summary(rows, images)
    if workers.is_main:
        log.info("%d of %d images done, %d failed%s; see %s", done, len(images), failed,
                 f", {missing} not done" if missing else "", out_dir / "results.csv")
    return 0 if failed == 0 and missing == 0 else 1


def _edit_list(args, dirs: Directions) -> list:
    specs = args.direction if isinstance(args.direction, list) else [args.direction]
    chosen = [dirs.select(s) for s in specs]
    strengths = getattr(args, "strength", None) or [0.0]
    if len(strengths) not in (1, len(chosen)):
        raise LocalDiffError(f"{len(chosen)} --direction but {len(strengths)} --strength; give one strength per "
                             f"direction or one for all")
    return list(zip(chosen, strengths * len(chosen) if len(strengths) == 1 else strengths))


def _load_for_edit(args, device: str | None = None):
    dirs = Directions.load(args.directions)
    edits = _edit_list(args, dirs)
    editor = _editor(args, args.steps or int(dirs.meta.get("num_steps", NUM_INFERENCE_STEPS)), device=device)
    dirs.check_model(editor.model.fingerprint, allow_foreign=args.allow_foreign_model)
    return dirs, edits, editor


def _render_options(args) -> dict:
    return dict(schedule=args.schedule, asymmetric=args.asymmetric, timestep=args.edit_timestep,
                allow_foreign=args.allow_foreign_model)


def cmd_edit(args) -> int:
    if args.images:
        return _edit_folder(args)
    if args.image is None:
        raise LocalDiffError("give the IMAGE to edit, or --images DIR (with --out-dir OUT) for a folder")
    if args.out_dir:
        raise LocalDiffError("--out-dir goes with --images DIR; for one image give --out OUT.png")
    if args.out is None:
        raise LocalDiffError("give --out OUT.png: where to write the edited image")
    out = check_output_path(args.out, (".png",), "--out")
    image = open_image(args.image)
    _, edits, editor = _load_for_edit(args)
    save_image(editor.edit(editor.prepare(image), edits, **_render_options(args)), out)
    log.info("wrote %s", out)
    return 0


def _edit_folder(args) -> int:
    """edit --images DIR --out-dir OUT: every image, batched through the U-Net, resumable."""
    from localdiff.batch import Workers, list_images, run_folder, summary

    if args.image:
        raise LocalDiffError("give one IMAGE or --images DIR, not both")
    if args.out:
        raise LocalDiffError("with --images the edited images go to --out-dir OUT (OUT/<name>.png); --out is for "
                             "one image")
    if not args.out_dir:
        raise LocalDiffError("give --out-dir OUT: where to write the edited images")
    images = list_images(args.images)
    out_dir = _check_out_dir(args.out_dir, f"{images[0].stem}.png")
    workers = Workers()
    _, edits, editor = _load_for_edit(args, device=workers.device(args.device))
    editor.progress = False
    options = _render_options(args)
    _resize_note(editor, workers)

    def job(paths: list[Path]) -> list:
        results: list = [None] * len(paths)
        good, batch = [], []
        for i, path in enumerate(paths):
            try:
                batch.append(_folder_image(editor, open_image(path), path))
                good.append(i)
            except LocalDiffError as exc:
                results[i] = exc
        if batch:
            edited = to_pil(editor.render_images(torch.cat(batch), edits, **options))
            for i, im in zip(good, edited):
                results[i] = lambda path, im=im: save_image(im, path)
        return results

    rows = run_folder(images, out_dir, ".png", job, batch_size=args.batch_size, workers=workers,
                      progress=not args.quiet, desc="edit")
    return _folder_report(rows, images, out_dir, summary, workers)


def cmd_sweep(args) -> int:
    from localdiff.viz import save_gif, strip, symmetric_strengths

    out = check_output_path(args.out, (".gif",), "--out")
    strip_path = check_output_path(out.with_suffix(".png"), (".png",), "strip")
    image = open_image(args.image)
    dirs, ((direction, _),), editor = _load_for_edit(args)
    span = args.max_strength if args.max_strength is not None else strength_span(dirs.meta, GRID_STRENGTH)
    strengths = symmetric_strengths(span, args.frames)
    frames = editor.render(editor.prepare(image), [[(direction, s)] for s in strengths], **_render_options(args))
    save_image(strip(frames, dirs.masks[direction.region] if direction.region in dirs.masks else None), strip_path)
    save_gif(frames, out)
    log.info("wrote %s and %s", out, strip_path)
    return 0


def cmd_masks(args) -> None:
    from localdiff.facemasks import face_part_masks, parse_parts
    from localdiff.masks import save_masks

    parts = parse_parts(args.parts)
    image = open_image(args.image)
    masks = face_part_masks(image, parts)  # everything is found before anything is written
    for path in save_masks(masks, Path(args.out_dir)):
        log.info("wrote %s (%d px)", path, int(masks[path.stem].sum()))


def cmd_info(args) -> None:
    print(Directions.load(args.directions).describe())


def cmd_sample(args) -> None:
    from localdiff.sampling import generate, make_schedule
    from localdiff.viz import image_grid

    if args.out is None and args.out_dir is None:
        raise LocalDiffError("sample needs --out GRID.png (one grid) or --out-dir DIR (one PNG per image), or both")
    names = [f"seed{args.seed}_{i:04d}.png" for i in range(args.n)]
    out = check_output_path(args.out, (".png",), "--out") if args.out is not None else None
    out_dir = _check_out_dir(args.out_dir, names[0]) if args.out_dir is not None else None
    editor = _editor(args, args.steps)
    images = generate(editor.model, args.n, make_schedule(editor.model, args.steps), seed=args.seed,
                      progress=editor.progress)
    if out is not None:
        save_image(image_grid(images), out)
        log.info("wrote %s (%d images)", out, args.n)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, image in zip(names, to_pil(images)):
            save_image(image, out_dir / name)
        log.info("wrote %d images of %d x %d px to %s", args.n, editor.model.resolution, editor.model.resolution,
                 out_dir)


def _check_out_dir(path: str, probe: str) -> Path:
    """``--out-dir``: not a file; the folder itself, or the one it will be made in, exists and is writable (checked
    with the name of one of the outputs, ``probe``) -- before any work starts."""
    out_dir = Path(path)
    if out_dir.exists() and not out_dir.is_dir():
        raise LocalDiffError(f"--out-dir {out_dir} exists and is not a folder")
    check_output_path((out_dir if out_dir.is_dir() else out_dir.parent) / probe, (Path(probe).suffix,), "--out-dir")
    return out_dir


def cmd_demo(args) -> None:
    from localdiff.demo import run_demo

    out_dir = _check_out_dir(args.out_dir, "grid.png")
    editor = _editor(args, args.steps)
    run_demo(editor, out_dir)


def _eval_images(args, resolution: int) -> list[tuple[str, torch.Tensor]]:
    from localdiff.images import load_image

    if args.images:
        folder = Path(args.images)
        if not folder.is_dir():
            raise LocalDiffError(f"--images {folder} is not a folder of images")
        files = sorted(f for f in folder.iterdir() if f.suffix.lower() in (".png", ".jpg", ".jpeg"))
        if len(files) < 2:
            raise LocalDiffError(f"--images {folder} holds {len(files)} PNG/JPEG images; evaluation needs at least 2")
        limit = 2 if args.quick else len(files)  # --faces and --images exclude each other
        return [(f.name, load_image(f, resolution, name=f.name)) for f in files[:limit]]
    from localdiff.facegan import FaceGAN, eval_seeds

    n = args.faces or (2 if args.quick else 32)
    if n < 2:
        raise LocalDiffError("--faces must be at least 2 (transfer needs a second face)")
    faces = FaceGAN().faces(eval_seeds(n))
    if faces.shape[-1] != resolution:
        faces = torch.nn.functional.interpolate(faces, size=resolution, mode="bilinear", antialias=True)
    return [(f"seed{s}", faces[i:i + 1]) for i, s in enumerate(eval_seeds(n))]


def cmd_eval(args) -> None:
    from localdiff.evaluation import EvalSettings, Progress, progress_key, run_evaluation, write_report

    out_dir = _check_out_dir(args.out_dir, "summary.md")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise LocalDiffError('the evaluation plots need matplotlib; run: pip install -e ".[eval]"') from None
    from localdiff.baselines import parse_method

    for m in args.methods:
        parse_method(m)  # a misspelt method is one line, before the model loads
    specs, _ = _parse_masks(args.mask or ["eyes", "nose", "mouth"])
    steps = args.steps or (10 if args.quick else DemoSettings.num_steps)
    editor = _editor(args, steps)
    editor.progress = False  # one bar for the whole evaluation instead of one per inversion
    masks = {n: load_mask(p, editor.model.resolution, name=n) for n, p in specs.items()}
    faces = _eval_images(args, editor.model.resolution)
    settings = EvalSettings(methods=tuple(args.methods), regions=tuple(masks), schedule=args.schedule,
                            transfer=not args.no_transfer)
    if args.target_change is not None:
        if not 0 < args.target_change < 1:
            raise LocalDiffError(f"--target-change must be in (0, 1), got {args.target_change}")
        settings.target_change = args.target_change
    if args.quick:
        settings.ladder = (0.125, 0.5, 1.0)
        settings.pca_samples = 16
        settings.discover = dict(k=2, oversample=2, individual_rank=1, null_rank=2, max_iter=4, tol_deg=1.0)
    if args.joint_rank is not None:
        settings.discover["joint_rank"] = args.joint_rank
    progress = Progress(out_dir / "progress", progress_key(settings, editor.model, steps, masks))
    if progress.started:
        log.info("going on with the unfinished evaluation in %s", progress.folder)
    result = run_evaluation(editor, faces, masks, settings, progress=not args.quiet, resume=progress)
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "localdiff " + " ".join(sys.argv[1:]) if sys.argv[0].endswith("localdiff") else "localdiff eval ..."
    model_name = editor.model.name if args.model else "the embedded default model"  # as _editor chose it
    header = [f"# localdiff eval: {model_name} (fingerprint {editor.model.fingerprint}), {steps} DDIM steps",
              "", f"Command: `{command}`", ""]
    recon = editor.invert(faces[0][1]).reconstruction
    lines = write_report(result, settings, masks, recon, out_dir, header=header)
    progress.remove()  # finished: the report holds everything
    print("\n".join(lines))
    log.info("wrote %s", ", ".join(str(out_dir / f) for f in ("results.csv", "summary.md", "curves.png", "panel.png")))


def cmd_serve(args) -> None:
    if args.port > 65535:
        raise LocalDiffError(f"--port {args.port} is not a TCP port (1..65535)")
    _check_port_free(args.host, args.port)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise LocalDiffError('the web UI needs gradio; run: pip install -e ".[webui]"') from None
    from localdiff.webui import serve

    editor = _editor(args, args.steps)
    editor.progress = False
    serve(editor, host=args.host, port=args.port)


def _check_port_free(host: str, port: int) -> None:
    import socket

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise LocalDiffError(f"--host {host} is not an address of this machine ({exc.strerror}); try 127.0.0.1") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind(address)
        except OSError as exc:
            raise LocalDiffError(f"cannot serve on {host}:{port} ({exc.strerror}); another program may be using it: "
                                 f"choose another port with --port") from None


COMMANDS = {"discover": cmd_discover, "edit": cmd_edit, "sweep": cmd_sweep, "masks": cmd_masks, "info": cmd_info,
            "sample": cmd_sample, "demo": cmd_demo, "eval": cmd_eval, "serve": cmd_serve}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(getattr(args, "quiet", False))
    try:
        return COMMANDS[args.command](args) or 0
    except LocalDiffError as exc:
        print(f"localdiff: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("localdiff: interrupted", file=sys.stderr)
        return 130


def _setup_logging(quiet: bool) -> None:
    logger = logging.getLogger("localdiff")
    for old in [h for h in logger.handlers if getattr(h, "_localdiff_cli", False)]:
        logger.removeHandler(old)
    handler = logging.StreamHandler(sys.stderr)  # the current stderr, also when main() runs again in-process
    handler.setFormatter(logging.Formatter("%(message)s"))
    handler._localdiff_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(logging.ERROR if quiet else logging.INFO)
    logger.propagate = False
    quiet_diffusers()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
