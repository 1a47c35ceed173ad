"""Deterministic DDIM (eta = 0): inversion, regeneration and h-space edits, as small functions.

The timestep grid and the cumulative alphas come from diffusers' ``DDIMScheduler`` (built from the model's
own scheduler config); the update itself is the closed-form DDIM step, written out so that an edit can use
different noise predictions for the x0 term and the direction term (Asyrp's asymmetric step).

Generation from noise (:func:`generate`) treats the predicted clean image x̂0 as diffusers' ``DDIMScheduler.step``
does: clipped to ``clip_sample_range`` when the scheduler config says ``clip_sample``, or dynamically thresholded
when it says ``thresholding``. Inversion never does (it must be exactly invertible), and neither does edited
regeneration by default: ``docs/defaults.md`` gives the measured reason.

Conventions: ``timesteps`` run from high noise to low (``timesteps[0]`` is T). A trajectory ``xs`` has
``len(timesteps) + 1`` entries: ``xs[i]`` is the latent *before* step ``i`` (at ``timesteps[i]``) and
``xs[-1]`` the clean image. Images are tensors in [-1, 1] of shape (B, C, H, W).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor
from tqdm.auto import tqdm

from localdiff.errors import LocalDiffError
from localdiff.model import DiffusionModel

EDIT_SCHEDULES = ("all", "window", "single")


@dataclass
class Schedule:
    """DDIM timesteps (descending) and alpha-bar before/after each step."""

    timesteps: Tensor  # (n,) long, descending
    alpha: Tensor  # (n,) alpha_bar at timesteps[i]
    alpha_next: Tensor  # (n,) alpha_bar after step i (at timesteps[i + 1], or the final alpha)
    num_train_timesteps: int = 1000
    clip_sample_range: float | None = None  # clamp x̂0 to [-r, r] (the config's clip_sample)
    thresholding: tuple[float, float] | None = None  # (dynamic_thresholding_ratio, sample_max_value)

    def __len__(self) -> int:
        return len(self.timesteps)

    def index_of(self, t_fraction: float) -> int:
        """Step index whose timestep is closest to ``t_fraction * T`` (T = number of training steps)."""
        target = t_fraction * float(self.num_train_timesteps)
        return int(torch.argmin((self.timesteps.double() - target).abs()).item())


def make_schedule(model: DiffusionModel, num_steps: int) -> Schedule:
    """The DDIM timestep grid of ``model``'s scheduler with ``num_steps`` steps."""
    from diffusers import DDIMScheduler

    if not 1 <= num_steps <= model.num_train_timesteps:
        raise LocalDiffError(f"the number of DDIM steps (--steps) must be in 1..{model.num_train_timesteps}, the model's "
                             f"training steps; got {num_steps}")
    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(num_steps)
    ts = sched.timesteps.to(torch.long)
    ac = sched.alphas_cumprod.to(torch.float64)
    alpha = ac[ts]
    final = torch.as_tensor(sched.final_alpha_cumprod, dtype=torch.float64, device="cpu").reshape(1)  # host scalars
    alpha_next = torch.cat([alpha[1:], final])
    cfg = sched.config
    clip_range = float(cfg.clip_sample_range) if cfg.clip_sample and not cfg.thresholding else None
    thresholding = (float(cfg.dynamic_thresholding_ratio), float(cfg.sample_max_value)) if cfg.thresholding else None
    return Schedule(ts, alpha, alpha_next, num_train_timesteps=model.num_train_timesteps,
                    clip_sample_range=clip_range, thresholding=thresholding)


def clip_x0(x0: Tensor, *, clip_range: float | None = None, thresholding: tuple[float, float] | None = None) -> Tensor:
    """Bound a predicted clean image as diffusers' schedulers do.

    ``thresholding = (ratio, max_value)``: dynamic thresholding (Saharia et al. 2022): per image, s is the
    ``ratio`` quantile of |x̂0|, clamped to [1, max_value]; x̂0 is clamped to [-s, s] and divided by s.
    Otherwise ``clip_range = r`` clamps to [-r, r]; with neither, x̂0 is returned unchanged.
    """
    if thresholding is not None:
        ratio, max_value = thresholding
        dtype = x0.dtype
        flat = x0.float().reshape(x0.shape[0], -1)
        s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
        return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)
    if clip_range is not None:
        return x0.clamp(-clip_range, clip_range)
    return x0


def ddim_step(x: Tensor, eps_x0: Tensor, eps_dir: Tensor, a_t: float, a_next: float, *,
              clip_range: float | None = None, thresholding: tuple[float, float] | None = None) -> Tensor:
    """One DDIM step (eta = 0) from alpha-bar ``a_t`` to ``a_next``.

    ``eps_x0`` forms the predicted clean image, ``eps_dir`` the direction pointing to x_next; they are the same
    tensor except in Asyrp's asymmetric edit. The same formula with ``a_next > a_t`` is a DDIM inversion step.
    ``clip_range`` / ``thresholding`` bound the predicted clean image (see :func:`clip_x0`); as in diffusers, the
    direction term keeps the unclipped noise prediction.
    """
    x0 = (x - (1 - a_t) ** 0.5 * eps_x0) / a_t**0.5
    if clip_range is not None or thresholding is not None:
        x0 = clip_x0(x0, clip_range=clip_range, thresholding=thresholding)
    return a_next**0.5 * x0 + (1 - a_next) ** 0.5 * eps_dir


