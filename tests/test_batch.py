"""Folders of images (edit/discover --images, accelerate launch), the diffusers-style API names and the typed
discovery settings."""

from __future__ import annotations

import csv
import math
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from localdiff import DiscoveryConfig, LocalDiffError, LocalEditor
from localdiff.cli import main
from localdiff.jacobian import principal_angles

from conftest import REGIONS, save_png, texture

SIZE = 16


# ---------------------------------------------------------------------- API names and settings
def test_discovery_config_replaces_the_dicts(small_dir):
    cfg = DiscoveryConfig.fast(method="masked")
    assert (cfg.k, cfg.individual_rank, cfg.method) == (3, 2, "masked")
    assert cfg.changes() == dict(method="masked", k=3, individual_rank=2, tol_deg=0.5, max_iter=15)
    with pytest.raises(LocalDiffError, match="unknown discovery setting 'kk'"):
        cfg.replace(kk=3)
    with pytest.warns(FutureWarning, match="DiscoveryConfig"):
        from localdiff.editor import DEFAULTS
    assert DEFAULTS["k"] == DiscoveryConfig.k and DEFAULTS["num_steps"] == 50 and DEFAULTS["schedule"] == "all"
    with pytest.warns(FutureWarning, match=r"DiscoveryConfig\.fast"):
        from localdiff.editor import FAST_DISCOVERY
    assert FAST_DISCOVERY == dict(k=3, individual_rank=2, tol_deg=0.5, max_iter=15)
    with pytest.warns(FutureWarning, match="num_inference_steps"):
        old = LocalEditor.from_pretrained(small_dir, num_steps=4)
    assert old.num_inference_steps == 4
    with pytest.warns(FutureWarning, match="torch_dtype"):
        bf = LocalEditor.from_pretrained(small_dir, dtype=torch.bfloat16)
    assert bf.model.dtype == torch.bfloat16
    new = LocalEditor.from_pretrained(small_dir, torch_dtype=torch.bfloat16, device="cpu", num_inference_steps=4)
    assert new.model.dtype == torch.bfloat16 and new.num_inference_steps == 4


@pytest.fixture(scope="module")
def small_editor(small_dir):
    return LocalEditor.from_pretrained(small_dir, num_inference_steps=6)


def test_integer_timestep_is_a_training_timestep(small_editor):
    image = texture(SIZE)
    masks = {"top": REGIONS["eyes"][::2, ::2], "bottom": REGIONS["mouth"][::2, ::2]}
    by_fraction = small_editor.discover(image, masks, method="masked", k=2, individual_rank=2, timestep=0.5)
    by_t = small_editor.discover(image, masks, DiscoveryConfig(method="masked", k=2, individual_rank=2, timestep=500))
    assert by_t.meta["timestep"] == by_fraction.meta["timestep"]
    assert torch.equal(by_t.individual["top"], by_fraction.individual["top"])
    for bad in (1000, -1, 1.5, True):
        with pytest.raises(LocalDiffError, match="timestep"):
            small_editor.discover(image, masks, method="masked", k=2, individual_rank=2, timestep=bad)
    d = by_t["top"][0]
    a = small_editor.render(image, [[(d, 0.3)]], schedule="single", timestep=500)
    b = small_editor.render(image, [[(d, 0.3)]], schedule="single", timestep=0.5)
    c = small_editor.render(image, [[(d, 0.3)]], schedule="single", timestep=0.9)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_generator_draws_the_seed(small_editor):
    image = texture(SIZE)
    masks = {"top": REGIONS["eyes"][::2, ::2]}
    a, b = (small_editor.discover(image, masks, method="masked", k=2, individual_rank=1, max_iter=3,
                                  generator=torch.Generator().manual_seed(1)) for _ in range(2))
    assert a.meta["seed"] == b.meta["seed"] != 0
    assert torch.equal(a.individual["top"], b.individual["top"])


def test_output_types_follow_diffusers(small_editor):
    image = texture(SIZE)
    d = small_editor.discover(image, {"top": REGIONS["eyes"][::2, ::2]}, method="masked", k=2,
                              individual_rank=1)["top"][0]
    pil = small_editor.edit(image, d, 0.3)
    pt = small_editor.edit(image, d, 0.3, output_type="pt")
    arr = small_editor.edit(image, d, 0.3, output_type="np")
    assert isinstance(pil, Image.Image) and pil.size == (SIZE, SIZE)
    assert pt.shape == (3, SIZE, SIZE) and 0 <= float(pt.min()) and float(pt.max()) <= 1
    assert arr.shape == (SIZE, SIZE, 3) and np.allclose(arr, pt.permute(1, 2, 0).numpy())
    assert np.abs(np.asarray(pil, dtype=np.float64) / 255 - arr).max() <= 0.5 / 255 + 1e-6
    frames = small_editor.sweep(image, d, [-0.3, 0.0, 0.3])
    assert len(frames) == 3 and all(isinstance(f, Image.Image) for f in frames)
    assert small_editor.sweep(image, d, [-0.3, 0.3], output_type="pt").shape == (2, 3, SIZE, SIZE)
    with pytest.raises(LocalDiffError, match="output_type"):
        small_editor.edit(image, d, 0.3, output_type="latent")


