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
from dataclasses import dataclass, fields
from datetime import datetime, timezone
from typing import Mapping, Sequence

import torch
from torch import Tensor

from localdiff import config as _config_module
from localdiff.config import (EDIT_SCHEDULE, NUM_INFERENCE_STEPS, DiscoveryConfig, timestep_fraction,
                              warn_renamed)
from localdiff.directions import Direction, Directions, check_region_name
from localdiff.errors import LocalDiffError
from localdiff.images import ImageLike, image_size, load_image, tensor_hash, to_pil
from localdiff.masks import load_mask, pixel_masks
from localdiff.jacobian import (decoder_operators, fix_signs, linalg_dtype, locality_ratio, orthonormal_rows,
                                project_out, subspace_iteration)
from localdiff.jive import ajive, jive
from localdiff.model import DiffusionModel, load_model
from localdiff.reference import (BASIS_RANK_FACTOR, FIT_ITERATIONS, FIT_METHODS, OUTSIDE_WEIGHT, check_min_locality,
                                 fit_coefficients, fit_local_coefficients, orthonormal_basis, reference_target)
from localdiff.sampling import EDIT_SCHEDULES, Schedule, ddim_invert, ddim_sample, edit_steps, make_schedule

log = logging.getLogger("localdiff")


def __getattr__(name: str):
    """The settings of localdiff 0.1 that moved to :mod:`localdiff.config`, kept for one release."""
    if name == "DEFAULTS":
        warn_renamed("localdiff.editor.DEFAULTS", "localdiff.DiscoveryConfig() (and NUM_INFERENCE_STEPS, "
                     "EDIT_SCHEDULE in localdiff.config)")
        return dict(num_steps=NUM_INFERENCE_STEPS, schedule=EDIT_SCHEDULE, **DiscoveryConfig().as_dict())
    if name == "FAST_DISCOVERY":
        warn_renamed("localdiff.editor.FAST_DISCOVERY", "localdiff.DiscoveryConfig.fast()")
        return DiscoveryConfig.fast().changes()
    if name in ("DISCOVERY_METHODS", "EDIT_RANGE", "MAX_K"):
        warn_renamed(f"localdiff.editor.{name}", f"localdiff.config.{name}")
        return getattr(_config_module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Samples for AJIVE's two bounds in discovery. Measured on three (3, 16384) blocks: 200 samples put both bounds
# within 0.1 % of 1,000 samples' (AJIVE's published default) in 0.9 s instead of 4.0 s on 2 cores.
AJIVE_SAMPLES = 200
# Subspace iterations per step when directions are tracked from step to step (discover(track=True)). Measured on
# the test model (masked method, 10 steps): after 1 iteration the tracked direction is 35-68 deg from a cold
# discovery at that step, after 3 it is 2-12 deg.
TRACK_ITER = 3
# Two regions whose masks overlap more than this (intersection over union) are the same region twice: JIVE's
# "local" directions would then be noise.
MAX_MASK_IOU = 0.95
OUTPUT_TYPES = ("pil", "pt", "np")

Edit = tuple[Direction, float]


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



@dataclass(frozen=True)
class EditOptions:
    """How an edit is rendered (the keyword options of :meth:`LocalEditor.render`, ``edit`` and ``sweep``)."""

    schedule: str = EDIT_SCHEDULE  # DDIM steps that get the edit: all, window or single
    asymmetric: bool = False  # Asyrp's step: the edited eps forms only the x0 term
    timestep: int | float | None = None  # where window/single edits end (default: each direction's own)
    allow_foreign: bool = False  # apply directions discovered with another model
    num_inference_steps: int | None = None  # DDIM steps (default: the editor's)

    @classmethod
    def of(cls, options: Mapping) -> "EditOptions":
        names = [f.name for f in fields(cls)]
        unknown = [k for k in options if k not in names]
        if unknown:
            raise LocalDiffError(f"unknown edit option {unknown[0]!r}; the options are {', '.join(names)}")
        return cls(**options)


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

    def __init__(self, model: DiffusionModel, *, num_inference_steps: int = NUM_INFERENCE_STEPS,
                 progress: bool = False, cache_size: int = 8, num_steps: int | None = None):
        if num_steps is not None:
            warn_renamed("LocalEditor(num_steps=...)", "num_inference_steps=...")
            num_inference_steps = num_steps
        self.model = model
        self.num_inference_steps = num_inference_steps
        self.progress = progress
        self._cache: OrderedDict[tuple[str, int], Inversion] = OrderedDict()
        self._subspaces: OrderedDict[tuple, tuple] = OrderedDict()  # region_subspaces results, same policy
        self._cache_size = cache_size

    @property
    def num_steps(self) -> int:
        """Deprecated name of :attr:`num_inference_steps`."""
        warn_renamed("LocalEditor.num_steps", "LocalEditor.num_inference_steps")
        return self.num_inference_steps

    @classmethod
    def from_pretrained(cls, source=None, *, torch_dtype: torch.dtype = torch.float32, device="cpu",
                        dtype: torch.dtype | None = None, **kwargs) -> "LocalEditor":
        """Load a model (hub id or local folder; none: the embedded default model) and wrap it, as diffusers'
        ``from_pretrained`` does: ``torch_dtype`` for the weights, ``device`` to run on. ``kwargs`` go to
        :class:`LocalEditor` (``num_inference_steps``, ``progress``). Diffusers' loading chatter is silenced."""
        from localdiff.model import default_model_path

        if dtype is not None:
            warn_renamed("LocalEditor.from_pretrained(dtype=...)", "torch_dtype=...")
            torch_dtype = dtype
        if source is None:
            source = default_model_path()
            if source is None:
                raise LocalDiffError("this install has no embedded default model; pass a model folder or hub id")
        return cls(load_model(source, device=device, torch_dtype=torch_dtype), **kwargs)

    # ------------------------------------------------------------------ inversion
    def prepare(self, image: ImageLike, *, name: str = "image") -> Tensor:
        """Image -> (1, C, R, R) tensor in [-1, 1] at the model's resolution."""
        if isinstance(image, Tensor) and image.ndim == 4:
            return image
        return load_image(image, self.model.resolution, name=name)

    def clear_cache(self, *, inversions: bool = True) -> None:
        """Forget the cached Jacobian subspaces and, with ``inversions``, the cached inversions (to free memory, or
        to time a discovery from a cold start)."""
        self._subspaces.clear()
        if inversions:
            self._cache.clear()

    def invert(self, image: ImageLike, *, num_inference_steps: int | None = None,
               num_steps: int | None = None) -> Inversion:
        """DDIM-invert ``image`` and regenerate it unedited (cached per image and step count)."""
        if num_steps is not None:
            warn_renamed("invert(num_steps=...)", "num_inference_steps=...")
            num_inference_steps = num_steps
        x0 = self.prepare(image)
        steps = num_inference_steps or self.num_inference_steps
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
        config: DiscoveryConfig | None = None,
        *,
        generator: torch.Generator | None = None,
        **settings,
    ) -> Directions:
        """Find each region's local h-space directions.

        ``config`` (default: ``DiscoveryConfig()``) holds the settings; keywords named like its fields override
        it (``discover(image, masks, method="masked", k=4)``). ``timestep`` is an integer t (0 .. T-1) or a
        fraction of T (1 = pure noise). ``generator`` (a ``torch.Generator``), when given, draws the seed of the
        subspace iteration's random start instead of ``seed``; the seed used is in ``meta["seed"]``.

        ``image`` may be a list of images (or a batch of more than one): the directions are then discovered
        jointly over them, from the stacked Jacobians [J_1; J_2; ...] of one h offset shared by all the images
        (the same masks on each; ``unit`` is their mean |h|), for edits that transfer across a set of aligned
        images. For each region the top-``k`` right singular vectors of
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
        cfg = _config(config, settings, generator)
        timestep = cfg.check(math.prod(self.model.h_shape), len(masks), self.model.num_train_timesteps)
        method, k, oversample, joint_rank = cfg.method, cfg.k, cfg.oversample, cfg.joint_rank
        individual_rank, rest_block, null_rank, track = cfg.individual_rank, cfg.rest_block, cfg.null_rank, cfg.track
        seed, max_iter, tol_deg, chunk_size = cfg.seed, cfg.max_iter, cfg.tol_deg, cfg.chunk_size
        invs = self._inversions(image)
        if track and len(invs) > 1:
            raise LocalDiffError("directions discovered jointly over several images cannot be tracked yet; discover "
                                 "without track, or track on one image")
        region_masks = self.prepare_masks(masks, image[0] if _is_many(image) else image)
        inv = invs[0]
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
        _, jvp, _, out = self._decoder_at(invs, step, chunk_size)
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
            h_norm=float(enc.h.norm()) if len(invs) == 1 else sum(float(i.hs[step].norm()) for i in invs) / len(invs),
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
            source_image_hash="+".join(i.image_hash for i in invs),
            images=len(invs),
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
        config: DiscoveryConfig | None = None,
        *,
        fit: str = "measured",
        outside_weight: float = OUTSIDE_WEIGHT,
        fit_iterations: int = FIT_ITERATIONS,
        min_locality: float | None = None,
        basis_rank: int | None = None,
        generator: torch.Generator | None = None,
        reference_name: str | None = None,
        **settings,
    ) -> Directions:
        """One direction per region that moves ``image``'s region towards ``reference``'s ("make this mouth like
        that one"; the IJCV extension's reference-guided edit).

        Both images are inverted. ``fit="measured"`` (the default) searches the region's local directions (those
        :meth:`discover` finds with ``config``, and the top ``basis_rank`` right singular vectors of d(m * eps)/dh,
        by default 3 ``k``: a larger basis leaves the fit more ways to keep the change inside) for the
        edit whose regeneration brings the region closest to the reference's reconstruction while keeping the
        rest of the image, each outside pixel weighted ``outside_weight`` against an inside one
        (:mod:`localdiff.reference`): ``fit_iterations`` Gauss-Newton iterations, each one batched render of
        (basis size + 1) images with the editor's ``num_inference_steps`` and the default edit options.
        ``min_locality`` (in [0, 1)) keeps only edits whose rendered change has at least that share of its squared
        change inside the region (the image locality, measured on the fit's renders): first in the whole basis,
        then among the combinations that local to first order (:func:`localdiff.reference.fit_local_coefficients`).
        The edits are more local and move the region less far; a warning says when none is local enough (the most
        local one is used). ``meta["fit"][region]`` then records the first-order localities, the combinations
        used (``kept``) and the ``locality`` reached.
        ``fit="projected"`` is the paper's cheap version: the h difference h_ref - h_src at ``timestep``
        projected onto the region's top-``k`` subspace (on the embedded model it barely moves the region
        towards the reference, docs/automatic_regions.md).

        The direction is the unit vector of the edit; ``meta["reference_strength"][region]`` is the strength at
        which it makes the fitted edit (the whole projected difference for ``projected``). Like any direction it
        can be saved, composed and applied to other images. ``config`` (and the keyword ``settings``) are the
        discovery settings of the basis (``method``, ``timestep``, ``k``, ...).
        """
        if fit not in FIT_METHODS:
            raise LocalDiffError(f"unknown reference fit {fit!r}; choose one of {', '.join(FIT_METHODS)}")
        if min_locality is not None and fit != "measured":
            raise LocalDiffError("min_locality constrains the measured fit; drop it or use fit='measured'")
        if min_locality is not None:
            check_min_locality(min_locality)  # before the inversions
        if basis_rank is not None and fit != "measured":
            raise LocalDiffError("basis_rank sizes the measured fit's basis; drop it or use fit='measured'")
        cfg = _config(config, settings, generator)
        h_dim = math.prod(self.model.h_shape)
        top = min(_config_module.MAX_K, h_dim - cfg.oversample)  # the largest subspace h-space has room for
        if basis_rank is None:
            rank = min(BASIS_RANK_FACTOR * cfg.k, top) if fit == "measured" else cfg.k
        elif isinstance(basis_rank, bool) or not isinstance(basis_rank, int) or not 1 <= basis_rank <= top:
            raise LocalDiffError(f"basis_rank must be an integer in 1..{top} (with oversample {cfg.oversample}, in "
                                 f"h-space's {h_dim} dimensions), got {basis_rank!r}")
        else:
            rank = basis_rank
        region_masks = self.prepare_masks(masks, image)
        x_src, x_ref = self.prepare(image), self.prepare(reference, name="reference")
        if torch.equal(x_src, x_ref):
            raise LocalDiffError("the reference is the image itself; give another image to move the region towards")
        src, ref = self.invert(x_src), self.invert(x_ref)
        names = list(region_masks)
        if fit == "measured":
            # the basis: the method's local directions of every region, then each region's masked subspace
            found = self.discover(x_src, region_masks, cfg.replace(track=False))
            timestep = float(found.meta["timestep_fraction"])
        else:
            timestep = cfg.replace(individual_rank=None, joint_rank=None).check(
                h_dim, len(masks), self.model.num_train_timesteps)
        res, enc, step = self.region_subspaces(x_src, [region_masks[n] for n in names], timestep=timestep,
                                               k=rank, oversample=cfg.oversample, seed=cfg.seed,
                                               max_iter=cfg.max_iter, tol_deg=cfg.tol_deg, chunk_size=cfg.chunk_size)
        work = linalg_dtype(self.model.dtype)
        unit = float(enc.h.norm())
        chosen, moved, strength, fitted = [], [], {}, {}
        diff = (ref.hs[step] - src.hs[step]).flatten().to(work) if fit == "projected" else None
        for i, n in enumerate(names):
            subspace = res.vectors[i].to(work)
            if fit == "projected":
                v = subspace.T @ (subspace @ diff)
                size = float(v.norm()) / unit
            else:
                basis = orthonormal_basis(torch.cat([found.individual[n].to(subspace), subspace]))
                target, weights = reference_target(src.reconstruction[0], ref.reconstruction[0], region_masks[n],
                                                   outside_weight)

                def render(rows, b=basis, r=n):
                    return self.render(x_src, [self._combination(r, b, row, unit, timestep) for row in rows])

                if min_locality is None:
                    coef, history = fit_coefficients(render, len(basis), target, weights, iterations=fit_iterations)
                    fitted[n] = {}
                else:
                    coef, history, lam, kept, reached = fit_local_coefficients(
                        render, len(basis), target, weights, region_masks[n], min_locality, iterations=fit_iterations)
                    fitted[n] = dict(localities=[round(float(x), 4) for x in lam], kept=kept, locality=reached)
                    if reached < min_locality:
                        log.warning("region %s: no edit the fit tried is %.2f local; the most local one (%.2f) is "
                                    "used", n, min_locality, reached)
                v = coef.to(basis) @ basis
                size = float(v.norm())
                # with min_locality the last objective is the returned edit's (earlier ones may not be local enough)
                improved = (history[-1] if min_locality is not None else min(history[1:])) < history[0]
                fitted[n].update(basis_size=len(basis), objective=history, improved=improved)
                if not improved and min_locality is not None:
                    log.warning("region %s: the edit brings it no closer to the reference (none that local does)", n)
                elif not improved:
                    log.warning("region %s: no edit in its %d local directions brings it closer to the reference; "
                                "the direction is the linearised fit's first step", n, len(basis))
            if size == 0.0:
                raise LocalDiffError(f"the reference's region {n!r} gives no edit: its h does not differ from the "
                                     "image's in the region's subspace")
            chosen.append((v / v.norm())[None])
            moved.append(torch.tensor([size], dtype=work, device="cpu"))
            strength[n] = size
        _, jvp, _, out = self._decoder_at(src, step, cfg.chunk_size)
        flat_masks = list(pixel_masks([region_masks[n] for n in names], out.shape[1], out.double()))
        eps_loc, _ = _eps_locality(jvp, chosen, flat_masks, names, self.model)
        meta = dict(
            model_name=self.model.name, model_fingerprint=self.model.fingerprint, h_shape=list(enc.h.shape[1:]),
            h_norm=unit, timestep=int(src.schedule.timesteps[step]), timestep_fraction=float(timestep),
            step_index=step, num_steps=len(src.schedule), method="reference", reference_fit=fit,
            basis_method=cfg.method if fit == "measured" else "masked", k=cfg.k, oversample=cfg.oversample,
            joint_rank=0, individual_rank=1, seed=cfg.seed, iterations=dict(zip(names, res.iterations)),
            converged=dict(zip(names, res.converged)), eps_locality=eps_loc, reference_strength=strength,
            reference_image_hash=ref.image_hash, reference_name=reference_name,
            source_image_hash=src.image_hash, localdiff_version=_version(),
            created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        )
        if fit == "measured":
            meta.update(outside_weight=float(outside_weight), fit_iterations=int(fit_iterations), fit=fitted,
                        min_locality=min_locality, basis_rank=rank)
        return Directions(
            individual={n: v.cpu() for n, v in zip(names, chosen)},
            individual_sigma={n: m.cpu() for n, m in zip(names, moved)},
            joint=torch.zeros(0, res.vectors.shape[-1], dtype=work, device="cpu"),
            masks={n: region_masks[n].cpu() for n in names},
            region_sigma={n: res.sigma[i].cpu() for i, n in enumerate(names)},
            meta=meta,
        )

    def _combination(self, region: str, basis: Tensor, coefficients: Tensor, unit: float,
                     timestep: float) -> list[Edit]:
        """The edit ``coefficients @ basis`` as one (direction, strength) pair; no coefficients: no edit."""
        v = coefficients.to(basis) @ basis
        size = float(v.norm())
        if size == 0.0:
            return []
        model = self.model
        return [(Direction(region, 0, (v / size).to(model.dtype), 1.0, unit, model.fingerprint, timestep), size)]

    def region_subspaces(self, image: ImageLike, masks: Sequence[Tensor], *, timestep: float, k: int,
                         oversample: int = DiscoveryConfig.oversample, seed: int = DiscoveryConfig.seed,
                         max_iter: int = DiscoveryConfig.max_iter, tol_deg: float = DiscoveryConfig.tol_deg,
                         chunk_size: int | None = None):
        """Top-``k`` right singular vectors of d(m * eps)/dh for each mask (R, R) at ``timestep`` (a fraction of T)
        of ``image``'s
        trajectory, all masks in one batched subspace iteration. Returns ``(SubspaceResult, Encoded, step)``.

        Results are cached per image, masks and settings: rediscovering with other JIVE ranks, or running the
        masked-Jacobian baseline after :meth:`discover`, costs no further Jacobian products."""
        invs = self._inversions(image)
        inv = invs[0]
        model = self.model
        step = inv.schedule.index_of(timestep)
        key = ("+".join(i.image_hash for i in invs), len(inv.schedule), tensor_hash(torch.stack([m.float().cpu() for m in masks])), step,
               k, oversample, seed, max_iter, tol_deg)
        if key in self._subspaces:
            self._subspaces.move_to_end(key)
            return self._subspaces[key]
        enc, jvp, vjp, out = self._decoder_at(invs, step, chunk_size)
        mask_out = pixel_masks(list(masks), out.shape[1], out)
        res = subspace_iteration(
            jvp, vjp, enc.h[0].numel(), mask_out, k, oversample=oversample, max_iter=max_iter, tol_deg=tol_deg,
            seed=seed, dtype=model.dtype, device=model.device, progress=self.progress,
        )
        self._subspaces[key] = (res, enc, step)
        while len(self._subspaces) > self._cache_size:
            self._subspaces.popitem(last=False)
        return res, enc, step

    def _inversions(self, image) -> list[Inversion]:
        """One image, or several (a list, or a batch of more than one) for joint discovery: their inversions."""
        if not _is_many(image):
            return [self.invert(image)]
        return [self.invert(im[None] if isinstance(image, Tensor) else im) for im in image]

    def _decoder_at(self, inv: Inversion | Sequence[Inversion], step: int, chunk_size: int | None = None):
        """Encode the unedited latent of step ``step`` once; JVP/VJP of h -> eps through the decoder there.
        Returns ``(Encoded, jvp, vjp, eps)``.

        Several inversions give the stacked Jacobian [J_1; J_2; ...] of one shared h offset (joint discovery):
        ``jvp`` concatenates the images' responses, ``vjp`` sums the images' pullbacks, ``eps`` is the images'
        noise predictions side by side along the channels (so the masks tile over them) and the ``Encoded`` is
        the first image's."""
        model = self.model
        invs = [inv] if isinstance(inv, Inversion) else list(inv)
        ops = []
        for one in invs:
            with torch.no_grad():
                enc = model.encode(one.xs[step], one.schedule.timesteps[step])
            ops.append((enc, *decoder_operators(lambda h, e=enc: model.decode(h, e.skips, e.temb), enc.h,
                                                chunk_size=chunk_size)))
        if len(ops) == 1:
            return ops[0]
        encs, jvps, vjps, outs = zip(*ops)
        sizes = [o.numel() for o in outs]

        def jvp(vs: Tensor) -> Tensor:
            return torch.cat([f(vs) for f in jvps], dim=1)

        def vjp(us: Tensor) -> Tensor:
            parts = us.split(sizes, dim=1)
            total = vjps[0](parts[0].contiguous())
            for f, u in zip(vjps[1:], parts[1:]):
                total = total + f(u.contiguous())
            return total

        return encs[0], jvp, vjp, torch.cat(outs, dim=1)

    # ------------------------------------------------------------------ editing
    def render(self, image: ImageLike, edits: Sequence[Sequence[Edit]], **options) -> Tensor:
        """Regenerate ``image`` once per entry of ``edits`` (a list of (direction, strength) pairs each), batched.

        Returns (B, C, R, R) in [-1, 1]. ``options`` (:class:`EditOptions`): ``schedule`` ``all`` steps,
        ``window`` (from T down to the discovery timestep) or ``single`` (the discovery timestep only), each
        direction at its own discovery timestep; ``timestep`` (an integer t or a fraction of T) overrides the
        directions' own; ``asymmetric`` (Asyrp's step); ``allow_foreign`` (directions of another model);
        ``num_inference_steps`` (default: the editor's).
        An entry with no edits (or only zero strengths) is the unedited reconstruction, bit for bit.
        """
        o = EditOptions.of(options)
        schedule, asymmetric, timestep = o.schedule, o.asymmetric, o.timestep
        num_inference_steps, allow_foreign = o.num_inference_steps, o.allow_foreign
        self._check_edits(edits, schedule, allow_foreign)
        inv = self.invert(image, num_inference_steps=num_inference_steps)
        per_step = self._offsets(edits, inv.schedule, schedule, timestep, inv.hs[0].shape[1:])
        result = inv.reconstruction.expand(len(edits), -1, -1, -1).clone()
        if not per_step:
            return result
        edited = torch.stack([d.flatten(1).ne(0).any(dim=1) for d in per_step.values()]).any(dim=0)
        if not edited.any():  # rows with no offset *are* the reconstruction
            return result
        start = min(per_step)  # before the first edited step the trajectory is the cached one
        active = {i: d[edited] for i, d in per_step.items()}
        x_start = inv.xs[start].expand(int(edited.sum()), -1, -1, -1)
        out, _, _ = ddim_sample(self.model, x_start, inv.schedule, start=start, delta_h=active.get,
                                asymmetric=asymmetric, progress=self.progress)
        result[edited] = out
        return result

    def render_images(self, images: Tensor, edits: Sequence[Edit], **options) -> Tensor:
        """Apply the same ``edits`` to a batch of images (B, C, R, R) in [-1, 1]: one batched inversion and one
        batched edited regeneration through the U-Net (no unedited regeneration, no cache: the path for folders
        of images). ``options`` as for :meth:`render`. Returns (B, C, R, R) in [-1, 1]; each row matches
        :meth:`render` of that image to float rounding (the batch changes the order of some sums)."""
        if not isinstance(images, Tensor) or images.ndim != 4:
            raise LocalDiffError("render_images takes a (B, C, R, R) tensor; load images with LocalEditor.prepare")
        o = EditOptions.of(options)
        schedule, asymmetric, timestep = o.schedule, o.asymmetric, o.timestep
        num_inference_steps, allow_foreign = o.num_inference_steps, o.allow_foreign
        self._check_edits([edits], schedule, allow_foreign)
        model = self.model
        sched = make_schedule(model, num_inference_steps or self.num_inference_steps)
        x_T = ddim_invert(model, images, sched, progress=self.progress)
        per_step = self._offsets([edits], sched, schedule, timestep, model.h_shape)
        out, _, _ = ddim_sample(model, x_T, sched, delta_h=per_step.get, asymmetric=asymmetric,
                                progress=self.progress)
        return out

    def _check_edits(self, edits: Sequence[Sequence[Edit]], schedule: str, allow_foreign: bool) -> None:
        if schedule not in EDIT_SCHEDULES:
            raise LocalDiffError(f"unknown edit schedule {schedule!r}; choose one of {', '.join(EDIT_SCHEDULES)}")
        model = self.model
        dim = math.prod(model.h_shape)
        for edit in edits:
            for direction, strength in edit:
                _check_strength(strength)
                if direction.fingerprint != model.fingerprint and not allow_foreign:
                    raise LocalDiffError(
                        f"direction {direction.name} was discovered with another model (fingerprint "
                        f"{direction.fingerprint}, this one is {model.fingerprint}); pass allow_foreign=True "
                        f"(CLI: --allow-foreign-model) to apply it anyway"
                    )
                if direction.vector.numel() != dim:
                    raise LocalDiffError(f"directions have {direction.vector.numel()} h-space dimensions but this "
                                         f"model's h has {dim}")

    def _offsets(self, edits: Sequence[Sequence[Edit]], sched: Schedule, kind: str, timestep: int | float | None,
                 shape) -> dict[int, Tensor]:
        """Per DDIM step, the h offsets of each entry of ``edits`` (len(edits), *shape); steps with none are absent.

        Each direction is applied at the steps its own discovery timestep (or ``timestep``) selects, so edits
        composed from directions found at different timesteps each keep their own window."""
        model = self.model
        override = None if timestep is None else timestep_fraction(timestep, model.num_train_timesteps)
        per_step: dict[int, Tensor] = {}
        for b, edit in enumerate(edits):
            for direction, strength in edit:
                if strength == 0:
                    continue
                if direction.per_step is not None and direction.num_steps != len(sched):
                    raise LocalDiffError(
                        f"direction {direction.name} was tracked over {direction.num_steps} DDIM steps; edit with "
                        f"the same number of steps (--steps {direction.num_steps}), or rediscover without tracking")
                frac = override if override is not None else direction.timestep_fraction
                for i in edit_steps(sched, kind, sched.index_of(frac)):
                    if i not in per_step:
                        per_step[i] = torch.zeros(len(edits), *shape, device=model.device, dtype=model.dtype)
                    v = direction.vector_at(i).to(model.device, model.dtype).reshape(shape)
                    per_step[i][b] += float(strength) * direction.unit * v
        return per_step

    def edit(self, image: ImageLike | Sequence[ImageLike], direction: Direction | Sequence[Edit],
             strength: float | None = None, *, output_type: str = "pil", **kwargs):
        """Edit ``image`` along ``direction`` by ``strength``, or along several ``[(direction, strength), ...]``.

        ``image`` may also be a list of images (or a (B, C, R, R) batch): they are edited together, batched
        through the U-Net (:meth:`render_images`), and a list (or batch) comes back.
        ``output_type`` (as in diffusers): ``"pil"`` a PIL image at the model's resolution, ``"pt"`` a float
        tensor (C, R, R) in [0, 1], ``"np"`` a float array (R, R, C) in [0, 1]. Keyword arguments go to
        :meth:`render` (``schedule``, ``asymmetric``, ``timestep``, ``allow_foreign``, ``num_inference_steps``).
        """
        if isinstance(direction, Direction):
            if strength is None:
                raise LocalDiffError("give a strength for the edit, e.g. strength=0.5")
            edits = [(direction, strength)]
        else:
            edits = list(direction)
        _check_output_type(output_type)
        if _is_many(image):
            batch = image if isinstance(image, Tensor) else torch.cat([self.prepare(im) for im in image])
            return _output(self.render_images(batch, edits, **kwargs), output_type)
        return _output(self.render(image, [edits], **kwargs), output_type)[0]

    def sweep(self, image: ImageLike, direction: Direction, strengths: Sequence[float], *, output_type: str = "pil",
              **kwargs):
        """The image edited at each of ``strengths`` (batched): a list of PIL images (``output_type="pil"``), or
        a (len(strengths), C, R, R) tensor (``"pt"``) / (len(strengths), R, R, C) array (``"np"``) in [0, 1].
        Keyword arguments go to :meth:`render`."""
        _check_output_type(output_type)
        return _output(self.render(image, [[(direction, s)] for s in strengths], **kwargs), output_type)

    def responses(self, image: ImageLike, vectors: Tensor, timestep: int | float) -> Tensor:
        """J v for h-space vectors (m, d) at ``timestep`` on ``image``'s trajectory: eps responses (m, C, R, R)."""
        inv = self.invert(image)
        frac = timestep_fraction(timestep, self.model.num_train_timesteps)
        _, jvp, _, out = self._decoder_at(inv, inv.schedule.index_of(frac))
        return jvp(vectors.to(self.model.device, self.model.dtype)).reshape(len(vectors), *out.shape[1:])


