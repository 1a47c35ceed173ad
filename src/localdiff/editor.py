"""The high-level API: invert an image, discover local directions for its regions, edit and transfer.

::

    editor = LocalEditor.from_pretrained("google/ddpm-ema-celebahq-256")   # or a local folder
    dirs = editor.discover("face.png", masks={"mouth": "mouth.png", "eyes": "eyes.png"})
    editor.edit("face.png", dirs["mouth"][0], strength=0.25).save("smile.png")
    editor.edit("other_face.png", dirs["mouth"][0], strength=0.25)          # transfer
    dirs.save("face.safetensors")

An edit adds ``strength * unit * v`` to h, where ``unit`` is the norm of h at the discovery timestep of the
image the directions were found on (so strength 0.1 moves h by a tenth of its own size), during the DDIM
regeneration from the inverted x_T. Inversions are cached per image, so further edits of the same image only
pay for the regeneration.
"""

from __future__ import annotations

import logging
import math
from collections import OrderedDict
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Mapping, Sequence

import torch
from PIL import Image
from torch import Tensor

from localdiff.directions import Direction, Directions, check_region_name
from localdiff.errors import LocalDiffError
from localdiff.images import ImageLike, image_size, load_image, tensor_hash, to_pil
from localdiff.masks import load_mask, pixel_masks
from localdiff.jacobian import (decoder_operators, fix_signs, linalg_dtype, locality_ratio, orthonormal_rows,
                                project_out, subspace_iteration)
from localdiff.jive import ajive, jive
from localdiff.model import DiffusionModel, load_model
from localdiff.sampling import EDIT_SCHEDULES, Schedule, ddim_invert, ddim_sample, edit_steps, make_schedule

log = logging.getLogger("localdiff")

# Defaults shared by the API, the CLI and the web UI.
DEFAULTS = dict(
    num_steps=50,
    method="jive",
    timestep=0.7,  # measured: best locality on 16 evaluation faces (docs/defaults.md)
    k=6,
    oversample=3,
    joint_rank=None,  # automatic
    individual_rank=3,
    rest_block=False,
    track=False,  # follow the directions to every DDIM step (per-step directions)
    null_rank=5,  # nullspace: directions of the outside's Jacobian projected off
    max_iter=50,
    tol_deg=0.1,
    seed=0,
    schedule="all",
)

# Edit strengths offered by default (grids, sweeps, the web UI's sliders): -0.3 .. +0.3 of |h|. Measured on the
# default model: visible and mostly local at 0.25 (docs/defaults.md); beyond about 0.5 edits wreck the face.
EDIT_RANGE = 0.3

# Lighter discovery for the demo and the evaluation: k = 3 + 3 (a block of 6; k = 4 + 2 needs twice the iterations
# on the default model) to an estimated 0.5 deg of the converged subspaces. About a third of the default's work.
FAST_DISCOVERY = dict(k=3, oversample=3, individual_rank=2, tol_deg=0.5, max_iter=15)

# More singular vectors than this per region would take hours and gigabytes; nobody needs them.
MAX_K = 512
# Two regions whose masks overlap more than this (intersection over union) are the same region twice: JIVE's
# "local" directions would then be noise.
MAX_MASK_IOU = 0.95

Edit = tuple[Direction, float]

# How discovery turns the regions' Jacobian subspaces into local directions (LocalEditor.discover).
DISCOVERY_METHODS = ("jive", "masked", "nullspace", "ratio")
# Samples for AJIVE's two bounds in discovery. Measured on three (3, 16384) blocks: 200 samples put both bounds
# within 0.1 % of 1,000 samples' (AJIVE's published default) in 0.9 s instead of 4.0 s on 2 cores.
AJIVE_SAMPLES = 200
# Subspace iterations per step when directions are tracked from step to step (discover(track=True)). Measured on
# the test model (masked method, 10 steps): after 1 iteration the tracked direction is 35-68 deg from a cold
# discovery at that step, after 3 it is 2-12 deg.
TRACK_ITER = 3


