"""Everything a user may type, through the real command line (``python -m localdiff`` in a subprocess).

Bad input: exit status 2, exactly one stderr line ``localdiff: error: ...``, no traceback, no output file and
no temporary file left behind. Legitimate but unusual input (EXIF orientation, soft masks, transparency,
palettes, animated GIFs): exit 0, the output written, and a one-line note of what was done.

All cases share one tiny model. The cases that depend on the process (environment variables read at import,
Python warnings, the bare ``python -m localdiff``) and the unusual-input cases run as parallel subprocesses; the
other bad-input cases call :func:`localdiff.cli.main` in this process, each in its own empty working folder with
stderr captured, because 60 subprocesses spent 3 minutes of the suite importing torch. ``SUBPROCESS_ALSO`` runs a
few of those through the real command line too, so the two paths stay the same.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from localdiff.cli import main

from conftest import make_unet

SIZE = 16  # the test model's resolution


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG that declares width x height pixels (decoding would need gigabytes): the decompression-bomb case."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _rewrite_directions(src: Path, dst: Path, *, meta=None, tensors=None) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(src), framework="pt") as f:
        header = json.loads(f.metadata()["localdiff"])
        data = {k: f.get_tensor(k) for k in f.keys()}
    header.update(meta or {})
    for key, fn in (tensors or {}).items():
        data[key] = fn(data[key])
    save_file(data, str(dst), metadata={"localdiff": json.dumps(header)})


@pytest.fixture(scope="module")
def world(tmp_path_factory, small_dir):
    """The files every case uses: images, masks, a model, good and broken directions files."""
    d = tmp_path_factory.mktemp("reliability")
    rng = np.random.default_rng(0)
    face = rng.integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8)
    Image.fromarray(face).save(d / "face.png")
    top, bottom = np.zeros((SIZE, SIZE), np.uint8), np.zeros((SIZE, SIZE), np.uint8)
    top[2:7, 3:13], bottom[9:14, 3:13] = 255, 255
    Image.fromarray(top).save(d / "top.png")
    Image.fromarray(bottom).save(d / "bottom.png")
    Image.fromarray(np.where(top > 0, 255, 0).astype(np.uint8)).save(d / "top_again.png")
    soft = np.clip(np.abs(np.arange(SIZE)[:, None] - 4.0) * -60 + 255, 0, 255).astype(np.uint8).repeat(SIZE, 1)
    Image.fromarray(soft).save(d / "soft.png")
    Image.fromarray(np.full((SIZE, SIZE), 128, np.uint8)).save(d / "grey.png")
    Image.fromarray(np.zeros((SIZE, SIZE), np.uint8)).save(d / "empty.png")
    Image.fromarray(np.full((SIZE, SIZE), 255, np.uint8)).save(d / "full.png")
    Image.fromarray(np.full((5, 5), 255, np.uint8)).save(d / "small_mask.png")
    Image.new("I;16", (SIZE, SIZE)).save(d / "int_mask.png")
    (d / "notes.png").write_text("a text file named like an image")
    (d / "folder.png").mkdir()
    _png_header_only(d / "huge.png", 20000, 20000)
    # a JPEG whose EXIF says "rotate 90 degrees clockwise to view"
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(face[:, :12]).save(d / "rotated.jpg", exif=exif.tobytes(), quality=95)
    rgba = np.dstack([face, np.full((SIZE, SIZE), 255, np.uint8)])
    rgba[:4, :4, 3] = 0
    Image.fromarray(rgba, "RGBA").save(d / "rgba.png")
    Image.fromarray(face).convert("P", palette=Image.Palette.ADAPTIVE).save(d / "palette.png")
    frames = [Image.fromarray(face), Image.fromarray(255 - face)]
    frames[0].save(d / "animated.gif", save_all=True, append_images=frames[1:])
    torch.save({"w": torch.zeros(3)}, d / "dirs.pt")
    shutil.copy(d / "dirs.pt", d / "pickled.safetensors")
    (d / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all}")
    (d / "not_a_model").mkdir()
    other = d / "other_model"
    make_unet("plain16", seed=5).save_pretrained(other / "unet")
    shutil.copytree(small_dir / "scheduler", other / "scheduler")
    good = d / "dirs.safetensors"
    assert main(["discover", str(d / "face.png"), "--mask", f"top={d / 'top.png'}", "--mask",
                 f"bottom={d / 'bottom.png'}", "--model", str(small_dir), "--steps", "4", "--k", "2",
                 "--individual-rank", "1", "--max-iter", "2", "--out", str(good), "-q"]) == 0
    _rewrite_directions(good, d / "steps0.safetensors", meta={"num_steps": 0})
    _rewrite_directions(good, d / "hnorm_nan.safetensors", meta={"h_norm": float("nan")})
    _rewrite_directions(good, d / "step999.safetensors", meta={"step_index": 999})
    _rewrite_directions(good, d / "nan_vectors.safetensors",
                        tensors={"individual/top": lambda t: torch.full_like(t, float("nan"))})
    _rewrite_directions(good, d / "short_vectors.safetensors", tensors={"individual/top": lambda t: t[:, :10]})
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    yield dict(d=d, model=small_dir, busy_port=busy.getsockname()[1])
    busy.close()


def _discover(w, *extra, image="face.png", masks=("top=top.png",)):
    d = w["d"]
    args = ["discover", d / image, "--model", w["model"], "--steps", "3", "--k", "2", "--individual-rank", "1",
            "--max-iter", "2", "--out", "OUT.safetensors"]
    for m in masks:
        name, _, path = m.partition("=")
        args += ["--mask", f"{name}={d / path}" if path else name]
    return args + list(extra)


def _edit(w, *extra, directions="dirs.safetensors", direction="top", image="face.png"):
    d = w["d"]
    return ["edit", d / image, "--directions", d / directions, "--direction", direction, "--strength", "0.3",
            "--model", w["model"], "--out", "OUT.png", *extra]


# name -> (argv builder, extra environment); every one must exit 2 with one line and leave nothing behind
BAD = {
    "no command": (lambda w: [], {}),
    "unknown command": (lambda w: ["transmogrify"], {}),
    "discover without --mask": (lambda w: ["discover", w["d"] / "face.png", "--out", "OUT.safetensors"], {}),
    "strength nan": (lambda w: _edit(w)[:6] + ["--strength", "nan"] + _edit(w)[8:], {}),
    "strength not a number": (lambda w: _edit(w)[:6] + ["--strength", "lots"] + _edit(w)[8:], {}),
    "steps 0": (lambda w: _discover(w, "--steps", "0"), {}),
    "steps 100000 (edit)": (lambda w: _edit(w, "--steps", "100000"), {}),
    "steps 100000 (discover)": (lambda w: _discover(w, "--steps", "100000"), {}),
    "k 100000": (lambda w: _discover(w, "--k", "100000"), {}),
    "k 0": (lambda w: _discover(w, "--k", "0"), {}),
    "timestep 2.5 (not a fraction)": (lambda w: _discover(w, "--timestep", "2.5"), {}),
    "timestep t=5000 (past the model's T)": (lambda w: _discover(w, "--timestep", "5000"), {}),
    "joint rank -1": (lambda w: _discover(w, "--joint-rank", "-1"), {}),
    "device meta": (lambda w: _discover(w, "--device", "meta"), {}),
    "device nonsense": (lambda w: _discover(w, "--device", "toaster"), {}),
    "device cuda without a GPU": (lambda w: _discover(w, "--device", "cuda:3"), {}),
    "dtype int8": (lambda w: _discover(w, "--dtype", "int8"), {}),
    "model folder missing": (lambda w: _discover(w)[:3] + [w["d"] / "nope"] + _discover(w)[4:], {}),
    "model is a file": (lambda w: _discover(w)[:3] + [w["d"] / "dirs.pt"] + _discover(w)[4:], {}),
    "model folder without config": (lambda w: _discover(w)[:3] + [w["d"] / "not_a_model"] + _discover(w)[4:], {}),
    "hub model offline": (lambda w: _discover(w)[:3] + ["google/ddpm-ema-celebahq-256"] + _discover(w)[4:],
                          {"HF_HUB_OFFLINE": "1"}),
    "hub unreachable": (lambda w: _discover(w)[:3] + ["google/ddpm-ema-celebahq-256"] + _discover(w)[4:],
                        {"HF_HUB_OFFLINE": "", "HF_ENDPOINT": "http://127.0.0.1:9"}),
    "image missing": (lambda w: _discover(w, image="nope.png"), {}),
    "image is a folder": (lambda w: _discover(w, image="folder.png"), {}),
    "text file named .png": (lambda w: _discover(w, image="notes.png"), {}),
    "20000 x 20000 PNG": (lambda w: _discover(w, image="huge.png"), {}),
    "mask file missing": (lambda w: _discover(w, masks=("top=nope.png",)), {}),
    "mask not an image": (lambda w: _discover(w, masks=("top=notes.png",)), {}),
    "empty mask": (lambda w: _discover(w, masks=("top=empty.png",)), {}),
    "full mask": (lambda w: _discover(w, masks=("top=full.png",)), {}),
    "one-grey mask": (lambda w: _discover(w, masks=("top=grey.png",)), {}),
    "mask of another size": (lambda w: _discover(w, masks=("top=small_mask.png",)), {}),
    "16-bit mask": (lambda w: _discover(w, masks=("top=int_mask.png",)), {}),
    "mask without a name": (lambda w: _discover(w)[:-2] + ["--mask", w["d"] / "top.png"], {}),
    "identical masks": (lambda w: _discover(w, masks=("top=top.png", "again=top_again.png")), {}),
    "duplicate region name": (lambda w: _discover(w, masks=("top=top.png", "top=bottom.png")), {}),
    "bad region name": (lambda w: _discover(w, masks=("to p!=top.png",)), {}),
    "unknown template": (lambda w: _discover(w, masks=("elbow",)), {}),
    "output suffix": (lambda w: [a if a != "OUT.safetensors" else "OUT.pt" for a in _discover(w)], {}),
    "output folder missing": (lambda w: [a if a != "OUT.safetensors" else "no/such/d.safetensors"
                                         for a in _discover(w)], {}),
    "output in /proc": (lambda w: [a if a != "OUT.png" else "/proc/e.png" for a in _edit(w)], {}),
    "output is a folder": (lambda w: [a if a != "OUT.png" else w["d"] / "folder.png" for a in _edit(w)], {}),
    "directions missing": (lambda w: _edit(w, directions="nope.safetensors"), {}),
    "directions are a pickle": (lambda w: _edit(w, directions="dirs.pt"), {}),
    "pickle named .safetensors": (lambda w: ["info", w["d"] / "pickled.safetensors"], {}),
    "directions not safetensors": (lambda w: _edit(w, directions="garbage.safetensors"), {}),
    "directions num_steps 0": (lambda w: _edit(w, directions="steps0.safetensors"), {}),
    "directions h_norm NaN": (lambda w: _edit(w, directions="hnorm_nan.safetensors"), {}),
    "directions step_index 999": (lambda w: _edit(w, directions="step999.safetensors"), {}),
    "directions with NaN vectors": (lambda w: _edit(w, directions="nan_vectors.safetensors"), {}),
    "directions of the wrong shape": (lambda w: ["info", w["d"] / "short_vectors.safetensors"], {}),
    "unknown region": (lambda w: _edit(w, direction="nose"), {}),
    "direction index out of range": (lambda w: _edit(w, direction="top:7"), {}),
    "direction index not a number": (lambda w: _edit(w, direction="top:x"), {}),
    "directions of another model": (lambda w: [a if a != w["model"] else w["d"] / "other_model" for a in _edit(w)],
                                    {}),
    "three strengths for two directions": (lambda w: _edit(w, "--direction", "bottom", "--strength", "1",
                                                           "--strength", "2"), {}),
    "sample without an output": (lambda w: ["sample", "-n", "2", "--model", w["model"]], {}),
    "serve on a busy port": (lambda w: ["serve", "--port", str(w["busy_port"]), "--model", w["model"]], {}),
    "serve on port 70000": (lambda w: ["serve", "--port", "70000", "--model", w["model"]], {}),
}

# name -> (argv builder, the note that must be printed); these must succeed
UNUSUAL = {
    "JPEG with EXIF orientation": (lambda w: _edit(w, image="rotated.jpg"), "EXIF orientation"),
    "soft mask": (lambda w: _discover(w, masks=("top=soft.png",)), "soft"),
    "RGBA image": (lambda w: _edit(w, image="rgba.png"), "alpha channel is dropped"),
    "palette image": (lambda w: _edit(w, image="palette.png"), None),
    "animated GIF": (lambda w: _edit(w, image="animated.gif"), "using the first"),
    "float16 on the CPU": (lambda w: _edit(w, "--dtype", "float16"), "float16 on the CPU is about 20 times slower"),
}


def _run(argv, extra_env, cwd: Path):
    env = dict(os.environ, OMP_NUM_THREADS="1", **extra_env)
    for key, value in extra_env.items():
        if value == "":
            env.pop(key)
    res = subprocess.run([sys.executable, "-m", "localdiff", *map(str, argv)], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    return res.returncode, res.stderr


# bad-input cases that also run through ``python -m localdiff`` (the others with an environment always do)
SUBPROCESS_ALSO = ("no command", "steps 0", "image missing", "directions are a pickle", "output in /proc",
                   "directions of another model")


def _run_here(argv, cwd: Path):
    """``main(argv)`` in this process, in ``cwd``, with stderr captured: (exit status, stderr)."""
    err = io.StringIO()
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in argv])
            except SystemExit as exc:  # argparse's usage errors
                code = exc.code
    finally:
        os.chdir(before)
    return code, err.getvalue()


@pytest.fixture(scope="module")
def results(world, tmp_path_factory):
    """Run every case once, each in its own empty working folder: subprocesses several at a time, the rest here."""
    here, sub = {}, {}
    for name, (build, env) in BAD.items():
        (sub if env else here)[("bad", name)] = (build(world), env)
        if name in SUBPROCESS_ALSO:
            sub[("bad (subprocess)", name)] = (build(world), env)
    for name, (build, _) in UNUSUAL.items():
        sub[("unusual", name)] = (build(world), {})
    cwds = {key: tmp_path_factory.mktemp("case") for key in [*here, *sub]}
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {key: pool.submit(_run, argv, env, cwds[key]) for key, (argv, env) in sub.items()}
        out = {key: _run_here(argv, cwds[key]) for key, (argv, _) in here.items()}
        out.update({key: f.result() for key, f in futures.items()})
    return {key: (code, err, cwds[key]) for key, (code, err) in out.items()}


def test_the_matrix_is_large_enough():
    assert len(BAD) + len(UNUSUAL) >= 40


@pytest.mark.parametrize("kind, name", [("bad", n) for n in BAD] + [("bad (subprocess)", n) for n in SUBPROCESS_ALSO])
def test_bad_input_one_line_exit_2_nothing_written(kind, name, results, world):
    if name == "device cuda without a GPU" and torch.cuda.is_available():
        pytest.skip("a GPU is present")
    code, err, cwd = results[(kind, name)]
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, (name, err)
    assert "Traceback" not in err, (name, err)
    assert len(lines) == 1 and lines[0].startswith("localdiff: error: "), (name, err)
    assert list(cwd.iterdir()) == [], (name, list(cwd.iterdir()))
    leftovers = [p.name for p in world["d"].iterdir() if p.name.startswith(".")]
    assert leftovers == [], leftovers


@pytest.mark.parametrize("name", list(UNUSUAL))
def test_unusual_input_works_with_a_note(name, results):
    code, err, cwd = results[("unusual", name)]
    assert code == 0, (name, err)
    assert "Traceback" not in err
    assert [p.name for p in cwd.iterdir()] in (["OUT.png"], ["OUT.safetensors"])
    note = UNUSUAL[name][1]
    if note is not None:
        assert note in err, (name, err)


def test_exif_orientation_is_applied(world):
    """The EXIF-rotated JPEG loads upright: as tall as the stored image is wide."""
    from localdiff.images import open_image

    stored = Image.open(world["d"] / "rotated.jpg")
    upright = open_image(world["d"] / "rotated.jpg")
    assert stored.size == (12, SIZE) and upright.size == (SIZE, 12)
    assert np.abs(np.asarray(upright, np.float32) - np.asarray(stored.transpose(Image.Transpose.ROTATE_270),
                                                                 np.float32)).max() == 0
