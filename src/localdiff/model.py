"""Model adapter: load an unconditional diffusers U-Net and split it at its bottleneck (h-space).

``encode(x_t, t)`` runs the time embedding, the input convolution, the down blocks and the mid block and
returns ``h`` (the mid-block output) together with the skip activations and the time embedding.
``decode(h, skips, temb)`` runs the up blocks and the output head. With ``x_t`` held fixed, ``h -> eps`` is
``decode`` alone, so every Jacobian-vector product with respect to ``h`` costs decoder passes only.

Both halves are built from the model's own submodules, in the order of ``UNet2DModel.forward``; nothing in
diffusers is patched. Branches of ``UNet2DModel.forward`` that the split cannot keep (class conditioning,
score-SDE ``skip_conv`` blocks, Fourier time embeddings) are rejected at load time with a clear message.
"""

from __future__ import annotations

import hashlib
import json
import logging
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from localdiff.errors import LocalDiffError

log = logging.getLogger("localdiff")

# Config keys that say nothing about the network itself and must not change its fingerprint.
_VOLATILE_CONFIG_KEYS = {"_name_or_path", "_diffusers_version", "_use_default_values"}


@dataclass
class Encoded:
    """What the encoder half returns: the bottleneck ``h`` and what the decoder half needs besides it."""

    h: Tensor
    skips: tuple[Tensor, ...]
    temb: Tensor


class DiffusionModel:
    """An epsilon-prediction ``UNet2DModel`` with its noise schedule, split at h-space.

    Use :func:`load_model` (or :meth:`from_pretrained`) to build one. ``device`` and ``dtype`` are chosen at
    load time; inputs are moved to them by the callers in :mod:`localdiff.sampling`.
    """

    def __init__(self, unet, scheduler, *, name: str = "", fingerprint: str | None = None):
        _check_supported(unet, scheduler, name)
        self.unet = unet.eval().requires_grad_(False)
        self.scheduler = scheduler
        self.name = name
        self._fingerprint = fingerprint

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, source: str | Path, *, torch_dtype: torch.dtype = torch.float32, device="cpu",
                        dtype: torch.dtype | None = None) -> "DiffusionModel":
        return load_model(source, device=device, torch_dtype=torch_dtype, dtype=dtype)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def resolution(self) -> int:
        size = self.unet.config.sample_size
        return int(size if isinstance(size, int) else size[0])

    @property
    def in_channels(self) -> int:
        return int(self.unet.config.in_channels)

    @property
    def num_train_timesteps(self) -> int:
        return int(self.scheduler.config.num_train_timesteps)

    @property
    def fingerprint(self) -> str:
        """A short hash of the U-Net config and weights; directions remember it to refuse foreign models."""
        if self._fingerprint is None:
            self._fingerprint = fingerprint_unet(self.unet)
        return self._fingerprint

    @property
    def h_shape(self) -> tuple[int, ...]:
        """Shape of h for one image (channels, height, width)."""
        if not hasattr(self, "_h_shape"):
            r = self.resolution
            x = torch.zeros(1, self.in_channels, r, r, device=self.device, dtype=self.dtype)
            with torch.inference_mode():
                self._h_shape = tuple(self.encode(x, 0).h.shape[1:])
        return self._h_shape

    # ------------------------------------------------------------------ the split
    def _timesteps(self, t, batch: int) -> Tensor:
        t = torch.as_tensor(t, device=self.device)
        if t.ndim == 0:
            t = t[None]
        return t.expand(batch) if t.shape[0] == 1 else t

    def encode(self, x: Tensor, t) -> Encoded:
        """Encoder half: ``x_t`` (B, C, H, W) and timestep(s) ``t`` -> h, skips and time embedding."""
        unet = self.unet
        if unet.config.center_input_sample:
            x = 2 * x - 1.0
        t_emb = unet.time_proj(self._timesteps(t, x.shape[0])).to(dtype=unet.dtype)
        temb = unet.time_embedding(t_emb)
        sample = unet.conv_in(x)
        skips: tuple[Tensor, ...] = (sample,)
        for block in unet.down_blocks:
            sample, res = block(hidden_states=sample, temb=temb)
            skips += res
        h = unet.mid_block(sample, temb)
        # The mid-block attention leaves h channels-last strided; group_norm's forward-mode AD needs it
        # contiguous (method.md section 8).
        return Encoded(h.contiguous(), skips, temb)

    def decode(self, h: Tensor, skips: tuple[Tensor, ...], temb: Tensor) -> Tensor:
        """Decoder half: h (with the encoder's skips and time embedding held fixed) -> predicted noise."""
        unet = self.unet
        sample = h
        for block in unet.up_blocks:
            n = len(block.resnets)
            res, skips = skips[-n:], skips[:-n]
            sample = block(sample, res, temb)
        sample = unet.conv_norm_out(sample)
        sample = unet.conv_act(sample)
        return unet.conv_out(sample)

    def eps(self, x: Tensor, t, delta_h: Tensor | None = None) -> Tensor:
        """Predicted noise, optionally with ``delta_h`` added to h (broadcast over the batch)."""
        enc = self.encode(x, t)
        h = enc.h if delta_h is None else enc.h + delta_h
        return self.decode(h, enc.skips, enc.temb)