def _mask_groups(method: str, regions: list[Tensor], *, k: int, null_rank: int, rest_block: bool):
    """The masks whose Jacobian subspaces ``method`` needs, as (group, masks, k): the regions always, plus the rest
    of the image (jive with ``rest_block``), each region's outside (nullspace) or the whole image (ratio)."""
    groups = [("regions", regions, k)]
    if method == "jive" and rest_block:
        rest = ~torch.stack([m.bool() for m in regions]).any(0)
        if not rest.any():
            raise LocalDiffError("the regions cover the whole image, so there is no rest of the image to use as a "
                                 "block; leave rest_block off")
        groups.append(("rest", [rest], k))
    elif method == "nullspace":
        groups.append(("outside", [1 - m.float() for m in regions], null_rank))
    elif method == "ratio":
        groups.append(("whole", [torch.ones_like(regions[0], dtype=torch.bool)], k))
    return groups


def _split(method: str, subs: dict, jvp, flat_masks: list[Tensor], *, keep: int, individual_rank,
           joint_rank: int | str | None, seed: int, model) -> tuple[list[Tensor], list[Tensor] | None, Tensor, dict]:
    """The regions' local directions from their subspaces (``subs``: group -> SubspaceResult) by ``method``.
    Returns ``(directions per region, their singular values or None, joint directions, info for meta)``."""
    res = subs["regions"]
    n = res.vectors.shape[0]
    dim = res.vectors.shape[-1]
    joint = res.vectors.new_zeros(0, dim)
    if method == "jive":
        blocks = [res.sigma[i, :, None] * res.vectors[i] for i in range(n)]
        ranks = individual_rank if individual_rank is None or isinstance(individual_rank, int) else list(individual_rank)
        if "rest" in subs:
            blocks.append(subs["rest"].sigma[0, :, None] * subs["rest"].vectors[0])
            if isinstance(ranks, list):
                ranks = ranks + [1]
        if joint_rank == "permutation":  # Lock et al.'s JIVE: their permutation test, then the alternation
            if ranks is None:
                ranks = keep
            split = jive(blocks, "permutation", ranks)
            info = dict(joint_rank_rule="permutation")
            if split.estimate is not None:
                info["joint_rank_test"] = dict(observed=split.estimate.observed[:8].tolist(),
                                               thresholds=split.estimate.thresholds[:8].tolist())
        else:  # AJIVE: the joint rank given, or chosen by its bounds
            split = ajive(blocks, ranks, joint_rank=joint_rank, seed=seed, samples=AJIVE_SAMPLES)
            info = dict(joint_rank_rule="given" if joint_rank is not None else "ajive",
                        signal_ranks=split.signal_ranks, individual_signal_ranks=split.individual_signal_ranks[:n])
            if split.estimate is not None:
                info["joint_rank_bounds"] = dict(random=split.estimate.random_bound, wedin=split.estimate.wedin_bound)
        return split.individual[:n], split.individual_sigma[:n], split.joint, info
    keeps = [keep] * n if isinstance(keep, int) else list(keep)
    if method == "masked":
        return ([res.vectors[i, :keeps[i]] for i in range(n)], [res.sigma[i, :keeps[i]] for i in range(n)], joint,
                {})
    if method == "nullspace":
        outside = subs["outside"]
        return ([project_out(res.vectors[i], outside.vectors[i])[:keeps[i]] for i in range(n)], None, joint,
                dict(null_rank=outside.vectors.shape[1]))
    # ratio
    basis = orthonormal_rows(torch.cat([res.vectors.reshape(-1, dim), subs["whole"].vectors[0]]).double())
    responses = jvp(basis.to(model.device, model.dtype)).double()
    chosen, ratios = [], []
    for fm, kp in zip(flat_masks, keeps):
        coef, lam = locality_ratio(responses, fm)
        chosen.append(orthonormal_rows(coef[:kp] @ basis))
        ratios.append([float(x) for x in lam[:kp]])
    return chosen, None, joint, dict(basis_dim=len(basis), ratio=ratios)


def _eps_locality(jvp, chosen: list[Tensor], flat_masks: list[Tensor], names: list[str], model):
    """Per region: eps-level locality of each direction and its in-region gain |m * J v|."""
    resp = jvp(torch.cat(chosen).to(model.device, model.dtype)).double()
    eps_loc, gains, start = {}, {}, 0
    for v, fm, n in zip(chosen, flat_masks, names):
        y = resp[start:start + len(v)]
        start += len(v)
        inside = (y * fm).pow(2).sum(1)
        eps_loc[n] = (inside / y.pow(2).sum(1).clamp(min=1e-300)).tolist()
        gains[n] = inside.sqrt()
    return eps_loc, gains



