"""Automatic regions from the model itself: k-means against planted clusters, and auto_regions' contract (N disjoint,
non-empty masks covering the image) on a test model, through the API and the CLI."""

from __future__ import annotations

import pytest
import torch

from localdiff.cli import main
from localdiff.errors import LocalDiffError
from localdiff.regions import kmeans, regions_from_profiles

from conftest import texture


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [5.0, 0.0], [0.0, 5.0], [5.0, 5.0]], dtype=torch.float64)
    truth = torch.arange(4).repeat_interleave(50)
    x = centres[truth] + 0.5 * torch.randn(200, 2, generator=g, dtype=torch.float64)
    labels = kmeans(x, 4, seed=1)
    # the same partition up to the cluster names: each planted cluster maps to one label, and vice versa
    pairs = {(int(t), int(lab)) for t, lab in zip(truth, labels)}
    assert len(pairs) == 4 and len({lab for _, lab in pairs}) == 4
    with pytest.raises(ValueError):
        kmeans(x[:3], 4)


def test_kmeans_keeps_every_cluster_non_empty():
    x = torch.zeros(30, 2, dtype=torch.float64)
    x[0] = 10.0  # 29 identical points and one outlier: 3 clusters must still all be used
    labels = kmeans(x, 3)
    assert sorted(set(labels.tolist())) == [0, 1, 2]


def test_regions_from_profiles_follow_the_profiles():
    """Two halves with different response patterns become two regions along the boundary, named top-down."""
    res = 16
    prof = torch.zeros(res, res, 2, dtype=torch.float64)
    prof[: res // 2, :, 0] = 1.0
    prof[res // 2:, :, 1] = 1.0
    regions = regions_from_profiles(prof.view(-1, 2), res, 2)
    assert list(regions) == ["region1", "region2"]
    assert regions["region1"][: res // 2].all() and not regions["region1"][res // 2:].any()


def test_auto_regions_partition_the_image(small_dir):
    from localdiff import LocalEditor
    from localdiff.regions import auto_regions

    editor = LocalEditor.from_pretrained(small_dir, num_inference_steps=6)
    regions = auto_regions(editor, texture(16), 4, k=4)
    masks = torch.stack(list(regions.values()))
    assert masks.shape == (4, 16, 16) and masks.dtype == torch.bool
    assert (masks.sum(0) == 1).all()  # disjoint and covering
    assert all(m.any() for m in masks)
    with pytest.raises(LocalDiffError, match="2..16"):
        auto_regions(editor, texture(), 1)


def test_discover_auto_regions_cli(small_dir, tmp_path, capsys):
    from localdiff import Directions
    from PIL import Image

    img = tmp_path / "tex.png"
    Image.fromarray(((texture(16)[0].permute(1, 2, 0) + 1) * 127.5).byte().numpy()).save(img)
    out, regions_dir = tmp_path / "auto.safetensors", tmp_path / "regions"
    code = main(["discover", str(img), "--auto-regions", "3", "--regions-out", str(regions_dir), "--model",
                 str(small_dir), "--steps", "6", "--k", "2", "--individual-rank", "1", "--max-iter", "4",
                 "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert Directions.load(out).regions == ["region1", "region2", "region3"]
    assert sorted(p.name for p in regions_dir.iterdir()) == ["region1.png", "region2.png", "region3.png"]
    assert main(["discover", str(img), "--auto-regions", "3", "--mask", "top=x.png", "--model", str(small_dir),
                 "--out", str(tmp_path / "no.safetensors")]) == 2
    assert not (tmp_path / "no.safetensors").exists()