@pytest.mark.parametrize("schedule", ["all", "window"])
def test_batched_edit_matches_one_at_a_time(small_editor, schedule):
    images = [texture(SIZE, seed=s) for s in range(3)]
    d = small_editor.discover(images[0], {"top": REGIONS["eyes"][::2, ::2]}, method="masked", k=2,
                              individual_rank=1, timestep=0.5)["top"][0]
    together = small_editor.edit(images, d, 0.3, output_type="pt", schedule=schedule)
    alone = torch.stack([small_editor.edit(im, d, 0.3, output_type="pt", schedule=schedule) for im in images])
    assert together.shape == (3, 3, SIZE, SIZE)
    assert (together - alone).abs().max() < 1e-4
    unedited = torch.stack([small_editor.edit(im, d, 0.0, output_type="pt") for im in images])
    assert (together - unedited).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every image was edited


def test_joint_discovery_is_the_stacked_jacobian(small_editor):
    """Directions discovered over two images are the top right singular vectors of [m J_1; m J_2], checked
    against the explicit Jacobians (jacrev) and an SVD."""
    from torch.func import jacrev

    images = [texture(SIZE, seed=s) for s in (3, 4)]
    mask = REGIONS["mouth"][::2, ::2]
    exact = dict(method="masked", k=2, individual_rank=2, oversample=6, timestep=0.6, tol_deg=0.05, max_iter=60)
    joint = small_editor.discover(images, {"mouth": mask}, **exact)
    model = small_editor.model
    blocks = []
    for im in images:
        inv = small_editor.invert(im)
        step = inv.schedule.index_of(0.6)
        enc = model.encode(inv.xs[step], inv.schedule.timesteps[step])
        jac = jacrev(lambda h: model.decode(h, enc.skips, enc.temb))(enc.h).reshape(-1, enc.h.numel())
        blocks.append(jac * mask.float().expand(3, -1, -1).reshape(-1, 1))
    _, _, vh = torch.linalg.svd(torch.cat(blocks).double(), full_matrices=False)
    assert principal_angles(joint.individual["mouth"], vh[:2]).max() < 0.5
    single = small_editor.discover(images[0], {"mouth": mask}, **exact)
    assert principal_angles(single.individual["mouth"], vh[:2]).max() > 2  # the joint subspace is not image 0's
    assert joint.meta["images"] == 2 and "+" in joint.meta["source_image_hash"]
    assert math.isclose(joint.unit, sum(float(small_editor.invert(im).hs[joint.meta["step_index"]].norm())
                                        for im in images) / 2, rel_tol=1e-6)


# ---------------------------------------------------------------------- folders on the command line
@pytest.fixture()
def folder(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    rng = np.random.default_rng(1)
    for i in range(5):
        save_png(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8), d / f"img{i}.png")
    return d


