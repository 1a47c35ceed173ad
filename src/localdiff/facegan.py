"""Aligned 64x64 training/evaluation faces from the DCGAN that ships in ``gan-face-generate``.

The embedded default model is distilled from this GAN: faces are drawn on the fly from integer seeds, never
stored. Seed ranges are fixed and disjoint:

* training seeds: ``0 .. 9_999_999`` (``TRAIN_SEEDS``)
* evaluation seeds: ``10_000_000 ..`` (``EVAL_SEED_START``); the shipped example faces and the 32-face
  evaluation use the first ones; sample quality uses three further disjoint blocks (``SWD_REFERENCE_SEEDS``,
  ``SWD_FLOOR_SEEDS``, ``VALIDATION_SEEDS``).

Face ``i`` depends on seed ``i`` alone (its own generator), not on the batch it is drawn in. Licence: the GAN
code and weights are MIT; its training data, DigiFace-1M, is for non-commercial research only.

Install the GAN without its unneeded dependencies: ``pip install --no-deps gan-face-generate==1.1.1``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from localdiff.errors import LocalDiffError

TRAIN_SEEDS = range(0, 10_000_000)
EVAL_SEED_START = 10_000_000
SWD_REFERENCE_SEEDS = EVAL_SEED_START + 100_000  # the reference set of the SWD sample-quality number
SWD_FLOOR_SEEDS = EVAL_SEED_START + 200_000  # a second GAN set: the GAN-vs-GAN floor of that number
VALIDATION_SEEDS = EVAL_SEED_START + 300_000  # held-out faces for the epsilon MSE
LATENT = 100


class FaceGAN:
    """The pretrained DCGAN generator: ``faces(seeds)`` -> (N, 3, 64, 64) in [-1, 1]."""

    def __init__(self, device="cpu"):
        try:
            from importlib.resources import files

            from gan_face_generate.models import Generator
        except ImportError as exc:
            raise LocalDiffError(
                "the face GAN is not installed; run: pip install --no-deps gan-face-generate==1.1.1"
            ) from exc
        self.device = torch.device(device)
        self.net = Generator(0, 3, LATENT, 64)
        state = torch.load(files("gan_face_generate") / "weights.tar", map_location="cpu", weights_only=True)
        self.net.load_state_dict(state["netG_state_dict"])
        self.net.eval().requires_grad_(False).to(self.device)

    @staticmethod
    def latents(seeds: Sequence[int]) -> Tensor:
        return torch.stack([torch.randn(LATENT, generator=torch.Generator().manual_seed(int(s))) for s in seeds])

    @torch.no_grad()
    def faces(self, seeds: Sequence[int]) -> Tensor:
        z = self.latents(seeds).to(self.device)[:, :, None, None]
        return self.net(z).clamp(-1, 1)

    def face_range(self, start: int, n: int, batch_size: int = 256) -> Tensor:
        """Faces of seeds ``start .. start + n - 1``, drawn in batches."""
        return torch.cat([self.faces(range(s, min(s + batch_size, start + n)))
                          for s in range(start, start + n, batch_size)])


def eval_seeds(n: int) -> list[int]:
    """The first ``n`` evaluation seeds (disjoint from the training seeds)."""
    return list(range(EVAL_SEED_START, EVAL_SEED_START + n))
