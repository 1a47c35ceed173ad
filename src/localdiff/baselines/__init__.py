"""The methods localdiff is measured against, on the same inversion, masks and edit application.

Every method maps (editor, image, region masks) to a :class:`MethodDirections`: per region, unit vectors in
h-space (applied like localdiff's own edits: ``h += strength * |h| * v`` at the chosen DDIM steps) or in x_t-space
(applied once: ``x_t += strength * |x_t| * v`` at the method's timestep, then plain DDIM).

========== ===== ==================================================================================
name       space what it is
========== ===== ==================================================================================
jive       h     localdiff: masked Jacobian subspaces + AJIVE, first individual direction (Kouzelis et al.)
masked     h     masked Jacobian alone, the region's top singular direction (Haas et al.)
nullspace  h     region directions projected off the top subspace of the outside's Jacobian (RBE idea)
ratio      h     most in-region per out-of-region eps energy in the regions' and image's Jacobian subspaces
loco       x     LOCO Edit: masked x0-prediction Jacobian w.r.t. x_t with null-space projection, one step
pca        h     global: PCA of h over generated samples (Haas et al.); per region the most local component
pullback   x     global: top right singular vectors of dh/dx_t (Park et al.); per region the most local one
========== ===== ==================================================================================

Global methods have no notion of a region; to give them their best chance each region gets the component whose
linear response (predicted x0) is most concentrated in it, chosen among the top ``k`` on that image.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import Tensor

from localdiff.directions import Direction
from localdiff.editor import LocalEditor
from localdiff.errors import LocalDiffError
from localdiff.images import ImageLike
from localdiff.sampling import ddim_sample


@dataclass
class MethodDirections:
    """Per-region unit directions of one method on one image, and how to apply them."""

    method: str
    space: str  # "h" or "x"
    vectors: dict[str, Tensor]  # region -> (r, d) orthonormal rows, the one to use first
    timestep: float  # fraction of T where they were found (x-space edits are applied there)
    unit: float  # strength 1 moves h (or x_t) by this much: its norm at discovery
    fingerprint: str
    info: dict = field(default_factory=dict)
    # h-space methods discovered with track=True: region -> (S, r, d) for the DDIM step indices ``steps`` of a
    # schedule of ``num_steps``
    per_step: dict[str, Tensor] | None = None
    steps: list[int] | None = None
    num_steps: int | None = None

    def direction(self, region: str, index: int = 0) -> Direction:
        tracked = None
        if self.per_step is not None and region in self.per_step:
            tracked = {s: self.per_step[region][j, index] for j, s in enumerate(self.steps or [])}
        return Direction(region, index, self.vectors[region][index], 1.0, self.unit, self.fingerprint, self.timestep,
                         per_step=tracked, num_steps=self.num_steps if tracked is not None else None)


Discoverer = Callable[..., MethodDirections]


def _registry() -> dict[str, Discoverer]:
    from localdiff.baselines import hspace, xspace

    return {
        "jive": hspace.jive_directions,
        "masked": hspace.masked_jacobian,
        "nullspace": hspace.nullspace_projection,
        "ratio": hspace.ratio_directions,
        "loco": xspace.loco_edit,
        "pca": hspace.pca_directions,
        "pullback": xspace.pullback,
    }


METHODS = ("jive", "masked", "nullspace", "ratio", "loco", "pca", "pullback")


# Settings a method spec may override (``jive:k=16,joint_rank=permutation``): the discovery settings of the
# h-space methods and the timestep of all.
SPEC_KEYS = ("timestep", "k", "oversample", "joint_rank", "individual_rank", "rest_block", "null_rank", "track",
             "max_iter", "tol_deg", "seed")


def _spec_value(text: str):
    low = text.lower()
    if low in ("auto", "none"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_method(spec: str) -> tuple[str, dict]:
    """A method spec ``NAME`` or ``NAME:key=value,key=value`` (keys from :data:`SPEC_KEYS`; values are numbers,
    ``true``/``false``, ``auto`` for None, or words such as ``permutation``) as ``(name, settings)``. Lets the
    evaluation compare variants of one method side by side, each labelled by its spec."""
    name, _, rest = spec.partition(":")
    if name not in METHODS:
        raise LocalDiffError(f"unknown method {name!r}; choose from {', '.join(METHODS)} (variants: NAME:key=value,...)")
    settings = {}
    for item in filter(None, rest.split(",")):
        key, eq, value = item.partition("=")
        if not eq or key not in SPEC_KEYS:
            raise LocalDiffError(f"method spec {spec!r}: expected key=value with key one of {', '.join(SPEC_KEYS)}, "
                                 f"got {item!r}")
        settings[key] = _spec_value(value)
    return name, settings


def discover(method: str, editor: LocalEditor, image: ImageLike, masks: Mapping[str, Tensor],
             **settings) -> MethodDirections:
    """Run ``method`` (one of :data:`METHODS`, or a variant spec, see :func:`parse_method`) on ``image`` for the
    (R, R) ``masks``; the spec's settings override ``settings``. The result is labelled with the whole spec."""
    name, overrides = parse_method(method)
    md = _registry()[name](editor, image, masks, **{**settings, **overrides})
    md.method = method
    return md


def render(editor: LocalEditor, image: ImageLike, md: MethodDirections, edits: Sequence[tuple[str, float]], *,
           schedule: str = "all", index: int = 0) -> Tensor:
    """Regenerate ``image`` once per (region, strength) in ``edits`` with ``md``'s direction for that region,
    batched. h-space methods go through :meth:`LocalEditor.render` with ``schedule``; x-space methods add the
    offset to x_t at their timestep. Returns (B, C, R, R) in [-1, 1]."""
    if md.space == "h":
        return editor.render(image, [[(md.direction(r, index), s)] for r, s in edits], schedule=schedule,
                             allow_foreign=True)
    if md.space != "x":
        raise ValueError(f"unknown space {md.space!r}")
    inv = editor.invert(image)
    step = inv.schedule.index_of(md.timestep)
    x = inv.xs[step]
    offsets = torch.stack([s * md.unit * md.vectors[r][index].to(x.device, x.dtype).view_as(x[0]) for r, s in edits])
    out, _, _ = ddim_sample(editor.model, x + offsets, inv.schedule, start=step)
    zero = torch.tensor([s == 0 for _, s in edits], device=out.device)
    out[zero] = inv.reconstruction.to(out.dtype)  # strength 0 is the reconstruction, bit for bit
    return out


def most_local(responses: Tensor, masks: Mapping[str, Tensor]) -> dict[str, int]:
    """For each region, the index of the response (m, C, R, R) whose energy is most concentrated in its mask."""
    energy = responses.pow(2).sum(dim=1)  # (m, R, R)
    total = energy.flatten(1).sum(1).clamp(min=1e-30)
    return {r: int(((energy * m.to(energy)).flatten(1).sum(1) / total).argmax()) for r, m in masks.items()}


def picked_first(basis: Tensor, index: int) -> Tensor:
    """``basis`` (m, d) reordered so that row ``index`` comes first (the chosen direction of a global method)."""
    return torch.cat([basis[index:index + 1], basis[:index], basis[index + 1:]])


__all__ = ["METHODS", "MethodDirections", "discover", "parse_method", "render", "most_local", "picked_first"]
