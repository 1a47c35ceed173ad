"""Small diffusers models made by the tests, saved with ``save_pretrained`` and loaded back through the same
``from_pretrained`` path a hub id takes.

Random weights are no denoiser: DDIM inversion through an undamped random U-Net diverges (measured -16 dB),
so the test models' output convolution is scaled by ``EPS_SCALE``. That keeps every code path (split,
Jacobians, JIVE, editing) exercised while making the inversion round trip a meaningful check of the DDIM
arithmetic. Reconstruction quality of a *trained* model is measured on the embedded default model.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the tests never need the network; fail hub look-ups at once

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

EPS_SCALE = 0.03
RES = 32

torch.set_num_threads(2)


def make_unet(kind: str, seed: int = 0):
    from diffusers import UNet2DModel

    torch.manual_seed(seed)
    if kind == "attn32":  # attention in a down/up block and at the bottleneck (mid block)
        unet = UNet2DModel(
            sample_size=32, block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
        )
    elif kind == "plain16":  # no attention anywhere, centre_input_sample branch
        unet = UNet2DModel(
            sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
            down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
            add_attention=False, center_input_sample=True,
        )
    else:
        raise ValueError(kind)
    with torch.no_grad():
        unet.conv_out.weight.mul_(EPS_SCALE)
        unet.conv_out.bias.mul_(EPS_SCALE)
    return unet


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    """A saved DDPMPipeline (model_index.json + unet/ + scheduler/), 32 px, with attention."""
    from diffusers import DDPMPipeline, DDPMScheduler

    path = tmp_path_factory.mktemp("attn32")
    DDPMPipeline(unet=make_unet("attn32"), scheduler=DDPMScheduler(num_train_timesteps=1000)).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def small_dir(tmp_path_factory):
    """A 16 px model in the unet/ + scheduler/ layout without model_index.json."""
    from diffusers import DDIMScheduler

    path = tmp_path_factory.mktemp("plain16")
    make_unet("plain16").save_pretrained(path / "unet")
    DDIMScheduler(num_train_timesteps=1000).save_pretrained(path / "scheduler")
    return path


def texture(res: int = RES, seed: int = 0) -> torch.Tensor:
    """A random-texture test image (1, 3, res, res) in [-0.8, 0.8]."""
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(1, 3, res, res, generator=g) * 2 - 1) * 0.8


def box(res: int, rows: tuple[int, int], cols: tuple[int, int]) -> torch.Tensor:
    m = torch.zeros(res, res, dtype=torch.bool)
    m[rows[0]:rows[1], cols[0]:cols[1]] = True
    return m


REGIONS = {
    "eyes": box(RES, (4, 12), (4, 28)),
    "mouth": box(RES, (20, 28), (8, 24)),
    "side": box(RES, (10, 22), (0, 10)),
}


@pytest.fixture(scope="session")
def editor(model_dir):
    from localdiff import LocalEditor

    return LocalEditor.from_pretrained(model_dir, num_inference_steps=10)


@pytest.fixture(scope="session")
def discovered(editor):
    """JIVE directions (the paper's method) for three regions of the texture image (shared by several tests:
    discovery is the slow part)."""
    return editor.discover(texture(), REGIONS, method="jive", k=4, individual_rank=2, timestep=0.5)


def save_png(array: np.ndarray, path) -> str:
    Image.fromarray(array).save(path)
    return str(path)
