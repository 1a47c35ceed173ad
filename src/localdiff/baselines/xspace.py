"""x_t-space methods: LOCO Edit (Chen et al. 2024) and the pullback directions of Park et al. (2023).

Both edit once, at their timestep: x_t <- x_t + strength * |x_t| * v, then plain DDIM to x0.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor

from localdiff.baselines import MethodDirections, most_local, picked_first
from localdiff.config import DiscoveryConfig
from localdiff.editor import LocalEditor
from localdiff.images import ImageLike
from localdiff.jacobian import decoder_operators, fix_signs, project_out, subspace_iteration
from localdiff.masks import pixel_masks


def _latent_at(editor: LocalEditor, image: ImageLike, timestep: float):
    """``(x_t, t, alpha-bar)`` of ``image``'s cached unedited trajectory at ``timestep``."""
    inv = editor.invert(image)
    step = inv.schedule.index_of(timestep)
    return inv.xs[step], inv.schedule.timesteps[step], float(inv.schedule.alpha[step])


def _x0_operators(editor: LocalEditor, image: ImageLike, timestep: float):
    """JVP/VJP of the posterior-mean predictor x_t -> x0_hat(x_t) at ``timestep`` of ``image``'s trajectory.
    Returns ``(jvp, vjp, x0_hat(x_t), x_t)``."""
    model = editor.model
    x_t, t, a = _latent_at(editor, image, timestep)

    def x0_hat(x: Tensor) -> Tensor:
        return (x - (1 - a) ** 0.5 * model.eps(x, t)) / a**0.5

    jvp, vjp, out = decoder_operators(x0_hat, x_t)
    return jvp, vjp, out, x_t


def loco_edit(editor: LocalEditor, image: ImageLike, masks: Mapping[str, Tensor], *, timestep: float = 0.6,
              k: int = 3, null_rank: int = 5, oversample: int = DiscoveryConfig.oversample,
              max_iter: int = DiscoveryConfig.max_iter, tol_deg: float = DiscoveryConfig.tol_deg, seed: int = 0,
              **_) -> MethodDirections:
    """LOCO Edit as published: top-``k`` right singular vectors of d(m * x0_hat)/dx_t at ``timestep`` (0.6 T for
    faces), projected off the top-``null_rank`` ones of d((1 - m) * x0_hat)/dx_t; applied once at ``timestep``."""
    model = editor.model
    names = list(masks)
    jvp, vjp, out, x_t = _x0_operators(editor, image, timestep)
    pixel = pixel_masks([masks[n].float() for n in names] + [1 - masks[n].float() for n in names],
                         out.shape[1], out)
    res = subspace_iteration(jvp, vjp, x_t[0].numel(), pixel, max(k, null_rank), oversample=oversample,
                             max_iter=max_iter, tol_deg=tol_deg, seed=seed, dtype=model.dtype, device=model.device,
                             progress=editor.progress)
    vectors = {n: fix_signs(project_out(res.vectors[i, :k], res.vectors[len(names) + i, :null_rank])).cpu()
               for i, n in enumerate(names)}
    return MethodDirections("loco", "x", vectors, timestep, float(x_t.norm()), model.fingerprint,
                            info=dict(null_rank=null_rank))


def pullback(editor: LocalEditor, image: ImageLike, masks: Mapping[str, Tensor], *, timestep: float = 0.6,
             basis_size: int = 6, oversample: int = DiscoveryConfig.oversample, max_iter: int = 20,
             tol_deg: float = DiscoveryConfig.tol_deg, seed: int = 0, **_) -> MethodDirections:
    """Park et al.: the top-``basis_size`` right singular vectors of the encoder Jacobian dh/dx_t at ``timestep``
    (a global, per-image basis of x_t); for each region the one whose x0_hat response is most concentrated in it.
    (The regions' ``k`` does not apply: a global basis is as wide as it is, whatever the regions ask for.)"""
    model = editor.model
    x_t, t, _ = _latent_at(editor, image, timestep)
    jvp, vjp, out = decoder_operators(lambda x: model.encode(x, t).h, x_t)
    ones = torch.ones(1, out[0].numel(), device=model.device, dtype=model.dtype)
    res = subspace_iteration(jvp, vjp, x_t[0].numel(), ones, basis_size, oversample=oversample, max_iter=max_iter,
                             tol_deg=tol_deg, seed=seed, dtype=model.dtype, device=model.device,
                             progress=editor.progress)
    basis = fix_signs(res.vectors[0])
    x0_jvp, _, x0_out, _ = _x0_operators(editor, image, timestep)
    responses = x0_jvp(basis).reshape(len(basis), *x0_out.shape[1:])
    pick = most_local(responses, masks)
    vectors = {r: picked_first(basis, i).cpu() for r, i in pick.items()}
    return MethodDirections("pullback", "x", vectors, timestep, float(x_t.norm()), model.fingerprint,
                            info=dict(component=pick, sigma=res.sigma[0].tolist()))
