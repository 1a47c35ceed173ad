"""Settings shared by the API, the CLI and the web UI, as typed values instead of loose dicts.

:class:`DiscoveryConfig` holds everything :meth:`LocalEditor.discover` needs besides the image and the masks;
its defaults are the measured ones (``docs/defaults.md``). ``DiscoveryConfig.fast()`` is the lighter
discovery the demo and the evaluation use.

Timesteps are given the way users think of them: an ``int`` is a training timestep t in 0 .. T-1 (diffusers'
convention; 700 of 1,000), a ``float`` a fraction of T in (0, 1] (0.7).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, fields

from localdiff.errors import LocalDiffError

# DDIM steps for inversion and regeneration (diffusers' name: num_inference_steps). 50 reconstructs the default
# model's faces at about 32 dB (docs/defaults.md).
NUM_INFERENCE_STEPS = 50
# Which DDIM steps get an edit by default (see localdiff.sampling.edit_steps).
EDIT_SCHEDULE = "all"
# Edit strengths offered by default (grids, sweeps, the web UI's sliders): -0.3 .. +0.3 of |h|. Measured on the
# default model: visible and mostly local at 0.25 (docs/defaults.md); beyond about 0.5 edits wreck the face.
EDIT_RANGE = 0.3

# How discovery turns the regions' Jacobian subspaces into local directions (LocalEditor.discover).
DISCOVERY_METHODS = ("jive", "masked", "nullspace", "ratio")
# Settings only the jive method reads, with the value that leaves them off (other methods refuse anything else)
JIVE_ONLY = {"joint_rank": None, "rest_block": False}
# More singular vectors than this per region would take hours and gigabytes; nobody needs them.
MAX_K = 512


def timestep_fraction(timestep: int | float, num_train_timesteps: int) -> float:
    """``timestep`` as a fraction of T: an int is a training timestep t in 0 .. T-1, a float a fraction in (0, 1]."""
    if isinstance(timestep, bool) or not isinstance(timestep, numbers.Real):
        raise LocalDiffError(f"timestep must be a fraction of T in (0, 1] or an integer t in 0..{num_train_timesteps - 1}, "
                             f"got {timestep!r}")
    if isinstance(timestep, numbers.Integral):
        if not 0 <= timestep < num_train_timesteps:
            raise LocalDiffError(f"timestep t={timestep} is outside the model's 0..{num_train_timesteps - 1}; give an "
                                 f"integer t in that range or a fraction of T such as 0.7")
        return int(timestep) / num_train_timesteps
    value = float(timestep)
    if not 0.0 < value <= 1.0:
        raise LocalDiffError(f"timestep must be a fraction of T in (0, 1] (or an integer t in "
                             f"0..{num_train_timesteps - 1}), got {timestep}")
    return value


@dataclass(frozen=True)
class DiscoveryConfig:
    """How :meth:`LocalEditor.discover` finds directions. See its docstring for the methods.

    Build one with keywords (``DiscoveryConfig(method="masked", k=4)``), start from the demo's lighter settings
    (``DiscoveryConfig.fast()``), or derive one (``config.replace(timestep=600)``).
    """

    method: str = "ratio"  # measured: the most local edits on the 32-face evaluation (docs/defaults.md)
    timestep: int | float = 0.7  # measured: best locality on 16 evaluation faces (docs/defaults.md)
    k: int = 6  # singular vectors per region
    oversample: int = 3  # extra vectors carried by the subspace iteration
    joint_rank: int | str | None = None  # jive: None = AJIVE's bounds, "permutation" = Lock et al.'s test, or a number
    individual_rank: int | None = 3  # local directions kept per region (None: jive's own rule)
    rest_block: bool = False  # jive: the rest of the image as one more block
    null_rank: int = 5  # nullspace: directions of the outside's Jacobian projected off
    track: bool = False  # follow the directions to every DDIM step (per-step directions)
    max_iter: int = 50
    tol_deg: float = 0.1  # stop when the subspaces are estimated this close (degrees) to converged
    seed: int = 0  # start of the subspace iteration
    chunk_size: int | None = None  # Jacobian products per batch (None: all at once; set it on big models/GPUs)

    @classmethod
    def fast(cls, **changes) -> "DiscoveryConfig":
        """The demo's and the evaluation's lighter discovery: k = 3 + 3 (a block of 6; k = 4 + 2 needs twice the
        iterations on the default model) to an estimated 0.5 deg of the converged subspaces; about a third of the
        default's work."""
        return cls(k=3, oversample=3, individual_rank=2, tol_deg=0.5, max_iter=15).replace(**changes)

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def replace(self, **changes) -> "DiscoveryConfig":
        """A copy with ``changes``; a misspelt setting is one clear error."""
        unknown = [k for k in changes if k not in self.names()]
        if unknown:
            raise LocalDiffError(f"unknown discovery setting {unknown[0]!r}; the settings are {', '.join(self.names())}")
        if "k" in changes and "individual_rank" not in changes and isinstance(self.individual_rank, int):
            # a smaller k without a rank of its own: keep at most k local directions rather than refuse
            changes["individual_rank"] = max(1, min(self.individual_rank, int(changes["k"])))
        return dataclasses.replace(self, **changes)

    def changes(self) -> dict:
        """The settings that differ from the defaults (for reports and keys)."""
        default = DiscoveryConfig()
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != getattr(default, f.name)}

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)

    def check(self, h_dim: int, n_regions: int, num_train_timesteps: int) -> float:
        """Raise a one-line :class:`LocalDiffError` for a setting that cannot work with an h-space of ``h_dim``
        dimensions and ``n_regions`` regions; returns the timestep as a fraction of T."""
        if self.method not in DISCOVERY_METHODS:
            raise LocalDiffError(f"unknown discovery method {self.method!r}; choose one of {', '.join(DISCOVERY_METHODS)}")
        fraction = timestep_fraction(self.timestep, num_train_timesteps)
        top = min(MAX_K, h_dim)
        if not 1 <= self.k <= top:
            raise LocalDiffError(f"k (singular vectors per region) must be in 1..{top}, got {self.k}; 3-16 is usual "
                                 f"(h-space has {h_dim} dimensions, and the work grows with k)")
        if self.oversample < 0 or self.k + self.oversample > h_dim:
            raise LocalDiffError(f"oversample must be in 0..{h_dim - self.k} (k + oversample at most h-space's {h_dim} "
                                 f"dimensions), got {self.oversample}")
        if self.individual_rank is not None and not 1 <= self.individual_rank <= self.k:
            raise LocalDiffError(f"individual rank must be in 1..k={self.k}, got {self.individual_rank}; lower the "
                                 f"individual rank (--individual-rank) or raise k (--k)")
        given = [name for name, off in JIVE_ONLY.items() if getattr(self, name) != off]
        if self.method != "jive" and given:
            raise LocalDiffError(f"the {given[0].replace('_', ' ')} is a setting of the jive method, not of "
                                 f"{self.method}; add method='jive' (--method jive), or leave it out")
        if isinstance(self.joint_rank, str):
            if self.joint_rank != "permutation":
                raise LocalDiffError(f"joint rank must be a number, None (AJIVE's bounds) or 'permutation' (Lock et "
                                     f"al.'s test), got {self.joint_rank!r}")
        elif self.joint_rank is not None and not 0 <= self.joint_rank < self.k * n_regions:
            raise LocalDiffError(f"joint rank must be in 0..{self.k * n_regions - 1}, got {self.joint_rank}")
        if not 1 <= self.null_rank <= top:
            raise LocalDiffError(f"null rank must be in 1..{top}, got {self.null_rank}")
        if self.max_iter < 1:
            raise LocalDiffError(f"max_iter must be at least 1, got {self.max_iter}")
        if not self.tol_deg >= 0:
            raise LocalDiffError(f"tol_deg must be an angle >= 0 (degrees), got {self.tol_deg}")
        if self.chunk_size is not None and self.chunk_size < 1:
            raise LocalDiffError(f"chunk_size must be at least 1 (or None for all at once), got {self.chunk_size}")
        return fraction


def warn_renamed(old: str, new: str, *, stacklevel: int = 3) -> None:
    """The warning for an old name that still works for one release (a ``FutureWarning``, as diffusers does)."""
    import warnings

    warnings.warn(f"{old} is deprecated and will be removed in localdiff 0.3; use {new}", FutureWarning,
                  stacklevel=stacklevel)