# ---------------------------------------------------------------------- helpers
def _config(config: DiscoveryConfig | None, settings: dict, generator: torch.Generator | None) -> DiscoveryConfig:
    """``config`` with keyword ``settings`` applied; with a ``generator``, the seed drawn from it."""
    if config is not None and not isinstance(config, DiscoveryConfig):
        raise LocalDiffError(f"config must be a DiscoveryConfig, got {type(config).__name__}; pass settings as "
                             f"keywords (e.g. method='masked') or DiscoveryConfig(...)")
    cfg = (config or DiscoveryConfig()).replace(**settings)
    if generator is not None:
        cfg = cfg.replace(seed=int(torch.randint(0, 2**31 - 1, (1,), generator=generator)))
    return cfg


def _is_many(image) -> bool:
    return isinstance(image, (list, tuple)) or (isinstance(image, Tensor) and image.ndim == 4 and len(image) > 1)


def _check_output_type(output_type: str) -> None:
    if output_type not in OUTPUT_TYPES:
        raise LocalDiffError(f"output_type must be one of {', '.join(OUTPUT_TYPES)} (as in diffusers), got {output_type!r}")


def _output(x: Tensor, output_type: str):
    """A (B, C, R, R) batch in [-1, 1] as diffusers pipelines return images: ``pil`` a list of PIL images, ``pt``
    a float tensor in [0, 1], ``np`` a float array (B, R, R, C) in [0, 1]."""
    if output_type == "pil":
        return to_pil(x)
    unit = ((x.float() + 1) / 2).clamp(0, 1)
    return unit.cpu() if output_type == "pt" else unit.permute(0, 2, 3, 1).cpu().numpy()


def _check_strength(strength: float) -> None:
    s = float(strength)
    if s != s or s in (float("inf"), float("-inf")):
        raise LocalDiffError(f"strength must be a finite number, got {strength}")


def _version() -> str:
    from localdiff import __version__

    return __version__