def quiet_diffusers() -> None:
    """Silence diffusers' chatter (the "accelerate not found" hint, dtype notes): it is not for our users.

    Before diffusers is imported this only sets ``DIFFUSERS_VERBOSITY`` (importing it costs seconds that a command
    failing on bad input should not pay); afterwards it sets the verbosity directly."""
    import os
    import sys

    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    if "diffusers" in sys.modules:
        from diffusers.utils import logging as dlogging

        dlogging.set_verbosity_error()


@contextmanager
def _diffusers_errors_only():
    """Within the block, diffusers logs errors only (its loading hints are not for our users); restored after."""
    from diffusers.utils import logging as dlogging

    before = dlogging.get_verbosity()
    dlogging.set_verbosity_error()
    try:
        yield
    finally:
        dlogging.set_verbosity(before)


# ---------------------------------------------------------------------- loading
def load_model(source: str | Path, *, device="cpu", torch_dtype: torch.dtype = torch.float32,
               dtype: torch.dtype | None = None) -> DiffusionModel:
    """Load an unconditional diffusers model from a hub id or a local folder.

    The folder (or hub repository) is a saved ``DDPMPipeline``/``DDIMPipeline`` or any layout with ``unet/``
    and ``scheduler/`` subfolders; a bare ``UNet2DModel`` folder (``config.json`` + weights) is accepted too
    and gets a default linear DDPM schedule. Weights load through diffusers' own ``from_pretrained``; its
    loading hints ("accelerate not found", dtype notes) are silenced. ``torch_dtype`` and ``device`` as in
    diffusers (``dtype`` is the deprecated name of ``torch_dtype``).
    """
    if dtype is not None:
        from localdiff.config import warn_renamed

        warn_renamed("load_model(dtype=...)", "torch_dtype=...")
        torch_dtype = dtype
    with _diffusers_errors_only():
        return _load_model(source, device=device, dtype=torch_dtype)


