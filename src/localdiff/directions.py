"""Edit directions and their file format (safetensors + JSON metadata).

A directions file holds, for every region, its local (individual) h-space directions, their singular values
and the region mask, plus the joint directions that JIVE separated out. The metadata (a JSON string under the
``localdiff`` key of the safetensors header) records the format version, the model's fingerprint, the
discovery timestep, the number of DDIM steps, the ranks and the source image hash, so that a file is
self-describing and can be refused for a model it was not made with.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor

from localdiff.errors import LocalDiffError
from localdiff.images import atomic_write

FORMAT_VERSION = 1
JOINT = "joint"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def check_region_name(name: str) -> str:
    if not _NAME_RE.match(name or ""):
        raise LocalDiffError(f"region name {name!r} is not valid; use letters, digits, '-' and '_' (e.g. mouth)")
    if name == JOINT:
        raise LocalDiffError(f"region name {JOINT!r} is reserved for the joint directions; choose another name")
    return name


@dataclass(frozen=True)
class Direction:
    """One unit vector in h-space, and what is needed to apply it with a meaningful strength."""

    region: str
    index: int
    vector: Tensor = field(repr=False)  # (d,), unit norm, flattened h
    sigma: float
    unit: float  # strength 1 adds ``unit * vector`` to h: the norm of h at discovery
    fingerprint: str  # the model it belongs to
    timestep_fraction: float  # where it was discovered (fraction of T); edits start there under window/single
    # optional: one vector per DDIM step index (tracked from the discovery step), for a schedule of ``num_steps``
    per_step: dict[int, Tensor] | None = field(default=None, repr=False, compare=False)
    num_steps: int | None = None

    def vector_at(self, step: int) -> Tensor:
        """The direction to apply at DDIM step ``step``: its own vector there if it was tracked, else ``vector``."""
        if self.per_step is not None and step in self.per_step:
            return self.per_step[step]
        return self.vector

    @property
    def name(self) -> str:
        return f"{self.region}:{self.index}"


class RegionDirections(Sequence[Direction]):
    """The local directions of one region, strongest first; index it like a list."""

    def __init__(self, items: list[Direction]):
        self._items = items

    def __getitem__(self, i):  # type: ignore[override]
        return self._items[i]

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"RegionDirections({[d.name for d in self._items]})"


@dataclass
class Directions:
    """Directions discovered on one image: per region local directions, and the joint ones."""

    individual: dict[str, Tensor]  # region -> (r_A, d)
    individual_sigma: dict[str, Tensor]  # region -> (r_A,)
    joint: Tensor  # (r_C, d)
    masks: dict[str, Tensor]  # region -> bool (R, R)
    region_sigma: dict[str, Tensor]  # region -> (k,) singular values of the masked Jacobian
    meta: dict
    # optional, discover(per_step=True): region -> (S, r_A, d), the directions tracked to the steps listed in
    # meta["per_step_indices"] (index j of every step continues index j of the discovery step)
    per_step: dict[str, Tensor] = field(default_factory=dict)

    # ------------------------------------------------------------------ access
    @property
    def regions(self) -> list[str]:
        return list(self.individual)

    @property
    def fingerprint(self) -> str:
        return self.meta["model_fingerprint"]

    @property
    def unit(self) -> float:
        return float(self.meta["h_norm"])

    def __getitem__(self, region: str) -> RegionDirections:
        if region == JOINT:
            vecs, sig = self.joint, torch.ones(len(self.joint), device=self.joint.device)
        elif region in self.individual:
            vecs, sig = self.individual[region], self.individual_sigma[region]
        else:
            raise LocalDiffError(f"no region {region!r} in these directions; regions: {', '.join(self.regions) or 'none'}")
        tracked = self.per_step.get(region)
        steps = [int(x) for x in self.meta.get("per_step_indices", [])]
        return RegionDirections(
            [Direction(region, i, v, float(s), self.unit, self.fingerprint, float(self.meta["timestep_fraction"]),
                       per_step={st: tracked[j, i] for j, st in enumerate(steps)} if tracked is not None else None,
                       num_steps=int(self.meta["num_steps"]) if tracked is not None else None)
             for i, (v, s) in enumerate(zip(vecs, sig))]
        )

    def __contains__(self, region: str) -> bool:
        return region in self.individual or region == JOINT

    def __iter__(self) -> Iterator[str]:
        return iter(self.individual)

    def select(self, spec: str) -> Direction:
        """``"mouth"`` (the first direction), ``"mouth:1"`` or ``"joint:0"`` -> a :class:`Direction`."""
        region, _, idx = spec.partition(":")
        items = self[region]
        if idx == "":
            index = 0
        else:
            try:
                index = int(idx)
            except ValueError:
                raise LocalDiffError(f"direction {spec!r}: index {idx!r} is not a whole number") from None
        if not 0 <= index < len(items):
            raise LocalDiffError(
                f"direction {spec!r}: region {region!r} has {len(items)} directions (indices 0..{len(items) - 1})"
            )
        return items[index]

    def local(self) -> list[Direction]:
        """Every local direction of every region, region by region."""
        return [d for r in self.regions for d in self[r]]

    def check_model(self, fingerprint: str, *, allow_foreign: bool = False) -> None:
        """Refuse to apply these directions to a model they were not discovered with."""
        if fingerprint != self.fingerprint and not allow_foreign:
            raise LocalDiffError(
                f"these directions were discovered with model {self.meta.get('model_name', '?')} "
                f"(fingerprint {self.fingerprint}), not with this one ({fingerprint}); "
                f"use --allow-foreign-model to apply them anyway"
            )

    # ------------------------------------------------------------------ I/O
    def save(self, path: str | Path) -> None:
        """Write a safetensors file (atomically: no partial file on failure)."""
        from safetensors.torch import save_file

        def own(t: Tensor) -> Tensor:  # a copy of its own: safetensors refuses tensors that share memory
            return t.detach().float().cpu().contiguous().clone()

        tensors = {"joint": own(self.joint)}
        for r in self.regions:
            tensors[f"individual/{r}"] = own(self.individual[r])
            tensors[f"individual_sigma/{r}"] = own(self.individual_sigma[r])
            tensors[f"mask/{r}"] = self.masks[r].detach().to(torch.uint8).cpu().contiguous().clone()
            tensors[f"region_sigma/{r}"] = own(self.region_sigma[r])
            if r in self.per_step:
                tensors[f"per_step/{r}"] = own(self.per_step[r])
        meta = dict(self.meta, regions=self.regions, format_version=FORMAT_VERSION)
        with atomic_write(path) as tmp:
            save_file(tensors, str(tmp), metadata={"localdiff": json.dumps(meta, sort_keys=True)})

    @classmethod
    def load(cls, path: str | Path) -> "Directions":
        """Read a directions file; anything that is not a localdiff safetensors file is refused clearly."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        p = Path(path)
        if not p.is_file():
            raise LocalDiffError(f"directions file {path} does not exist")
        with open(p, "rb") as fh:
            head = fh.read(9)
        # safetensors: an 8-byte little-endian header length, then the JSON header. A header length whose low byte
        # is 0x80 starts like a pickle, so the file is taken for a pickle only when it is not a safetensors file.
        size = p.stat().st_size
        safetensors_like = len(head) == 9 and head[8:9] == b"{" and 8 + int.from_bytes(head[:8], "little") <= size
        if not safetensors_like and (head[:2] == b"PK" or head[:1] == b"\x80"):
            raise LocalDiffError(
                f"{path} is a pickle/torch checkpoint, not a safetensors directions file; localdiff never unpickles "
                f"files - make one with 'localdiff discover'"
            )
        try:
            with safe_open(str(p), framework="pt") as f:
                header = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise LocalDiffError(f"{path} is not a valid safetensors file ({exc})") from exc
        if "localdiff" not in header:
            raise LocalDiffError(f"{path} is a safetensors file but not localdiff directions (no 'localdiff' metadata)")
        try:
            meta = json.loads(header["localdiff"])
            version = int(meta["format_version"])
            regions = list(meta["regions"])
        except (ValueError, KeyError, TypeError) as exc:
            raise LocalDiffError(f"{path} has broken localdiff metadata ({exc})") from exc
        if version > FORMAT_VERSION:
            raise LocalDiffError(
                f"{path} has directions format {version}, newer than this localdiff understands ({FORMAT_VERSION}); upgrade localdiff"
            )
        try:
            dirs = cls(
                individual={r: tensors[f"individual/{r}"] for r in regions},
                individual_sigma={r: tensors[f"individual_sigma/{r}"] for r in regions},
                joint=tensors["joint"],
                masks={r: tensors[f"mask/{r}"].bool() for r in regions},
                region_sigma={r: tensors[f"region_sigma/{r}"] for r in regions},
                meta=meta,
                per_step={r: tensors[f"per_step/{r}"] for r in regions if f"per_step/{r}" in tensors},
            )
        except KeyError as exc:
            raise LocalDiffError(f"{path} is missing tensor {exc}; the file is incomplete") from None
        problem = dirs.problem()
        if problem:
            raise LocalDiffError(f"{path} is not usable: {problem}; discover the directions again")
        return dirs

    def problem(self) -> str | None:
        """What makes these directions unusable (broken metadata, non-finite or misshapen tensors), or ``None``."""
        m = self.meta
        try:
            num_steps, step = int(m["num_steps"]), int(m["step_index"])
            h_norm, fraction = float(m["h_norm"]), float(m["timestep_fraction"])
            dim = math.prod(int(s) for s in m["h_shape"])
            str(m["model_fingerprint"])
        except (KeyError, TypeError, ValueError) as exc:
            return f"its metadata lacks a valid {exc}"
        if num_steps < 1:
            return f"num_steps is {num_steps}, not at least 1"
        if not 0 <= step < num_steps:
            return f"step_index {step} is outside its schedule of {num_steps} DDIM steps"
        if not math.isfinite(h_norm) or h_norm <= 0:
            return f"h_norm (the strength unit) is {h_norm}, not a positive number"
        if not 0 < fraction <= 1:
            return f"timestep_fraction {fraction} is not in (0, 1]"
        if dim < 1:
            return f"h_shape {m['h_shape']} is empty"
        named = [("joint", self.joint)] + [(f"individual/{r}", v) for r, v in self.individual.items()]
        for name, vecs in named:
            if vecs.ndim != 2 or (vecs.shape[0] and vecs.shape[1] != dim):
                return f"tensor {name} has shape {tuple(vecs.shape)}, not (n, {dim}) for h of shape {m['h_shape']}"
            if not torch.isfinite(vecs).all():
                return f"tensor {name} holds NaN or infinite values"
        for r in self.regions:
            sig, mask = self.individual_sigma[r], self.masks[r]
            if sig.shape != (self.individual[r].shape[0],) or not torch.isfinite(sig).all():
                return f"tensor individual_sigma/{r} does not hold one finite value per direction"
            if mask.ndim != 2 or mask.shape[0] != mask.shape[1]:
                return f"mask/{r} has shape {tuple(mask.shape)}, not a square image"
        if self.per_step:
            steps = m.get("per_step_indices")
            if not isinstance(steps, list) or not all(isinstance(x, int) and 0 <= x < num_steps for x in steps):
                return "per_step_indices is not a list of step indices of its schedule"
            for r, t in self.per_step.items():
                if r not in self.individual or t.shape != (len(steps), *self.individual[r].shape):
                    return f"tensor per_step/{r} does not hold one set of directions per tracked step"
                if not torch.isfinite(t).all():
                    return f"tensor per_step/{r} holds NaN or infinite values"
        return None

    # ------------------------------------------------------------------ display
    def describe(self) -> str:
        """Human-readable summary of the metadata and contents (what ``localdiff info`` prints)."""
        m = self.meta
        lines = [
            f"format version    {m.get('format_version', FORMAT_VERSION)}",
            f"model             {m.get('model_name', '?')}",
            f"model fingerprint {m.get('model_fingerprint')}",
            f"h shape           {tuple(m.get('h_shape', ()))}  (strength unit |h| = {self.unit:.4g})",
            f"timestep          t={m.get('timestep')} (fraction {m.get('timestep_fraction')}, step {m.get('step_index')} of {m.get('num_steps')} DDIM steps)",
            f"subspace          k={m.get('k')} (+{m.get('oversample')} oversampling), seed {m.get('seed')}",
            f"method            {m.get('method', 'jive')}" + (" (rest-of-image block)" if m.get("rest_block") else ""),
            f"JIVE ranks        joint {m.get('joint_rank')}, individual {m.get('individual_rank') or 'auto'}",
            (f"source images     {m['images']}, jointly (sha256 {m.get('source_image_hash')})" if m.get("images", 1) > 1
             else f"source image      sha256:{m.get('source_image_hash')}"),
            f"created with      localdiff {m.get('localdiff_version')}",
            f"joint directions  {len(self.joint)}",
            f"per-step          {'tracked to ' + str(len(m.get('per_step_indices', []))) + ' DDIM steps' if self.per_step else 'no (one direction for every step)'}",
            "regions:",
        ]
        its = m.get("iterations", {})
        eps = m.get("eps_locality", {})
        for r in self.regions:
            area = float(self.masks[r].float().mean())
            sig = ", ".join(f"{s:.3g}" for s in self.individual_sigma[r].tolist())
            loc = f"; eps-level locality {', '.join(f'{x:.2f}' for x in eps[r])}" if r in eps else ""
            lines.append(
                f"  {r:<12} {len(self.individual[r])} local directions (sigma {sig}); mask area {area:.1%}; "
                f"{its.get(r, '?')} iterations{loc}"
            )
        return "\n".join(lines)
