"""Mask loading and the shipped region templates."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from localdiff import LocalDiffError
from localdiff.masks import load_mask, template_names, template_path


def test_templates_are_shipped_and_sensible():
    assert {"eyes", "nose", "mouth", "hair"} <= set(template_names())
    masks = {n: load_mask(template_path(n), 64, name=n) for n in template_names()}
    rows = {n: torch.nonzero(m)[:, 0].float().mean().item() for n, m in masks.items()}
    assert rows["hair"] < rows["eyes"] < rows["nose"] < rows["mouth"]  # top to bottom of an aligned face
    for a in ("eyes", "nose", "mouth"):
        for b in ("eyes", "nose", "mouth"):
            if a != b:
                assert not (masks[a] & masks[b]).any(), (a, b)
    with pytest.raises(LocalDiffError, match="no mask template"):
        template_path("tail")


def test_mask_resizing_and_formats(tmp_path):
    m = np.zeros((64, 64), np.uint8)
    m[10:20, 10:30] = 255
    Image.fromarray(m).save(tmp_path / "m.png")
    small = load_mask(tmp_path / "m.png", 16, name="m")
    assert small.shape == (16, 16) and small[3, 4] and not small[10, 10]
    rgba = np.zeros((64, 64, 4), np.uint8)
    rgba[30:40, 30:40, 3] = 255  # painted on a transparent canvas: alpha is the mask
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    a = load_mask(tmp_path / "a.png", 64, name="a")
    assert a.sum() == 100
    assert load_mask(torch.from_numpy(m > 0), 64, name="t").sum() == 200
    with pytest.raises(LocalDiffError, match="image's size"):
        load_mask(tmp_path / "m.png", 32, name="m", image_size=(48, 48))