def _load_model(source: str | Path, *, device="cpu", dtype=torch.float32) -> DiffusionModel:
    from diffusers import DDIMScheduler, UNet2DModel

    source_str = str(source)
    path = Path(source_str).expanduser()
    if path.exists():
        if not path.is_dir():
            raise LocalDiffError(
                f"model {source_str} is a file; --model takes a diffusers model folder (with unet/ and "
                f"scheduler/, or config.json) or a hub id such as google/ddpm-ema-celebahq-256"
            )
        if (path / "unet" / "config.json").is_file():
            unet_sub, sched_sub = "unet", "scheduler"
        elif (path / "config.json").is_file():
            unet_sub, sched_sub = None, None
        else:
            raise LocalDiffError(
                f"{source_str} is not a diffusers model folder (no unet/config.json or config.json); save one "
                f"with DDPMPipeline.save_pretrained or pass a hub id"
            )
        _check_unet_class(path / (unet_sub or "") / "config.json", source_str)
        has_sched = (path / (sched_sub or "") / "scheduler_config.json").is_file()
    elif source_str.count("/") == 1 and not source_str.startswith((".", "/", "~")):
        unet_sub, sched_sub, has_sched = "unet", "scheduler", True
        _check_hub_reachable(source_str)
    else:
        raise LocalDiffError(f"model {source_str} not found: give a diffusers model folder or a hub id (owner/name)")

    try:
        kwargs = {"subfolder": unet_sub} if unet_sub else {}
        unet = UNet2DModel.from_pretrained(source_str, **kwargs)
    except LocalDiffError:
        raise
    except (OSError, ValueError, EnvironmentError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LocalDiffError(f"could not load the U-Net of {source_str}: {first}") from exc
    if has_sched:
        try:
            kwargs = {"subfolder": sched_sub} if sched_sub else {}
            scheduler = DDIMScheduler.from_pretrained(source_str, **kwargs)
        except (OSError, ValueError) as exc:
            raise LocalDiffError(f"could not load the scheduler of {source_str}: {exc}") from exc
    else:
        log.warning("no scheduler config in %s; using diffusers' default linear DDPM schedule", source_str)
        scheduler = DDIMScheduler()

    fp = fingerprint_unet(unet)  # before any dtype cast, so the fingerprint does not depend on dtype
    unet = unet.to(device=device, dtype=dtype)
    return DiffusionModel(unet, scheduler, name=source_str, fingerprint=fp)


def _hub_cached(repo_id: str) -> bool:
    """Whether the hub model's U-Net config is in the local Hugging Face cache (no network is used)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, "unet/config.json")
    return isinstance(found, str)


def _check_hub_reachable(repo_id: str, timeout: float = 3.0) -> None:
    """Fail at once, with advice, when a hub model is neither cached nor downloadable (offline machine): the hub
    client would otherwise retry for half a minute and then blame a missing config.json."""
    import os
    import socket
    from urllib.parse import urlparse

    if _hub_cached(repo_id):
        return
    advice = (f"download it where there is a network (huggingface-cli download {repo_id}) into the Hugging Face "
              f"cache, or save it to a folder and pass --model FOLDER")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise LocalDiffError(f"model {repo_id} is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; {advice}")
    endpoint = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as exc:
        raise LocalDiffError(f"model {repo_id} is not in the local Hugging Face cache and {host} cannot be reached "
                             f"({exc.strerror or type(exc).__name__}); {advice}") from None


def _check_unet_class(config_path: Path, source: str) -> None:
    try:
        config = json.loads(config_path.read_text("utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LocalDiffError(f"{config_path} is not a readable JSON model config: {exc}") from exc
    cls = config.get("_class_name", "UNet2DModel")
    if cls != "UNet2DModel":
        raise LocalDiffError(
            f"{source} holds a {cls}; localdiff edits unconditional pixel-space UNet2DModel models only"
        )


def _check_supported(unet, scheduler, name: str) -> None:
    cfg = unet.config
    what = name or "this model"
    if getattr(unet, "mid_block", None) is None:
        raise LocalDiffError(f"{what} has no mid block, so it has no h-space to edit")
    if getattr(unet, "class_embedding", None) is not None:
        raise LocalDiffError(f"{what} is class-conditional; localdiff supports unconditional models only")
    if cfg.time_embedding_type == "fourier":
        raise LocalDiffError(f"{what} uses Fourier time embeddings (score-SDE style), which localdiff does not support")
    if any(hasattr(b, "skip_conv") for b in list(unet.down_blocks) + list(unet.up_blocks)):
        raise LocalDiffError(f"{what} has skip_conv blocks (score-SDE style), which localdiff does not support")
    prediction = scheduler.config.get("prediction_type", "epsilon")
    if prediction != "epsilon":
        raise LocalDiffError(f"{what} predicts {prediction!r}; localdiff needs an epsilon-prediction model")


def fingerprint_unet(unet) -> str:
    """sha256 over the U-Net's config (minus bookkeeping keys) and its weights as float32, 16 hex digits."""
    digest = hashlib.sha256()
    config = {k: v for k, v in dict(unet.config).items() if k not in _VOLATILE_CONFIG_KEYS}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for key, tensor in sorted(unet.state_dict().items()):
        digest.update(key.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def default_model_path() -> Path | None:
    """The embedded default model shipped inside the package, or ``None`` if this install has none."""
    path = Path(__file__).parent / "default_model"
    return path if (path / "unet" / "config.json").is_file() else None