@dataclass
class Inversion:
    """An inverted image: x_T and the unedited regeneration (trajectory, h per step, reconstruction)."""

    x0: Tensor  # (1, C, R, R) in [-1, 1]: the input as the model sees it
    x_T: Tensor
    xs: list[Tensor]  # regeneration trajectory, xs[i] before step i, xs[-1] the reconstruction
    hs: list[Tensor]  # unedited h at each step
    schedule: Schedule
    image_hash: str

    @property
    def reconstruction(self) -> Tensor:
        return self.xs[-1]


class LocalEditor:
    """Discover and apply local edit directions with one diffusion model."""

    def __init__(self, model: DiffusionModel, *, num_steps: int = DEFAULTS["num_steps"], progress: bool = False,
                 cache_size: int = 8):
        self.model = model
        self.num_steps = num_steps
        self.progress = progress
        self._cache: OrderedDict[tuple[str, int], Inversion] = OrderedDict()
        self._subspaces: OrderedDict[tuple, tuple] = OrderedDict()  # region_subspaces results, same policy
        self._cache_size = cache_size

    @classmethod
    def from_pretrained(cls, source=None, *, device="cpu", dtype=torch.float32, **kwargs) -> "LocalEditor":
        """Load a model (hub id or local folder; none: the embedded default model) and wrap it; ``kwargs`` go to
        :class:`LocalEditor`. Diffusers' loading chatter is silenced."""
        from localdiff.model import default_model_path

        if source is None:
            source = default_model_path()
            if source is None:
                raise LocalDiffError("this install has no embedded default model; pass a model folder or hub id")
        return cls(load_model(source, device=device, dtype=dtype), **kwargs)

    # ------------------------------------------------------------------ inversion
    def prepare(self, image: ImageLike, *, name: str = "image") -> Tensor:
        """Image -> (1, C, R, R) tensor in [-1, 1] at the model's resolution."""
        if isinstance(image, Tensor) and image.ndim == 4:
            return image
        return load_image(image, self.model.resolution, name=name)

    def invert(self, image: ImageLike, *, num_steps: int | None = None) -> Inversion:
        """DDIM-invert ``image`` and regenerate it unedited (cached per image and step count)."""
        x0 = self.prepare(image)
        steps = num_steps or self.num_steps
        key = (tensor_hash(x0), steps)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        schedule = make_schedule(self.model, steps)
        x_T = ddim_invert(self.model, x0, schedule, progress=self.progress)
        _, xs, hs = ddim_sample(self.model, x_T, schedule, record=True, progress=self.progress)
        inv = Inversion(x0.to(self.model.device, self.model.dtype), x_T, xs, hs, schedule, key[0])
        self._cache[key] = inv
        while len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return inv

    # ------------------------------------------------------------------ discovery
    def prepare_masks(self, masks: Mapping[str, ImageLike], image: ImageLike | None = None) -> dict[str, Tensor]:
        """Validate names and load every mask at the model's resolution (bool (R, R))."""
        if not masks:
            raise LocalDiffError("give at least one region mask (e.g. --mask mouth=mouth.png)")
        size = image_size(image) if image is not None and not isinstance(image, Tensor) else None
        loaded = {check_region_name(n): load_mask(m, self.model.resolution, name=n, image_size=size)
                  for n, m in masks.items()}
        names = list(loaded)
        for i, a in enumerate(names):
            for b in names[i + 1:]:
                inter = float((loaded[a] & loaded[b]).sum())
                union = float((loaded[a] | loaded[b]).sum())
                if inter / union > MAX_MASK_IOU:
                    raise LocalDiffError(
                        f"regions {a!r} and {b!r} have (nearly) the same mask (overlap {inter / union:.0%} of their "
                        f"union); each region needs its own mask, or give the region once")
        return loaded

    def discover(
        self,
        image: ImageLike,
        masks: Mapping[str, ImageLike],
        *,
        method: str = DEFAULTS["method"],
        timestep: float = DEFAULTS["timestep"],
        k: int = DEFAULTS["k"],
        oversample: int = DEFAULTS["oversample"],
        joint_rank: int | str | None = DEFAULTS["joint_rank"],
        individual_rank: int | None = DEFAULTS["individual_rank"],
        rest_block: bool = DEFAULTS["rest_block"],
        null_rank: int = DEFAULTS["null_rank"],
        track: bool = DEFAULTS["track"],
        seed: int = DEFAULTS["seed"],
        max_iter: int = DEFAULTS["max_iter"],
        tol_deg: float = DEFAULTS["tol_deg"],
        chunk_size: int | None = None,
    ) -> Directions:
        """Find each region's local h-space directions.

        ``timestep`` is a fraction of T (1 = pure noise). For each region the top-``k`` right singular vectors of
        the masked Jacobian d(m * eps)/dh are found by subspace iteration (all regions in one batch); then
        ``method`` (see :data:`DISCOVERY_METHODS`) turns them into ``individual_rank`` local directions per
        region (``None``: as many as AJIVE's individual-rank rule finds for ``jive``, at least one and at most
        ``k``; the other methods then keep ``min(3, k)``):

        * ``jive`` (Kouzelis et al., Algorithm 1): removes the ``joint_rank`` directions shared by the regions
          and keeps each region's individual ones. ``joint_rank=None``: AJIVE, with the rank chosen by its bounds
          (directions shared by *all* regions); ``"permutation"``: Lock et al.'s JIVE, with the rank chosen by
          their permutation test (it also counts directions shared by some regions); a number: AJIVE with that
          rank. Give JIVE more singular vectors (``k``, e.g. 16) than it keeps (``individual_rank``, 2-3): shared
          modes sit below each region's top few. ``rest_block`` adds the rest of the image (outside every region)
          as one more block, so that global modes have a block to be joint with.
        * ``masked``: each region's top singular vectors, nothing removed (Haas et al. with a mask).
        * ``nullspace``: each region's top vectors projected off the top ``null_rank`` directions of the
          Jacobian outside it (the LOCO Edit / RBE idea).
        * ``ratio``: in the span of all regions' and the whole image's top-``k`` subspaces, the directions with
          the largest ratio of in-region to out-of-region eps energy (a generalised eigenproblem).

        ``meta["eps_locality"]`` records |m * J v|^2 / |J v|^2 of every kept direction at the discovery timestep.

        With ``track``, the directions are also followed to every other DDIM step: at each step the subspaces are
        warm-started from the neighbouring step's and refined by ``TRACK_ITER`` subspace iterations, the method is
        applied again, and each direction keeps the sign of its neighbour. Edits then apply each step's own
        direction (``Direction.vector_at``).
        """
        if method not in DISCOVERY_METHODS:
            raise LocalDiffError(f"unknown discovery method {method!r}; choose one of {', '.join(DISCOVERY_METHODS)}")
        if not 0.0 < timestep <= 1.0:
            raise LocalDiffError(f"timestep must be a fraction of T in (0, 1], got {timestep}")
        dim = math.prod(self.model.h_shape)
        if not 1 <= k <= min(MAX_K, dim):
            raise LocalDiffError(f"k (singular vectors per region) must be in 1..{min(MAX_K, dim)}, got {k}; 3-16 is usual "
                                 f"(h-space has {dim} dimensions, and the work grows with k)")
        if oversample < 0 or k + oversample > dim:
            raise LocalDiffError(f"oversample must be in 0..{dim - k} (k + oversample at most h-space's {dim} "
                                 f"dimensions), got {oversample}")
        if individual_rank is not None and not 1 <= individual_rank <= k:
            raise LocalDiffError(f"individual rank must be in 1..k={k}, got {individual_rank}")
        if isinstance(joint_rank, str):
            if joint_rank != "permutation":
                raise LocalDiffError(f"joint rank must be a number, None (AJIVE's bounds) or 'permutation' (Lock et "
                                     f"al.'s test), got {joint_rank!r}")
        elif joint_rank is not None and not 0 <= joint_rank < k * len(masks):
            raise LocalDiffError(f"joint rank must be in 0..{k * len(masks) - 1}, got {joint_rank}")
        if not 1 <= null_rank <= min(MAX_K, dim):
            raise LocalDiffError(f"null rank must be in 1..{min(MAX_K, dim)}, got {null_rank}")
        region_masks = self.prepare_masks(masks, image)
        inv = self.invert(image)
        names = list(region_masks)
        region_list = [region_masks[n] for n in names]
        common = dict(timestep=timestep, oversample=oversample, seed=seed, max_iter=max_iter, tol_deg=tol_deg,
                      chunk_size=chunk_size)
        groups = _mask_groups(method, region_list, k=k, null_rank=null_rank, rest_block=rest_block)
        subs, enc, step = {}, None, 0
        for group, group_masks, group_k in groups:
            subs[group], enc_g, step = self.region_subspaces(image, group_masks, k=group_k, **common)
            enc = enc if enc is not None else enc_g
        res = subs["regions"]
        for n, conv, its, err in zip(names, res.converged, res.iterations, res.error_deg):
            if not conv:
                log.warning("region %s: subspace iteration stopped at max_iter=%d, an estimated %.3g deg from "
                            "convergence (tol_deg %.3g); raise max_iter for a tighter subspace", n, its, err, tol_deg)
        model = self.model
        _, jvp, _, out = self._decoder_at(inv, step, chunk_size)
        flat_masks = list(pixel_masks(region_list, out.shape[1], out.double()))
        keep = individual_rank if individual_rank is not None else min(3, k)
        chosen, sigmas, joint, info = _split(method, subs, jvp, flat_masks, keep=keep, individual_rank=individual_rank,
                                             joint_rank=joint_rank, seed=seed, model=model)
        if "ratio" in info:
            info["ratio"] = dict(zip(names, info["ratio"]))
        work = linalg_dtype(model.dtype)
        chosen = [fix_signs(v.to(work)) for v in chosen]
        # every kept direction's eps response at the discovery timestep: its in-region gain and eps-level locality
        eps_loc, gains = _eps_locality(jvp, chosen, flat_masks, names, model)
        if sigmas is None:  # no singular values of their own: the in-region gain |m * J v| plays their part
            sigmas = [gains[n] for n in names]
        per_step: dict[str, Tensor] = {}
        if track:
            tracked = self._track(inv, step, method, groups, subs, chosen, flat_masks, joint_rank=len(joint),
                                  oversample=oversample, seed=seed, chunk_size=chunk_size, model=model)
            order = sorted(tracked)
            per_step = {n: torch.stack([tracked[s_][i] for s_ in order]).cpu() for i, n in enumerate(names)}
            info["per_step_indices"] = order
            info["track_iter"] = TRACK_ITER
        t = inv.schedule.timesteps[step]
        meta = dict(
            model_name=model.name,
            model_fingerprint=model.fingerprint,
            h_shape=list(enc.h.shape[1:]),
            h_norm=float(enc.h.norm()),
            timestep=int(t),
            timestep_fraction=float(timestep),
            step_index=step,
            num_steps=len(inv.schedule),
            method=method,
            k=k,
            oversample=oversample,
            joint_rank=int(len(joint)),
            individual_rank=individual_rank,
            rest_block=bool(rest_block) if method == "jive" else False,
            seed=seed,
            iterations=dict(zip(names, res.iterations)),
            converged=dict(zip(names, res.converged)),
            eps_locality=eps_loc,
            **info,
            source_image_hash=inv.image_hash,
            localdiff_version=_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return Directions(
            per_step=per_step,
            individual=dict(zip(names, chosen)),
            individual_sigma={n: sg.to(work).cpu() for n, sg in zip(names, sigmas)},
            joint=fix_signs(joint.to(work)),
            masks={n: region_masks[n].cpu() for n in names},
            region_sigma={n: res.sigma[i].cpu() for i, n in enumerate(names)},
            meta=meta,
        )

    def _track(self, inv: Inversion, step: int, method: str, groups, subs: dict, chosen: list[Tensor],
               flat_masks: list[Tensor], *, joint_rank: int, oversample: int, seed: int, chunk_size: int | None,
               model) -> dict[int, list[Tensor]]:
        """Follow ``chosen`` (found at ``step``) to every other step of ``inv``'s schedule, outward from ``step``:
        warm-started subspaces, ``TRACK_ITER`` iterations, the same method and counts, signs kept continuous."""
        from tqdm.auto import tqdm

        dim = chosen[0].shape[-1]
        work = linalg_dtype(model.dtype)
        counts = [len(c) for c in chosen]
        tracked = {step: chosen}
        bar = tqdm(total=len(inv.schedule) - 1, desc="tracking directions", disable=not self.progress, leave=False)
        for direction in (-1, 1):
            prev_subs, prev = subs, chosen
            s = step + direction
            while 0 <= s < len(inv.schedule):
                _, jvp, vjp, out = self._decoder_at(inv, s, chunk_size)
                new = {}
                for group, group_masks, group_k in groups:
                    new[group] = subspace_iteration(jvp, vjp, dim, pixel_masks(group_masks, out.shape[1], out),
                                                    group_k, oversample=oversample,
                                                    max_iter=TRACK_ITER, tol_deg=0.0, seed=seed, dtype=model.dtype,
                                                    device=model.device, start=prev_subs[group].vectors)
                found, _, _, _ = _split(method, new, jvp, flat_masks, keep=counts, individual_rank=counts,
                                        joint_rank=joint_rank, seed=seed, model=model)
                found = [f.to(work) for f in found]
                # keep each direction's sign continuous with its neighbour's
                found = [f * torch.where((f * p).sum(-1, keepdim=True) < 0, -1.0, 1.0).to(f)
                         for f, p in zip(found, prev)]
                tracked[s] = found
                prev_subs, prev = new, found
                s += direction
                bar.update(1)
        bar.close()
        return tracked

    def reference_directions(
        self,
        image: ImageLike,
        reference: ImageLike,
        masks: Mapping[str, ImageLike],
        *,
        timestep: float = DEFAULTS["timestep"],
        k: int = DEFAULTS["k"],
        oversample: int = DEFAULTS["oversample"],
        seed: int = DEFAULTS["seed"],
        max_iter: int = DEFAULTS["max_iter"],
        tol_deg: float = DEFAULTS["tol_deg"],
        reference_name: str | None = None,
    ) -> Directions:
        """One direction per region that moves ``image``'s region towards ``reference``'s ("make this mouth like
        that one"; the IJCV extension's reference-guided edit).

        Both images are inverted; at ``timestep`` the difference of their h, h_ref - h_src, is projected onto the
        region's local subspace (the top-``k`` right singular vectors of d(m * eps)/dh on ``image``, what
        ``discover(method="masked")`` computes), which keeps the part of the difference that acts on the region.
        The direction is that projection, normalised; ``meta["reference_strength"][region]`` is the strength at
        which an edit adds the whole projected difference (|P (h_ref - h_src)| / |h_src|). Like any direction it
        can be saved, composed and applied to other images.
        """
        if not 0.0 < timestep <= 1.0:
            raise LocalDiffError(f"timestep must be a fraction of T in (0, 1], got {timestep}")
        dim = math.prod(self.model.h_shape)
        if not 1 <= k <= min(MAX_K, dim):
            raise LocalDiffError(f"k (singular vectors per region) must be in 1..{min(MAX_K, dim)}, got {k}")
        region_masks = self.prepare_masks(masks, image)
        x_src, x_ref = self.prepare(image), self.prepare(reference, name="reference")
        if torch.equal(x_src, x_ref):
            raise LocalDiffError("the reference is the image itself; give another image to move the region towards")
        src, ref = self.invert(x_src), self.invert(x_ref)
        names = list(region_masks)
        res, enc, step = self.region_subspaces(x_src, [region_masks[n] for n in names], timestep=timestep, k=k,
                                               oversample=oversample, seed=seed, max_iter=max_iter, tol_deg=tol_deg)
        work = linalg_dtype(self.model.dtype)
        diff = (ref.hs[step] - src.hs[step]).flatten().to(work)
        unit = float(enc.h.norm())
        chosen, moved, strength = [], [], {}
        for i, n in enumerate(names):
            basis = res.vectors[i].to(work)
            projected = basis.T @ (basis @ diff)
            size = projected.norm()
            if float(size) == 0.0:
                raise LocalDiffError(f"the reference's h does not differ from the image's in region {n!r}'s subspace")
            chosen.append((projected / size)[None])
            moved.append(size[None])
            strength[n] = float(size) / unit
        _, jvp, _, out = self._decoder_at(src, step)
        flat_masks = list(pixel_masks([region_masks[n] for n in names], out.shape[1], out.double()))
        eps_loc, _ = _eps_locality(jvp, chosen, flat_masks, names, self.model)
        meta = dict(
            model_name=self.model.name, model_fingerprint=self.model.fingerprint, h_shape=list(enc.h.shape[1:]),
            h_norm=unit, timestep=int(src.schedule.timesteps[step]), timestep_fraction=float(timestep),
            step_index=step, num_steps=len(src.schedule), method="reference", k=k, oversample=oversample,
            joint_rank=0, individual_rank=1, seed=seed, iterations=dict(zip(names, res.iterations)),
            converged=dict(zip(names, res.converged)), eps_locality=eps_loc, reference_strength=strength,
            reference_image_hash=ref.image_hash, reference_name=reference_name,
            source_image_hash=src.image_hash, localdiff_version=_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        return Directions(
            individual={n: v.cpu() for n, v in zip(names, chosen)},
            individual_sigma={n: m.cpu() for n, m in zip(names, moved)},
            joint=torch.zeros(0, dim, dtype=work),
            masks={n: region_masks[n].cpu() for n in names},
            region_sigma={n: res.sigma[i].cpu() for i, n in enumerate(names)},
            meta=meta,
        )

    def region_subspaces(self, image: ImageLike, masks: Sequence[Tensor], *, timestep: float, k: int,
                         oversample: int = DEFAULTS["oversample"], seed: int = DEFAULTS["seed"],
                         max_iter: int = DEFAULTS["max_iter"], tol_deg: float = DEFAULTS["tol_deg"],
                         chunk_size: int | None = None):
        """Top-``k`` right singular vectors of d(m * eps)/dh for each mask (R, R) at ``timestep`` of ``image``'s
        trajectory, all masks in one batched subspace iteration. Returns ``(SubspaceResult, Encoded, step)``.

        Results are cached per image, masks and settings: rediscovering with other JIVE ranks, or running the
        masked-Jacobian baseline after :meth:`discover`, costs no further Jacobian products."""
        inv = self.invert(image)
        model = self.model
        step = inv.schedule.index_of(timestep)
        key = (inv.image_hash, len(inv.schedule), tensor_hash(torch.stack([m.float().cpu() for m in masks])), step,
               k, oversample, seed, max_iter, tol_deg)
        if key in self._subspaces:
            self._subspaces.move_to_end(key)
            return self._subspaces[key]
        enc, jvp, vjp, out = self._decoder_at(inv, step, chunk_size)
        mask_out = pixel_masks(list(masks), out.shape[1], out)
        res = subspace_iteration(
            jvp, vjp, enc.h[0].numel(), mask_out, k, oversample=oversample, max_iter=max_iter, tol_deg=tol_deg,
            seed=seed, dtype=model.dtype, device=model.device, progress=self.progress,
        )
        self._subspaces[key] = (res, enc, step)
        while len(self._subspaces) > self._cache_size:
            self._subspaces.popitem(last=False)
        return res, enc, step

    def _decoder_at(self, inv: Inversion, step: int, chunk_size: int | None = None):
        """Encode the unedited latent of step ``step`` once; JVP/VJP of h -> eps through the decoder there.
        Returns ``(Encoded, jvp, vjp, eps)``."""
        model = self.model
        with torch.no_grad():
            enc = model.encode(inv.xs[step], inv.schedule.timesteps[step])
        jvp, vjp, out = decoder_operators(lambda h: model.decode(h, enc.skips, enc.temb), enc.h, chunk_size=chunk_size)
        return enc, jvp, vjp, out

    # ------------------------------------------------------------------ editing
    def render(
        self,
        image: ImageLike,
        edits: Sequence[Sequence[Edit]],
        *,
        schedule: str = DEFAULTS["schedule"],
        asymmetric: bool = False,
        timestep: float | None = None,
        allow_foreign: bool = False,
    ) -> Tensor:
        """Regenerate ``image`` once per entry of ``edits`` (a list of (direction, strength) pairs each), batched.

        Returns (B, C, R, R) in [-1, 1]. ``schedule``: ``all`` steps, ``window`` (from T down to the discovery
        timestep) or ``single`` (the discovery timestep only), each direction at its own discovery timestep;
        ``timestep`` overrides the directions' own.
        An entry with no edits (or only zero strengths) is the unedited reconstruction, bit for bit.
        """
        if schedule not in EDIT_SCHEDULES:
            raise LocalDiffError(f"unknown edit schedule {schedule!r}; choose one of {', '.join(EDIT_SCHEDULES)}")
        model = self.model
        h_numel = None
        for edit in edits:
            for direction, strength in edit:
                _check_strength(strength)
                if direction.fingerprint != model.fingerprint and not allow_foreign:
                    raise LocalDiffError(
                        f"direction {direction.name} was discovered with another model (fingerprint "
                        f"{direction.fingerprint}, this one is {model.fingerprint}); pass allow_foreign=True "
                        f"(CLI: --allow-foreign-model) to apply it anyway"
                    )
                h_numel = direction.vector.numel()
        inv = self.invert(image)
        if h_numel is not None and h_numel != inv.hs[0][0].numel():
            raise LocalDiffError(
                f"directions have {h_numel} h-space dimensions but this model's h has {inv.hs[0][0].numel()}"
            )
        # Each direction is applied at the steps its own discovery timestep (or ``timestep``) selects, so edits
        # composed from directions found at different timesteps each keep their own window.
        shape = inv.hs[0].shape[1:]
        per_step: dict[int, Tensor] = {}
        for b, edit in enumerate(edits):
            for direction, strength in edit:
                if strength == 0:
                    continue
                if direction.per_step is not None and direction.num_steps != len(inv.schedule):
                    raise LocalDiffError(
                        f"direction {direction.name} was tracked over {direction.num_steps} DDIM steps; edit with "
                        f"the same number of steps (--steps {direction.num_steps}), or rediscover without tracking")
                frac = timestep if timestep is not None else direction.timestep_fraction
                for i in edit_steps(inv.schedule, schedule, inv.schedule.index_of(frac)):
                    if i not in per_step:
                        per_step[i] = torch.zeros(len(edits), *shape, device=model.device, dtype=model.dtype)
                    v = direction.vector_at(i).to(model.device, model.dtype).reshape(shape)
                    per_step[i][b] += float(strength) * direction.unit * v
        result = inv.reconstruction.expand(len(edits), -1, -1, -1).clone()
        if not per_step:
            return result
        edited = torch.stack([d.flatten(1).ne(0).any(dim=1) for d in per_step.values()]).any(dim=0)
        if not edited.any():  # rows with no offset *are* the reconstruction
            return result
        start = min(per_step)  # before the first edited step the trajectory is the cached one
        active = {i: d[edited] for i, d in per_step.items()}

        def delta_h(i: int):
            return active.get(i)

        x_start = inv.xs[start].expand(int(edited.sum()), -1, -1, -1)
        out, _, _ = ddim_sample(model, x_start, inv.schedule, start=start, delta_h=delta_h, asymmetric=asymmetric,
                                progress=self.progress)
        result[edited] = out
        return result

    def edit(self, image: ImageLike, direction: Direction | Sequence[Edit], strength: float | None = None,
             **kwargs) -> Image.Image:
        """Edit ``image`` along ``direction`` by ``strength``, or along several ``[(direction, strength), ...]``.

        Returns a PIL image at the model's resolution. Keyword arguments go to :meth:`render`.
        """
        if isinstance(direction, Direction):
            if strength is None:
                raise LocalDiffError("give a strength for the edit, e.g. strength=0.5")
            edits = [(direction, strength)]
        else:
            edits = list(direction)
        return to_pil(self.render(image, [edits], **kwargs)[0])

    def sweep(self, image: ImageLike, direction: Direction, strengths: Sequence[float], **kwargs) -> Tensor:
        """The image edited at each of ``strengths`` (batched): (len(strengths), C, R, R) in [-1, 1]."""
        return self.render(image, [[(direction, s)] for s in strengths], **kwargs)

    def responses(self, image: ImageLike, vectors: Tensor, timestep: float) -> Tensor:
        """J v for h-space vectors (m, d) at ``timestep`` on ``image``'s trajectory: eps responses (m, C, R, R)."""
        inv = self.invert(image)
        _, jvp, _, out = self._decoder_at(inv, inv.schedule.index_of(timestep))
        return jvp(vectors.to(self.model.device, self.model.dtype)).reshape(len(vectors), *out.shape[1:])


# ---------------------------------------------------------------------- helpers
def _check_strength(strength: float) -> None:
    s = float(strength)
    if s != s or s in (float("inf"), float("-inf")):
        raise LocalDiffError(f"strength must be a finite number, got {strength}")


def _version() -> str:
    from localdiff import __version__

    return __version__