@pytest.fixture(scope="module")
def folder_dirs(tmp_path_factory, small_dir):
    d = tmp_path_factory.mktemp("folder_dirs")
    m = np.zeros((SIZE, SIZE), np.uint8)
    m[2:7, 3:13] = 255
    save_png(m, d / "top.png")
    rng = np.random.default_rng(2)
    save_png(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8), d / "face.png")
    out = d / "dirs.safetensors"
    assert main(["discover", str(d / "face.png"), "--mask", f"top={d / 'top.png'}", "--model", str(small_dir),
                 "--steps", "6", "--k", "2", "--individual-rank", "1", "--out", str(out), "-q"]) == 0
    return out


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_edit_folder_batches_reports_and_resumes(folder, folder_dirs, small_dir, tmp_path, capsys):
    (folder / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    args = ["edit", "--images", str(folder), "--out-dir", str(out), "--directions", str(folder_dirs),
            "--direction", "top:0", "--strength", "0.3", "--model", str(small_dir), "--batch-size", "2", "-q"]
    assert main(args) == 1  # one bad image: the others are done, the exit says some failed
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("localdiff: ") and "broken.png" in err[0]
    rows = {r["image"]: r for r in _rows(out / "results.csv")}
    assert sorted(rows) == ["broken.png"] + [f"img{i}.png" for i in range(5)]
    assert rows["broken.png"]["status"] == "failed" and rows["broken.png"]["error"]
    assert all(rows[f"img{i}.png"]["status"] == "ok" and float(rows[f"img{i}.png"]["seconds"]) > 0 for i in range(5))
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.png" for i in range(5)] + ["results.csv"]
    # the same as editing each image alone
    single = tmp_path / "single.png"
    assert main(["edit", str(folder / "img3.png"), "--out", str(single), "--directions", str(folder_dirs),
                 "--direction", "top:0", "--strength", "0.3", "--model", str(small_dir), "-q"]) == 0
    diff = np.abs(np.asarray(Image.open(single), np.int16) - np.asarray(Image.open(out / "img3.png"), np.int16))
    assert diff.max() <= 1
    # resumed: nothing is redone, the bad image is tried again; once it is gone, the run succeeds
    before = (out / "img0.png").stat().st_mtime_ns
    (folder / "broken.png").unlink()
    assert main(args) == 0
    assert (out / "img0.png").stat().st_mtime_ns == before
    rows = _rows(out / "results.csv")
    assert [r["image"] for r in rows] == [f"img{i}.png" for i in range(5)] and all(r["status"] == "ok" for r in rows)


def test_folder_refusals(folder, folder_dirs, small_dir, tmp_path, capsys):
    base = ["--directions", str(folder_dirs), "--direction", "top:0", "--strength", "0.3", "--model", str(small_dir)]
    empty = tmp_path / "empty"
    empty.mkdir()
    for args, message in (
        (["edit", "--images", str(folder), *base], "--out-dir"),
        (["edit", "--images", str(folder), "--out", str(tmp_path / "x.png"), *base], "--out-dir"),
        (["edit", str(folder / "img0.png"), "--images", str(folder), "--out-dir", str(tmp_path / "o"), *base],
         "not both"),
        (["edit", "--images", str(empty), "--out-dir", str(tmp_path / "o"), *base], "no PNG/JPEG"),
        (["edit", *base], "IMAGE"),
        (["discover", "--images", str(folder), "--mask", "eyes", "--model", str(small_dir)], "--out-dir"),
        (["discover", "--images", str(folder), "--mean", "--mask", "eyes", "--out-dir", str(tmp_path / "o"),
          "--model", str(small_dir)], "--out"),
    ):
        assert main(args) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0], (args, err)
    assert not (tmp_path / "o").exists()
    twin = tmp_path / "twin"
    shutil.copytree(folder, twin)
    Image.open(twin / "img0.png").save(twin / "img0.jpg")
    assert main(["edit", "--images", str(twin), "--out-dir", str(tmp_path / "o"), *base]) == 2
    assert "img0" in capsys.readouterr().err


def test_discover_folder_per_image_and_mean(folder, small_dir, tmp_path, capsys):
    mask = np.zeros((20, 20), np.uint8)
    mask[3:9, 4:16] = 255
    mask_path = save_png(mask, tmp_path / "top.png")
    common = ["--mask", f"top={mask_path}", "--model", str(small_dir), "--steps", "4", "--k", "2",
              "--individual-rank", "1", "--method", "masked", "--max-iter", "4", "-q"]
    out = tmp_path / "dirs"
    assert main(["discover", "--images", str(folder), "--out-dir", str(out), *common]) == 0
    assert sorted(p.name for p in out.iterdir()) == [f"img{i}.safetensors" for i in range(5)] + ["results.csv"]
    mean = tmp_path / "mean.safetensors"
    assert main(["discover", "--images", str(folder), "--mean", "--out", str(mean), *common]) == 0
    from localdiff import Directions

    joint = Directions.load(mean)
    assert joint.meta["images"] == 5
    one = Directions.load(out / "img0.safetensors")
    assert principal_angles(joint.individual["top"], one.individual["top"]).max() > 1  # not just image 0's


def test_accelerate_launch_two_processes(folder, folder_dirs, small_dir, tmp_path):
    """accelerate launch --cpu --num_processes 2 splits the folder (gloo) and merges the CSV; the result is the
    same as one process's."""
    pytest.importorskip("accelerate")
    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or shutil.which("accelerate")
    if launcher is None:
        pytest.skip("the accelerate command is not installed")
    out = tmp_path / "out2"
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    cmd = [launcher, "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", "-m", "localdiff", "edit", "--images", str(folder), "--out-dir", str(out),
           "--directions", str(folder_dirs), "--direction", "top:0", "--strength", "0.3", "--model", str(small_dir),
           "--batch-size", "2", "-q"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = _rows(out / "results.csv")
    assert [r["image"] for r in rows] == [f"img{i}.png" for i in range(5)] and all(r["status"] == "ok" for r in rows)
    assert not list(out.glob("results.part-*"))
    one = tmp_path / "out1"
    assert main(["edit", "--images", str(folder), "--out-dir", str(one), "--directions", str(folder_dirs),
                 "--direction", "top:0", "--strength", "0.3", "--model", str(small_dir), "--batch-size", "2",
                 "-q"]) == 0
    for i in range(5):
        a = np.asarray(Image.open(out / f"img{i}.png"), np.int16)
        b = np.asarray(Image.open(one / f"img{i}.png"), np.int16)
        assert np.abs(a - b).max() <= 1
