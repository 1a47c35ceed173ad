"""h-space methods: localdiff (JIVE), the masked Jacobian alone, null-space projection, and global PCA."""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor
from tqdm.auto import tqdm

from localdiff.baselines import MethodDirections, most_local, picked_first
from localdiff.config import JIVE_ONLY, DiscoveryConfig
from localdiff.editor import LocalEditor
from localdiff.images import ImageLike
from localdiff.sampling import ddim_sample, initial_noise, make_schedule


def _discovered(method: str):
    def run(editor: LocalEditor, image: ImageLike, masks: Mapping[str, Tensor], **settings) -> MethodDirections:
        """``settings``: :class:`DiscoveryConfig` fields (others, and JIVE's own for the other methods, are
        ignored, so that one evaluation can give ``joint_rank`` to all)."""
        skip = {"method"} | (set(JIVE_ONLY) if method != "jive" else set())
        cfg = DiscoveryConfig(method=method).replace(
            **{key: value for key, value in settings.items() if key in DiscoveryConfig.names() and key not in skip})
        dirs = editor.discover(image, masks, cfg)
        timestep = dirs.meta["timestep_fraction"]
        info = {key: dirs.meta[key] for key in ("joint_rank", "null_rank", "eps_locality") if key in dirs.meta}
        md = MethodDirections(method, "h", {r: v.cpu() for r, v in dirs.individual.items()}, timestep, dirs.unit,
                              dirs.fingerprint, info=info)
        if dirs.per_step:
            md.per_step, md.steps = dict(dirs.per_step), list(dirs.meta["per_step_indices"])
            md.num_steps = int(dirs.meta["num_steps"])
        return md

    run.__name__ = f"{method}_directions"
    run.__doc__ = f":meth:`LocalEditor.discover` with ``method={method!r}``: the regions' local directions."
    return run


jive_directions = _discovered("jive")  # localdiff: masked Jacobian subspaces + AJIVE (Kouzelis et al.)
masked_jacobian = _discovered("masked")  # Haas et al. with a mask: each region's top singular vectors
nullspace_projection = _discovered("nullspace")  # the LOCO Edit / RBE idea in h-space
ratio_directions = _discovered("ratio")  # most in-region eps energy per out-of-region energy


@torch.no_grad()
def fit_hspace_pca(editor: LocalEditor, *, timestep: float = DiscoveryConfig.timestep, n_samples: int = 256,
                   n_components: int = 10, seed: int = 0, batch_size: int = 32) -> tuple[Tensor, float]:
    """Haas et al.'s global directions: principal components of h at ``timestep`` over ``n_samples`` trajectories
    sampled from noise (x̂0 bounded as the scheduler config says, as generation does). Returns ``(components
    (c, d), mean |h|)``."""
    model = editor.model
    schedule = make_schedule(model, editor.num_inference_steps)
    step = schedule.index_of(timestep)
    noise = initial_noise(model, n_samples, seed=seed)
    hs = []
    for b in tqdm(range(0, n_samples, batch_size), desc="h-space PCA samples", disable=not editor.progress,
                  leave=False):
        x, _, _ = ddim_sample(model, noise[b:b + batch_size], schedule, stop=step, clip_sample=True)
        hs.append(model.encode(x, schedule.timesteps[step]).h.flatten(1).double().cpu())
    h = torch.cat(hs)
    centred = h - h.mean(0)
    _, _, vh = torch.linalg.svd(centred, full_matrices=False)
    c = min(n_components, vh.shape[0])
    return vh[:c].to(model.dtype), float(h.norm(dim=1).mean())


def pca_directions(editor: LocalEditor, image: ImageLike, masks: Mapping[str, Tensor], *,
                   timestep: float = DiscoveryConfig.timestep, components: tuple[Tensor, float] | None = None,
                   n_samples: int = 256, n_components: int = 10, seed: int = 0, **_) -> MethodDirections:
    """Global h-space PCA; for each region the component whose eps response on ``image`` is most local.

    ``components``: a :func:`fit_hspace_pca` result to reuse across images (fitting samples ``n_samples``
    trajectories)."""
    comps, _ = components or fit_hspace_pca(editor, timestep=timestep, n_samples=n_samples,
                                            n_components=n_components, seed=seed)
    responses = editor.responses(image, comps, timestep)
    pick = most_local(responses, masks)
    vectors = {r: picked_first(comps, i).cpu() for r, i in pick.items()}
    inv = editor.invert(image)
    h_norm = float(inv.hs[inv.schedule.index_of(timestep)].norm())
    return MethodDirections("pca", "h", vectors, timestep, h_norm, editor.model.fingerprint,
                            info=dict(component={r: i for r, i in pick.items()}))
