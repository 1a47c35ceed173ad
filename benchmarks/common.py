"""Shared helpers for the benchmarks: model architectures (random weights, no download) and timing."""

from __future__ import annotations

import platform
import statistics
import time
from typing import Callable

import torch

# google/ddpm-ema-celebahq-256's unet/config.json (diffusers), weights not needed for timing.
CELEBAHQ_256 = dict(
    sample_size=256, in_channels=3, out_channels=3, layers_per_block=2,
    block_out_channels=(128, 128, 256, 256, 512, 512),
    down_block_types=("DownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D", "UpBlock2D"),
    norm_num_groups=32, norm_eps=1e-6, act_fn="silu", attention_head_dim=None, center_input_sample=False,
    flip_sin_to_cos=False, freq_shift=1, time_embedding_type="positional", downsample_padding=0,
    mid_block_scale_factor=1,
)

# A 64 px model of the size the method notes measured (about 25 M parameters, attention at 16x16 and 8x8).
PIXEL_64 = dict(
    sample_size=64, layers_per_block=2, block_out_channels=(64, 128, 256, 256),
    down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
)


def random_model(config: dict, device="cpu", dtype=torch.float32, seed: int = 0):
    """A DiffusionModel with random weights built from a diffusers config (no download)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from localdiff.model import DiffusionModel

    torch.manual_seed(seed)
    unet = UNet2DModel(**config).to(device=device, dtype=dtype)
    return DiffusionModel(unet, DDIMScheduler(), name=f"random-{config['sample_size']}px", fingerprint="random")


def timeit(fn: Callable[[], object], repeat: int = 3, warmup: int = 1, device="cpu") -> float:
    """Median wall time of ``fn`` in seconds (synchronising CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def environment(device="cpu") -> str:
    import diffusers

    dev = torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else (
        platform.processor() or platform.machine())
    return (f"device {device} ({dev}), torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"threads {torch.get_num_threads()}, python {platform.python_version()}")


def eval_faces_and_masks(n_faces: int, regions, steps: int):
    """The embedded default model's editor (``steps`` DDIM steps), its template masks for ``regions`` and the
    first ``n_faces`` evaluation faces of the face GAN at its resolution (needs gan-face-generate)."""
    from localdiff import LocalEditor
    from localdiff.facegan import FaceGAN, eval_seeds
    from localdiff.masks import load_mask, template_path

    editor = LocalEditor.from_pretrained(num_inference_steps=steps)
    res = editor.model.resolution
    masks = {r: load_mask(template_path(r), res, name=r) for r in regions}
    faces = FaceGAN().faces(eval_seeds(n_faces))
    if faces.shape[-1] != res:
        faces = torch.nn.functional.interpolate(faces, size=res, mode="bilinear", antialias=True)
    return editor, masks, faces


def reference_fit_options(name: str, min_locality: float | None = None) -> dict:
    """``reference_directions`` keywords of a benchmark's fit name: ``measured``, ``projected``, or ``local`` (the
    measured fit with ``min_locality``)."""
    return dict(fit="measured", min_locality=min_locality) if name == "local" else dict(fit=name)


def mean_interval(values, *, signed: bool = False) -> str:
    """``mean [lo, hi]``: the mean and its 95 % percentile bootstrap interval (``signed``: with + for gains)."""
    import statistics

    from localdiff.evaluation import bootstrap_interval

    lo, hi = bootstrap_interval(values)
    f = "+.3f" if signed else ".3f"
    return f"{statistics.fmean(values):{f}} [{lo:{f}}, {hi:{f}}]"