@torch.no_grad()
def ddim_invert(model: DiffusionModel, x0: Tensor, schedule: Schedule, *, progress: bool = False) -> Tensor:
    """DDIM inversion: clean image -> x_T, walking the schedule backwards (eps at the less noisy latent)."""
    x = x0.to(model.device, model.dtype)
    n = len(schedule)
    for i in tqdm(range(n - 1, -1, -1), desc="invert", disable=not progress, leave=False):
        t = schedule.timesteps[i]
        eps = model.eps(x, t)
        a_from, a_to = float(schedule.alpha_next[i]), float(schedule.alpha[i])
        x = ddim_step(x, eps, eps, a_from, a_to)
    return x


DeltaFn = Callable[[int], "Tensor | None"]


@torch.no_grad()
def ddim_sample(
    model: DiffusionModel,
    x_start: Tensor,
    schedule: Schedule,
    *,
    start: int = 0,
    stop: int | None = None,
    delta_h: DeltaFn | None = None,
    asymmetric: bool = False,
    record: bool = False,
    clip_sample: bool = False,
    progress: bool = False,
) -> tuple[Tensor, list[Tensor], list[Tensor]]:
    """Deterministic DDIM sampling from ``x_start`` (the latent before step ``start``) up to (not including) step
    ``stop`` (default: to the end, x0).

    ``delta_h(i)`` returns the h-space offset to add at step ``i`` (shape (B, *h_shape) or broadcastable), or
    ``None`` for no edit at that step. With ``asymmetric=True`` the edited eps forms only the x0 term and the
    unedited eps the direction term (Asyrp). Returns ``(x0, xs, hs)``; ``xs``/``hs`` hold each step's input
    latent and unedited h when ``record`` is set, else are empty. ``clip_sample=True`` bounds x̂0 as the
    scheduler config says (``schedule.clip_sample_range`` / ``schedule.thresholding``), as generation does.
    """
    bounds = dict(clip_range=schedule.clip_sample_range, thresholding=schedule.thresholding) if clip_sample else {}
    x = x_start.to(model.device, model.dtype)
    xs: list[Tensor] = []
    hs: list[Tensor] = []
    end = len(schedule) if stop is None else stop
    for i in tqdm(range(start, end), desc="sample", disable=not progress, leave=False):
        t = schedule.timesteps[i]
        enc = model.encode(x, t)
        if record:
            xs.append(x)
            hs.append(enc.h)
        dh = delta_h(i) if delta_h is not None else None
        if dh is None:
            eps = eps_dir = model.decode(enc.h, enc.skips, enc.temb)
        else:
            eps = model.decode(enc.h + dh, enc.skips, enc.temb)
            eps_dir = model.decode(enc.h, enc.skips, enc.temb) if asymmetric else eps
        x = ddim_step(x, eps, eps_dir, float(schedule.alpha[i]), float(schedule.alpha_next[i]), **bounds)
    if record:
        xs.append(x)
    return x, xs, hs


def edit_steps(schedule: Schedule, kind: str, step: int) -> Sequence[int]:
    """Indices of the steps at which an edit found at step ``step`` is applied.

    ``all``: every step (Haas et al.); ``window``: from T down to the discovery step (Asyrp's [T, t_edit]);
    ``single``: the discovery step only.
    """
    if kind == "all":
        return range(len(schedule))
    if kind == "window":
        return range(0, step + 1)
    if kind == "single":
        return range(step, step + 1)
    raise ValueError(f"unknown edit schedule {kind!r}; choose one of {', '.join(EDIT_SCHEDULES)}")


def initial_noise(model: DiffusionModel, n: int, *, seed: int = 0) -> Tensor:
    """``n`` starting latents x_T on the CPU; latent ``i`` depends on ``seed`` and ``i`` only (not on batching)."""
    r = model.resolution
    return torch.stack([torch.randn(model.in_channels, r, r, device="cpu",
                                    generator=torch.Generator().manual_seed(seed * 1_000_003 + i))
                        for i in range(n)])


@torch.no_grad()
def generate(model: DiffusionModel, n: int, schedule: Schedule, *, seed: int = 0, batch_size: int = 16,
             progress: bool = False) -> Tensor:
    """Draw ``n`` images from noise with deterministic DDIM, bounding x̂0 as the scheduler config says (as
    diffusers' ``DDIMScheduler`` does); image ``i`` depends on ``seed`` and ``i`` only."""
    noise = initial_noise(model, n, seed=seed)
    out = []
    for start in tqdm(range(0, n, batch_size), desc="sample batches", disable=not progress or n <= batch_size,
                      leave=False):
        x_T = noise[start:start + batch_size]
        x, _, _ = ddim_sample(model, x_T, schedule, clip_sample=True, progress=progress)
        out.append(x.clamp(-1, 1).cpu())
    return torch.cat(out)
