"""The localdiff command line end to end, and every bad input: exit 2, one line, no output file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from localdiff.cli import main


SIZE = 24  # not the model's 16 px: exercises the centre-crop/resize path


@pytest.fixture(scope="module")
def files(tmp_path_factory, small_dir):
    d = tmp_path_factory.mktemp("cli")
    rng = np.random.default_rng(0)
    for name in ("face", "other"):
        Image.fromarray(rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)).save(d / f"{name}.png")
    for name, rows in (("top", slice(2, 9)), ("bottom", slice(14, 22))):
        m = np.zeros((SIZE, SIZE), np.uint8)
        m[rows, 4:20] = 255
        Image.fromarray(m).save(d / f"{name}.png")
    return d


def run(args, capsys):
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def dirs_file(files, small_dir):
    out = files / "dirs.safetensors"
    code = main(["discover", str(files / "face.png"), "--mask", f"top={files / 'top.png'}",
                 "--mask", f"bottom={files / 'bottom.png'}", "--model", str(small_dir), "--steps", "6",
                 "--k", "3", "--individual-rank", "2", "--out", str(out), "--grid", str(files / "grid.png"), "-q"])
    assert code == 0
    return out


def test_discover_writes_directions_and_grid(dirs_file, files):
    assert dirs_file.is_file()
    grid = Image.open(files / "grid.png")
    # 4 rows (2 regions x 2 directions), 5 strengths + heatmap column, cells upscaled from 16 px
    assert grid.size[0] > 6 * 16 and grid.size[1] > 4 * 16


def test_info(dirs_file, capsys):
    code, out, _ = run(["info", dirs_file], capsys)
    assert code == 0
    assert "top" in out and "bottom" in out and "fingerprint" in out and "DDIM steps" in out


def test_edit_and_transfer(dirs_file, files, small_dir, capsys):
    out = files / "edited.png"
    code, _, err = run(["edit", files / "other.png", "--directions", dirs_file, "--direction", "top:0",
                        "--strength", "0.5", "--direction", "bottom:1", "--strength", "-0.5",
                        "--model", small_dir, "--out", out, "-q"], capsys)
    assert code == 0, err
    edited = np.asarray(Image.open(out), dtype=np.float32)
    assert edited.shape == (16, 16, 3)
    zero = files / "zero.png"
    code, _, err = run(["edit", files / "other.png", "--directions", dirs_file, "--direction", "top",
                        "--strength", "0", "--model", small_dir, "--out", zero, "-q"], capsys)
    assert code == 0, err
    assert np.abs(edited - np.asarray(Image.open(zero), dtype=np.float32)).max() > 0


def test_sweep(dirs_file, files, small_dir, capsys):
    out = files / "sweep.gif"
    code, _, err = run(["sweep", files / "face.png", "--directions", dirs_file, "--direction", "bottom:0",
                        "--frames", "5", "--model", small_dir, "--out", out, "-q"], capsys)
    assert code == 0, err
    gif = Image.open(out)
    assert gif.n_frames == 8  # 5 forwards + 3 back
    assert (files / "sweep.png").is_file()


def test_console_script_runs(dirs_file):
    exe = shutil.which("localdiff") or str(Path(sys.executable).parent / "localdiff")
    res = subprocess.run([exe, "info", str(dirs_file)], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and "regions:" in res.stdout


# Bad input and unusual input, through the real command line: tests/test_reliability.py



def test_sample_command(small_dir, tmp_path, capsys):
    out = tmp_path / "samples.png"
    code, _, err = run(["sample", "-n", "4", "--steps", "3", "--model", small_dir, "--out", out, "-q"], capsys)
    assert code == 0, err
    grid = np.asarray(Image.open(out))
    assert grid.shape[0] == grid.shape[1] == 2 * 16 * 8  # 2x2 images of 16 px, shown 8x larger
    umask = os.umask(0)
    os.umask(umask)
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask  # a normal new file, not mkstemp's private 0600
    assert grid.std() > 0


def test_sample_out_dir_writes_seeded_images_at_model_resolution(small_dir, tmp_path, capsys):
    out = tmp_path / "s"
    code, _, err = run(["sample", "-n", "3", "--steps", "3", "--seed", "5", "--model", small_dir, "--out-dir", out,
                        "-q"], capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    assert names == ["seed5_0000.png", "seed5_0001.png", "seed5_0002.png"]
    first = np.asarray(Image.open(out / names[0]))
    assert first.shape == (16, 16, 3)
    # image i depends on the seed and i only: drawing 1 image gives the same first image
    code, _, err = run(["sample", "-n", "1", "--steps", "3", "--seed", "5", "--model", small_dir, "--out-dir",
                        tmp_path / "one", "-q"], capsys)
    assert code == 0, err
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / names[0])), first)
    assert not np.array_equal(np.asarray(Image.open(out / names[1])), first)
    code, _, err = run(["sample", "-n", "2", "--model", small_dir], capsys)
    assert code == 2 and "--out-dir" in err and len(err.strip().splitlines()) == 1


def test_template_masks_by_name(small_dir, files, tmp_path, capsys):
    out = tmp_path / "t.safetensors"
    code, _, err = run(["discover", files / "face.png", "--mask", "eyes", "--mask", "mouth", "--model", small_dir,
                        "--steps", "3", "--k", "2", "--individual-rank", "1", "--max-iter", "2", "--out", out],
                       capsys)
    assert code == 0, err
    assert "templates fit the default model" in err
    from localdiff import Directions

    assert Directions.load(out).regions == ["eyes", "mouth"]


def test_interrupting_the_grid_keeps_the_finished_discovery(files, small_dir, tmp_path, capsys, monkeypatch):
    import localdiff.viz

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(localdiff.viz, "edit_grid", interrupted)
    out, grid = tmp_path / "d.safetensors", tmp_path / "grid.png"
    code, _, err = run(["discover", files / "face.png", "--mask", f"top={files / 'top.png'}", "--model", small_dir,
                        "--steps", "3", "--k", "2", "--individual-rank", "1", "--max-iter", "2", "--out", out,
                        "--grid", grid, "-q"], capsys)
    assert code == 130 and "interrupted" in err
    assert out.is_file() and not grid.exists()
    from localdiff import Directions

    assert Directions.load(out).regions == ["top"]


def test_discover_method_option(files, small_dir, tmp_path, capsys):
    """--method ratio writes its directions and says so in info; an unknown method is one line and exit 2."""
    out = tmp_path / "ratio.safetensors"
    code, _, err = run(["discover", files / "face.png", "--mask", f"top={files / 'top.png'}", "--mask",
                        f"bottom={files / 'bottom.png'}", "--model", small_dir, "--steps", "6", "--k", "3",
                        "--individual-rank", "2", "--method", "ratio", "--out", out], capsys)
    assert code == 0 and out.is_file()
    assert "eps-level locality" in err
    code, text, _ = run(["info", out], capsys)
    assert code == 0 and "method            ratio" in text and "eps-level locality" in text
    bad = tmp_path / "bad.safetensors"
    with pytest.raises(SystemExit) as exit_:  # a usage error: argparse's exit, status 2
        main(["discover", str(files / "face.png"), "--mask", f"top={files / 'top.png'}", "--model", str(small_dir),
              "--method", "magic", "--out", str(bad)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not bad.exists()
    assert len(err.strip().splitlines()) == 1 and "magic" in err


def test_discover_reference_writes_one_direction_per_region(files, small_dir, tmp_path, capsys):
    """--reference: one direction per region (fitted to renders by default), the reference and its natural
    strength recorded and printed; --min-locality keeps the fit to edits that local (to first order). The image
    itself as its reference, --reference-fit or --min-locality without --reference, --min-locality with the
    projected fit or out of [0, 1), is one line and exit 2, with no file."""
    from localdiff import Directions

    ref = tmp_path / "ref.png"
    Image.open(files / "face.png").transpose(Image.Transpose.FLIP_LEFT_RIGHT).save(ref)
    out = tmp_path / "ref.safetensors"
    code, _, err = run(["discover", files / "face.png", "--reference", ref, "--mask", f"top={files / 'top.png'}",
                        "--model", small_dir, "--steps", "6", "--k", "3", "--max-iter", "4", "--out", out], capsys)
    assert code == 0 and "--direction top:0 --strength" in err
    dirs = Directions.load(out)
    assert dirs.meta["method"] == "reference" and dirs.meta["reference_name"] == "ref.png"
    assert dirs.meta["reference_fit"] == "measured" and dirs.meta["basis_rank"] == 9  # 3 k by default
    assert 9 <= dirs.meta["fit"]["top"]["basis_size"] <= 12  # with the k = 3 discovered directions
    assert dirs.individual["top"].shape[0] == 1 and dirs.meta["reference_strength"]["top"] > 0
    assert dirs.meta["min_locality"] is None and "kept" not in dirs.meta["fit"]["top"]
    local = tmp_path / "local.safetensors"
    code, _, err = run(["discover", files / "face.png", "--reference", ref, "--mask", f"top={files / 'top.png'}",
                        "--model", small_dir, "--steps", "6", "--k", "3", "--max-iter", "4", "--min-locality", "0.5",
                        "--out", local], capsys)
    assert code == 0
    fit = Directions.load(local).meta["fit"]["top"]
    lam = fit["localities"]
    assert Directions.load(local).meta["min_locality"] == 0.5 and len(lam) == fit["basis_size"]
    assert lam == sorted(lam, reverse=True) and 1 <= fit["kept"] <= fit["basis_size"]
    assert fit["locality"] >= 0.5 or "no edit the fit tried is 0.50 local" in err  # measured on its render
    same = tmp_path / "same.safetensors"
    code, _, err = run(["discover", files / "face.png", "--reference", files / "face.png", "--mask",
                        f"top={files / 'top.png'}", "--model", small_dir, "--steps", "6", "--out", same], capsys)
    assert code == 2 and not same.exists()
    assert [line for line in err.splitlines() if "error" in line] == [
        "localdiff: error: the reference is the image itself; give another image to move the region towards"]
    code, _, err = run(["discover", files / "face.png", "--reference-fit", "projected", "--mask",
                        f"top={files / 'top.png'}", "--model", small_dir, "--steps", "6", "--out", same], capsys)
    assert code == 2 and not same.exists()
    assert [line for line in err.splitlines() if "error" in line] == [
        "localdiff: error: --reference-fit is about directions towards a reference; give --reference REF too"]
    for extra, message in ((["--min-locality", "0.5"], "--min-locality is about directions towards a reference; "
                            "give --reference REF too"),
                           (["--reference", ref, "--reference-fit", "projected", "--min-locality", "0.5"],
                            "--min-locality constrains the measured fit; drop it or --reference-fit projected")):
        code, _, err = run(["discover", files / "face.png", *extra, "--mask", f"top={files / 'top.png'}",
                            "--model", small_dir, "--steps", "6", "--out", same], capsys)
        assert code == 2 and not same.exists()
        assert [line for line in err.splitlines() if "error" in line] == [f"localdiff: error: {message}"]
    with pytest.raises(SystemExit) as exit_:  # a usage error: argparse's exit, status 2
        run(["discover", files / "face.png", "--reference", ref, "--min-locality", "1", "--mask",
             f"top={files / 'top.png'}", "--model", small_dir, "--steps", "6", "--out", same], capsys)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and not same.exists()
    assert len(err.strip().splitlines()) == 1 and "'1' is not a share in [0, 1)" in err


def test_a_small_k_lowers_the_default_individual_rank(capsys):
    """``--k 1`` or ``--k 2`` alone used to fail ("individual rank must be in 1..k"): the default rank (3) now
    follows k down, while an explicit rank above k is still one clear error."""
    from localdiff.cli import _discovery_config, build_parser
    from localdiff.config import DiscoveryConfig
    from localdiff.errors import LocalDiffError

    def config(*extra):
        args = build_parser().parse_args(["discover", "face.png", "--mask", "mouth", *extra])
        return _discovery_config(args)

    assert config("--k", "2").individual_rank == 2 and config("--k", "1").individual_rank == 1
    assert config().individual_rank == DiscoveryConfig.individual_rank == 3
    assert config("--k", "8").individual_rank == 3 and config("--individual-rank", "auto").individual_rank is None
    assert DiscoveryConfig().replace(k=2).individual_rank == 2
    explicit = config("--k", "2", "--individual-rank", "3")
    with pytest.raises(LocalDiffError, match="individual rank must be in 1..k=2, got 3; lower"):
        explicit.check(1000, 1, 1000)
