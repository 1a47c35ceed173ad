"""Measure edits: pixel-space locality, visibility and preservation of an edit against the reconstruction."""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor

from localdiff import baselines, metrics
from localdiff.baselines import METHODS
from localdiff.config import DiscoveryConfig


@dataclass
class EditScore:
    """Metrics of one edit (method.md section 7), images in [0, 1]."""

    locality: float
    inside_change: float
    outside_psnr: float
    outside_ssim: float
    leakage: dict[str, float]


def score_edit(edited: Tensor, reconstruction: Tensor, mask: Tensor,
               others: Mapping[str, Tensor] | None = None) -> EditScore:
    """Score ``edited`` against the unedited ``reconstruction`` (both (C, R, R) in [-1, 1]) for region ``mask``."""
    a = (edited.float().cpu().clamp(-1, 1) + 1) / 2  # as the saved image would be
    b = (reconstruction.float().cpu().clamp(-1, 1) + 1) / 2
    delta = a - b
    return EditScore(
        locality=metrics.locality(delta, mask).item(),
        inside_change=metrics.inside_change(delta, mask).item(),
        outside_psnr=metrics.outside_psnr(a, b, mask).item(),
        outside_ssim=metrics.outside_ssim(a, b, mask).item(),
        leakage={n: metrics.leakage(delta, m).item() for n, m in (others or {}).items()},
    )


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(list(values), dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(t) > 1 else 0.0


def timing_row(method: str, seconds: Sequence[float]) -> str:
    """One row of the discovery-time table: median (the middle value, or the mean of the two middle ones), mean,
    std."""
    mu, sd = mean_std(seconds)
    return f"| {method} | {statistics.median(seconds):.1f} | {mu:.1f} | {sd:.1f} |"


# ---------------------------------------------------------------------- matched-visibility evaluation
LADDER = (0.0625, 0.125, 0.25, 0.5, 1.0)  # strengths tried, as multiples of the space's top strength
TOP_STRENGTH = {"h": 1.0, "x": 0.25}  # h: fraction of |h|; x: fraction of |x_t| (LOCO's published shift is ~0.02)


@dataclass
class EvalSettings:
    """What ``localdiff eval`` runs (see docs/evaluation.md)."""

    methods: tuple[str, ...] = METHODS
    regions: tuple[str, ...] = ("eyes", "nose", "mouth")
    target_change: float = 0.08  # matched visibility: mean |change| inside the region, images in [0, 1]
    ladder: tuple[float, ...] = LADDER
    schedule: str = "all"  # h-space edit schedule (x-space methods edit once, at their timestep)
    transfer: bool = True
    pca_samples: int = 256
    discover: dict = field(default_factory=lambda: DiscoveryConfig.fast().changes())


def interpolate_strength(strengths: Sequence[float], changes: Sequence[float], target: float) -> tuple[float, bool]:
    """The strength at which the (increasing) inside change reaches ``target``, interpolating log-log between the
    measured points. Returns ``(strength, reached)``; beyond the range: the nearest end and ``False`` above it."""
    pairs = sorted(zip(strengths, changes))
    s, c = [p[0] for p in pairs], [max(p[1], 1e-12) for p in pairs]
    if target <= c[0]:
        return s[0] * target / c[0], True  # below the smallest step the change is ~linear in strength
    for (s0, c0), (s1, c1) in zip(zip(s, c), zip(s[1:], c[1:])):
        if c0 <= target <= c1:
            if c1 == c0:
                return s0, True
            w = (math.log(target) - math.log(c0)) / (math.log(c1) - math.log(c0))
            return math.exp(math.log(s0) + w * (math.log(s1) - math.log(s0))), True
    return s[-1], False


def _score_rows(edited: Tensor, recon: Tensor, masks: Mapping[str, Tensor], edits, base: dict) -> list[dict]:
    rows = []
    for (region, strength), e in zip(edits, edited):
        others = {n: m for n, m in masks.items() if n != region}
        sc = score_edit(e, recon, masks[region], others)
        rows.append(dict(base, region=region, strength=strength, locality=sc.locality,
                         inside_change=sc.inside_change, outside_psnr=sc.outside_psnr, outside_ssim=sc.outside_ssim,
                         leakage=sum(sc.leakage.values()),
                         **{f"leakage_{n}": v for n, v in sc.leakage.items()}))
    return rows


def eps_level_locality(editor, image: Tensor, md, masks: Mapping[str, Tensor],
                       regions: Sequence[str]) -> dict[str, float]:
    """|m * d eps|^2 / |d eps|^2 of each region's first direction of ``md`` on ``image`` at the method's timestep:
    ``d eps = J v`` with J = d eps / dh for h-space methods and d eps / dx_t for x-space ones (method.md section
    7, the Jacobian-level locality)."""
    from torch.func import jvp

    from localdiff.jacobian import ad_friendly_attention

    vecs = torch.stack([md.vectors[r][0] for r in regions])
    if md.space == "h":
        responses = editor.responses(image, vecs, md.timestep)
    else:
        inv = editor.invert(image)
        step = inv.schedule.index_of(md.timestep)
        x_t, t = inv.xs[step], inv.schedule.timesteps[step]
        model = editor.model
        with ad_friendly_attention():
            responses = torch.cat([jvp(lambda x: model.eps(x, t), (x_t,), (v.to(x_t).view_as(x_t),))[1]
                                   for v in vecs]).detach()
    return {r: metrics.eps_locality(responses[i].float().cpu(), masks[r]).item() for i, r in enumerate(regions)}


def evaluate_directions(editor, image: Tensor, md, masks: Mapping[str, Tensor], settings: EvalSettings,
                        base: dict, *, refine: int = 2) -> tuple[list[dict], list[dict], Tensor]:
    """Score one method's directions on one image: a strength ladder (the curve), then every region at the strength
    that matches ``settings.target_change`` (interpolated; up to ``refine`` more renders when the change misses the
    target by over 10 %). Returns ``(curve rows, matched rows, matched edits (B, C, R, R))``."""
    recon = editor.invert(image).reconstruction[0]
    top = TOP_STRENGTH[md.space]
    regions = [r for r in settings.regions if r in md.vectors]
    ladder = [(r, top * f) for r in regions for f in settings.ladder]
    out = baselines.render(editor, image, md, ladder, schedule=settings.schedule)
    eps = eps_level_locality(editor, image, md, masks, regions)
    curve = _score_rows(out, recon, masks, ladder, dict(base, kind="curve"))
    for row in curve:
        row["eps_locality"] = eps[row["region"]]
    points = {r: [(row["strength"], row["inside_change"]) for row in curve if row["region"] == r] for r in regions}
    for _ in range(1 + refine):
        plan = [(r, *interpolate_strength([p[0] for p in points[r]], [p[1] for p in points[r]],
                                          settings.target_change)) for r in regions]
        edits = [(r, s) for r, s, _ in plan]
        out = baselines.render(editor, image, md, edits, schedule=settings.schedule)
        matched = _score_rows(out, recon, masks, edits, dict(base, kind="matched"))
        off = False
        for row, (r, s, reached) in zip(matched, plan):
            row["reached"] = reached
            row["eps_locality"] = eps[r]
            points[r].append((s, row["inside_change"]))  # refine the interpolation with the new point
            off |= reached and abs(row["inside_change"] - settings.target_change) > 0.1 * settings.target_change
        if not off:
            break
    return curve, matched, out


def lpips_status() -> tuple[object | None, str]:
    """``(metric, note)``: an LPIPS callable if the ``lpips`` package and its backbone weights load offline, else
    ``None`` and why. LPIPS is never replaced by another number."""
    try:
        import lpips  # noqa: F401  (optional; its AlexNet backbone comes from a torchvision download)
    except ImportError:
        return None, "unavailable: the lpips package is not installed (its backbone weights need a download)"
    try:
        net = lpips.LPIPS(net="alex", verbose=False)
    except Exception as err:  # offline: torchvision cannot fetch the backbone; say so in the report
        return None, f"unavailable: LPIPS weights could not be loaded offline ({type(err).__name__})"
    return net, "LPIPS (AlexNet), lower is closer"


class Progress:
    """A long evaluation's progress in a folder, so that an interrupted run can go on where it stopped.

    ``state.json`` holds what the run measures (settings, model, steps, masks); ``rows.jsonl`` one line of scored
    rows and discovery timings per finished face; ``panel.safetensors`` face 0's matched edits (for panel.png);
    ``previous.safetensors`` the last finished face's directions (for the next face's transfer; rediscovered when
    missing). All plain data, no pickle."""

    def __init__(self, folder, key: dict):
        self.folder = Path(folder)
        self.key = key

    @property
    def started(self) -> bool:
        return (self.folder / "state.json").is_file()

    def load(self, faces: Sequence[str]) -> tuple[list[str], list[dict], dict[str, list[float]], dict[str, Tensor]]:
        """``(finished faces, rows, timings, panel)``; raises :class:`LocalDiffError` when the folder holds another
        run."""
        from safetensors.torch import load_file

        from localdiff.errors import LocalDiffError

        state = json.loads((self.folder / "state.json").read_text())
        if state.get("key") != self.key:
            changed = sorted(k for k in set(self.key) | set(state.get("key", {}))
                             if self.key.get(k) != state.get("key", {}).get(k))
            raise LocalDiffError(f"{self.folder} holds an evaluation with other settings ({', '.join(changed)}); "
                                 f"use another --out-dir, or delete {self.folder} to start over")
        done: list[str] = []
        rows: list[dict] = []
        timings: dict[str, list[float]] = {}
        lines = (self.folder / "rows.jsonl").read_text().splitlines(keepends=True)
        for n, line in enumerate(lines):
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:  # a line cut short by a crash: drop it, that face is done again
                (self.folder / "rows.jsonl").write_text("".join(lines[:n]))
                break
            done.append(entry["face"])
            rows += entry["rows"]
            for m, t in entry["timings"].items():
                timings.setdefault(m, []).append(t)
        if done != list(faces[:len(done)]):
            raise LocalDiffError(f"{self.folder} holds an evaluation of other faces ({', '.join(done[:3])}, ...); "
                                 f"use another --out-dir, or delete {self.folder} to start over")
        panel_file = self.folder / "panel.safetensors"
        panel = load_file(str(panel_file)) if done and panel_file.is_file() else {}
        return done, rows, timings, panel

    def save_face(self, face: str, rows: list[dict], timings: dict[str, float], directions: dict,
                  panel: dict[str, Tensor] | None = None) -> None:
        """Record one finished face; its rows go in last, so a crash never leaves a half-recorded face."""
        from safetensors.torch import save_file

        from localdiff.images import atomic_write

        self.folder.mkdir(parents=True, exist_ok=True)
        if not self.started:
            (self.folder / "rows.jsonl").write_text("")
            with atomic_write(self.folder / "state.json") as tmp:
                Path(tmp).write_text(json.dumps(dict(key=self.key), indent=1) + "\n")
        if panel:
            with atomic_write(self.folder / "panel.safetensors") as tmp:
                # clone: methods that found the same directions share one rendered tensor
                save_file({m: t.detach().cpu().clone().contiguous() for m, t in panel.items()}, str(tmp))
        with atomic_write(self.folder / "previous.safetensors") as tmp:
            save_method_directions(directions, face, tmp)
        with open(self.folder / "rows.jsonl", "a") as f:
            f.write(json.dumps(dict(face=face, rows=rows, timings=timings)) + "\n")

    def previous(self, face: str) -> dict | None:
        """The directions saved with ``face``, if the folder still has them."""
        path = self.folder / "previous.safetensors"
        return load_method_directions(path, face) if path.is_file() else None

    def remove(self) -> None:
        import shutil

        shutil.rmtree(self.folder, ignore_errors=False)


def save_method_directions(directions: dict, face: str, path) -> None:
    """Every method's directions of one face into one safetensors file (vectors as tensors, the rest as JSON)."""
    from safetensors.torch import save_file

    tensors = {f"{m}/{r}": v.contiguous().cpu() for m, md in directions.items() for r, v in md.vectors.items()}
    tensors.update({f"{m}/{r}/per_step": v.contiguous().cpu() for m, md in directions.items()
                    for r, v in (md.per_step or {}).items()})
    meta = {m: dict(space=md.space, timestep=md.timestep, unit=md.unit, fingerprint=md.fingerprint, info=md.info,
                    regions=list(md.vectors), steps=md.steps, num_steps=md.num_steps)
            for m, md in directions.items()}
    save_file(tensors, str(path), metadata=dict(face=face, methods=json.dumps(meta)))


def load_method_directions(path, face: str) -> dict | None:
    """What :func:`save_method_directions` wrote, if it was written for ``face``; else ``None``."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("face") != face:
            return None
        methods = json.loads(meta["methods"])
        keys = set(f.keys())
        out = {}
        for m, d in methods.items():
            per_step = {r: f.get_tensor(f"{m}/{r}/per_step") for r in d["regions"] if f"{m}/{r}/per_step" in keys}
            out[m] = baselines.MethodDirections(m, d["space"], {r: f.get_tensor(f"{m}/{r}") for r in d["regions"]},
                                                d["timestep"], d["unit"], d["fingerprint"], d["info"],
                                                per_step=per_step or None, steps=d.get("steps"),
                                                num_steps=d.get("num_steps"))
        return out


def run_evaluation(editor, faces: Sequence[tuple[str, Tensor]], masks: Mapping[str, Tensor],
                   settings: EvalSettings, *, progress: bool = True, resume: Progress | None = None) -> dict:
    """Every method on every face: discover, score on the same face (curve + matched visibility) and, when
    ``settings.transfer``, score the previous face's directions on this one. Returns a dict with ``rows`` (one per
    scored edit), ``panel`` (face 0's matched edits per method), ``timings``
    (discovery seconds per method) and ``lpips`` (the availability note).

    With ``resume``, every finished face is recorded there and faces it already holds are skipped."""
    import time

    from tqdm.auto import tqdm

    from localdiff.baselines.hspace import fit_hspace_pca

    for m in settings.methods:
        baselines.parse_method(m)  # a misspelt method or setting fails here, before any work
    lp, lpips_note = lpips_status()
    names = [n for n, _ in faces]
    done, rows, timings, panel = resume.load(names) if resume is not None and resume.started else ([], [], {}, {})
    for m in settings.methods:
        timings.setdefault(m, [])
    extra: dict = {}
    if any(baselines.parse_method(m)[0] == "pca" for m in settings.methods) and len(done) < len(faces):
        extra["components"] = fit_hspace_pca(editor, timestep=settings.discover.get("timestep", DiscoveryConfig.timestep),
                                             n_samples=settings.pca_samples)
    previous: dict[str, tuple[str, object]] = {}
    if done and settings.transfer:
        i = len(done) - 1
        saved = resume.previous(names[i])
        if saved is None:  # rediscover the last finished face's directions for the next face's transfer
            saved = {m: baselines.discover(m, editor, faces[i][1], masks, **settings.discover, **extra)
                     for m in settings.methods}
        previous = {m: (names[i], md) for m, md in saved.items()}
    bar = tqdm(total=len(faces) * len(settings.methods), initial=len(done) * len(settings.methods), desc="evaluate",
               disable=not progress)
    for i, (name, image) in enumerate(faces):
        if i < len(done):
            continue
        recon = editor.invert(image).reconstruction
        face_rows: list[dict] = []
        face_times: dict[str, float] = {}
        found: dict[str, object] = {}
        scored: dict[tuple, tuple] = {}
        for method in settings.methods:
            bar.set_postfix(face=name, method=method)
            t0 = time.perf_counter()
            md = baselines.discover(method, editor, image, masks, **settings.discover, **extra)
            face_times[method] = time.perf_counter() - t0
            runs = [("source", name, md)]
            if settings.transfer and method in previous:
                runs.append(("transfer", *previous[method]))
            for setting, src, directions in runs:
                base = dict(face=name, method=method, setting=setting, source=src)
                same = _edits_key(directions, settings.regions)
                if same in scored:  # another method found exactly these directions (e.g. JIVE with joint rank 0)
                    curve, matched, out = scored[same]
                    curve, matched = [dict(r, **base) for r in curve], [dict(r, **base) for r in matched]
                else:
                    curve, matched, out = evaluate_directions(editor, image, directions, masks, settings, base)
                    scored[same] = (curve, matched, out)
                if lp is not None:
                    _add_lpips(lp, matched, out, recon)
                face_rows += curve + matched
                if i == 0 and setting == "source":
                    panel[method] = out
            found[method] = md
            bar.update(1)
        previous = {m: (name, md) for m, md in found.items()}
        rows += face_rows
        for m, t in face_times.items():
            timings[m].append(t)
        if resume is not None:
            resume.save_face(name, face_rows, face_times, found, panel if i == 0 else None)
    bar.close()
    return dict(rows=rows, panel=panel, timings=timings, lpips=lpips_note)


def _edits_key(md, regions: Sequence[str]) -> tuple:
    """What decides an edit's renders: space, timestep, unit and each region's first direction, bit for bit, with
    its per-step vectors when it was tracked (a tracked method's discovery-step directions can equal an untracked
    method's while its edits differ)."""
    from localdiff.images import tensor_hash

    per_step = md.per_step or {}
    return (md.space, md.timestep, md.unit,
            tuple(tensor_hash(md.vectors[r][0].float().cpu()) for r in regions if r in md.vectors),
            tuple((tuple(md.steps or ()), tensor_hash(per_step[r][:, 0].float().cpu()))
                  for r in regions if r in per_step))


def progress_key(settings: EvalSettings, model, num_steps: int, masks: Mapping[str, Tensor]) -> dict:
    """What must match for a resumed evaluation to go on with the rows of an earlier run."""
    from dataclasses import asdict

    from localdiff import __version__
    from localdiff.images import tensor_hash

    key = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()}
    return dict(key, model=model.fingerprint, num_steps=num_steps, localdiff=__version__,
                masks={n: tensor_hash(m.float()) for n, m in masks.items()})


def _add_lpips(net, rows: list[dict], edited: Tensor, recon: Tensor) -> None:
    with torch.no_grad():
        d = net(edited.float().cpu().clamp(-1, 1), recon.float().cpu().clamp(-1, 1).expand_as(edited))
    for row, v in zip(rows, d.flatten().tolist()):
        row["lpips"] = v


SUMMARY_COLUMNS = (("locality", "locality ↑", 3), ("eps_locality", "eps-level locality ↑", 3),
                   ("inside_change", "inside change", 3),
                   ("outside_psnr", "outside PSNR dB ↑", 1), ("outside_ssim", "outside SSIM ↑", 3),
                   ("leakage", "leakage to other regions ↓", 3))


def summary_table(rows: Sequence[dict], methods: Sequence[str], setting: str) -> list[str]:
    """Markdown table of the matched-visibility rows of ``setting`` ("source"/"transfer"): mean ± std per method."""
    head = "| method | edits | target reached | " + " | ".join(c[1] for c in SUMMARY_COLUMNS) + " |"
    lines = [head, "|---|---:|---:|" + "---:|" * len(SUMMARY_COLUMNS)]
    for m in methods:
        sel = [r for r in rows if r["method"] == m and r["setting"] == setting and r["kind"] == "matched"]
        if not sel:
            continue
        cells = []
        for key, _, digits in SUMMARY_COLUMNS:
            mu, sd = mean_std([r[key] for r in sel])
            cells.append(f"{mu:.{digits}f} ± {sd:.{digits}f}")
        reached = sum(bool(r["reached"]) for r in sel)
        lines.append(f"| {m} | {len(sel)} | {reached}/{len(sel)} | " + " | ".join(cells) + " |")
    return lines


PAIRED_COLUMNS = (("locality", "locality", 1), ("eps_locality", "eps-level locality", 1),
                  ("leakage", "leakage to other regions", -1))


def bootstrap_interval(values: Sequence[float], *, level: float = 0.95, resamples: int = 10_000,
                       seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` (seeded, so a report is reproducible)."""
    t = torch.tensor(list(values), dtype=torch.float64)
    if len(t) < 2:
        return (float(t.mean()), float(t.mean())) if len(t) else (math.nan, math.nan)
    g = torch.Generator().manual_seed(seed)
    means = t[torch.randint(len(t), (resamples, len(t)), generator=g)].mean(1)
    lo, hi = torch.quantile(means, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64))
    return float(lo), float(hi)


def paired_differences(rows: Sequence[dict], method: str, reference: str, setting: str, key: str) -> list[float]:
    """``key`` of ``method`` minus ``reference`` on the same edits (face, source, region) at matched visibility."""
    def table(m):
        return {(r["face"], r["source"], r["region"]): r[key] for r in rows
                if r["method"] == m and r["setting"] == setting and r["kind"] == "matched" and key in r}

    mine, ref = table(method), table(reference)
    return [mine[k] - ref[k] for k in mine if k in ref]


def paired_table(rows: Sequence[dict], methods: Sequence[str], reference: str, setting: str) -> list[str]:
    """Markdown: each method against ``reference`` on the same edits, per column the mean paired difference, its
    95 % bootstrap interval and how many edits are better (higher locality, lower leakage)."""
    head = "| method − " + reference + " | edits | " + " | ".join(c[1] for c in PAIRED_COLUMNS) + " |"
    lines = [head, "|---|---:|" + "---:|" * len(PAIRED_COLUMNS)]
    for m in methods:
        if m == reference:
            continue
        cells, n = [], 0
        for key, _, sign in PAIRED_COLUMNS:
            diffs = paired_differences(rows, m, reference, setting, key)
            if not diffs:
                cells.append("–")
                continue
            n = len(diffs)
            lo, hi = bootstrap_interval(diffs)
            better = sum(d * sign > 0 for d in diffs)
            cells.append(f"{statistics.fmean(diffs):+.3f} [{lo:+.3f}, {hi:+.3f}], better on {better}/{n}")
        if n:
            lines.append(f"| {m} | {n} | " + " | ".join(cells) + " |")
    return lines


def region_table(rows: Sequence[dict], methods: Sequence[str], regions: Sequence[str]) -> list[str]:
    """Markdown: matched-visibility locality per method and region (source images)."""
    lines = ["| method | " + " | ".join(regions) + " |", "|---|" + "---:|" * len(regions)]
    for m in methods:
        cells = []
        for reg in regions:
            sel = [r["locality"] for r in rows if r["method"] == m and r["setting"] == "source"
                   and r["kind"] == "matched" and r["region"] == reg]
            cells.append(f"{mean_std(sel)[0]:.3f}" if sel else "–")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return lines


CSV_FIELDS = ("face", "method", "setting", "source", "kind", "region", "strength", "reached", "locality",
              "eps_locality", "inside_change", "outside_psnr", "outside_ssim", "leakage", "lpips")


def write_report(result: dict, settings: EvalSettings, masks: Mapping[str, Tensor], reconstruction: Tensor,
                 out_dir, *, header: Sequence[str] = ()) -> list[str]:
    """Write ``results.csv``, ``summary.md``, ``curves.png`` and ``panel.png`` into ``out_dir``; returns the
    summary's lines."""
    import csv
    import io
    from localdiff.images import atomic_write, save_image
    from localdiff.viz import curves_figure, method_panel

    out = Path(out_dir)
    rows = result["rows"]
    methods = [m for m in settings.methods if any(r["method"] == m for r in rows)]
    leak_cols = sorted({k for r in rows for k in r if k.startswith("leakage_")})
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(CSV_FIELDS) + leak_cols, extrasaction="ignore")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in r.items()})
    with atomic_write(out / "results.csv") as tmp:
        Path(tmp).write_text(buf.getvalue())

    n_faces = len({r["face"] for r in rows})
    lines = list(header) + [
        f"Matched visibility: each method's strength is set per image and region so that the mean |change| inside "
        f"the region is {settings.target_change} (images in [0, 1]); ladder of strengths "
        f"{', '.join(f'{f:g}' for f in settings.ladder)} × the space's top strength; h-space schedule "
        f"`{settings.schedule}`. {n_faces} faces, regions {', '.join(settings.regions)}. LPIPS: {result['lpips']}.",
        "", "### Same image (directions discovered on the face they edit)", "",
        *summary_table(rows, methods, "source"), "",
    ]
    reference = "masked" if "masked" in methods else None
    if reference and len(methods) > 1:
        lines += [f"### Paired against {reference} (same face, region and visibility; mean difference, 95 % "
                  "bootstrap interval)", "", *paired_table(rows, methods, reference, "source"), ""]
    if any(r["setting"] == "transfer" for r in rows):
        lines += ["### Transfer (directions from the previous face applied to the next)", "",
                  *summary_table(rows, methods, "transfer"), ""]
        if reference and len(methods) > 1:
            lines += [f"Paired against {reference} (transfer):", "",
                      *paired_table(rows, methods, reference, "transfer"), ""]
    lines += ["### Locality per region (same image, matched visibility)", "",
              *region_table(rows, methods, settings.regions), "",
              "### Discovery time per image (seconds, this machine; the median is robust to other jobs)", "",
              "| method | median | mean | std |", "|---|---:|---:|---:|"]
    lines += [timing_row(m, result["timings"][m]) for m in methods]
    with atomic_write(out / "summary.md") as tmp:
        Path(tmp).write_text("\n".join(lines) + "\n")

    points: dict[str, list] = {}
    for m in methods:
        curve = [r for r in rows if r["method"] == m and r["setting"] == "source" and r["kind"] == "curve"]
        for level in sorted({r["strength"] for r in curve}):
            sel = [r for r in curve if r["strength"] == level]
            points.setdefault(m, []).append(tuple(mean_std([r[k] for r in sel])[0]
                                                  for k in ("inside_change", "locality", "outside_psnr")))
    curves_figure(points, settings.target_change, out / "curves.png")
    if result["panel"]:
        panel_masks = {r: masks[r] for r in settings.regions}
        save_image(method_panel(reconstruction[0], result["panel"], panel_masks), out / "panel.png")
    return lines
