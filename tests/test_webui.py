"""The web UI's handlers on a small test model (no browser), and per-session isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from localdiff.errors import LocalDiffError
from localdiff.images import to_pil

from conftest import texture

webui = pytest.importorskip("localdiff.webui")
pytest.importorskip("gradio")


@pytest.fixture(scope="module")
def ui_editor(small_dir):
    from localdiff import LocalEditor

    return LocalEditor.from_pretrained(small_dir, num_inference_steps=6)


@pytest.fixture()
def face(tmp_path):
    path = tmp_path / "face.png"
    to_pil(texture(16, seed=3)[0]).save(path)
    return str(path)


def painting(res: int, rows: slice, cols: slice) -> dict:
    layer = np.zeros((res, res, 4), np.uint8)
    layer[rows, cols] = (255, 0, 0, 255)
    return {"background": None, "layers": [layer], "composite": None}


def test_full_session(ui_editor, face):
    s = webui.Session()
    view = webui.load_upload(ui_editor, s, face)
    assert isinstance(view, Image.Image) and s.image.shape == (1, 3, 16, 16)
    webui.set_template_regions(ui_editor, s, ["eyes"])
    webui.add_painted_region(ui_editor, s, painting(64, slice(40, 60), slice(10, 50)), "chin")
    assert list(s.masks) == ["eyes", "chin"] and s.masks["chin"].any() and not s.masks["chin"].all()
    names = webui.discover(ui_editor, s, 0.5, 2, 1, "auto")
    assert names == ["eyes:0", "chin:0"]
    assert (s.folder() / "directions.safetensors").is_file()
    orig, edited0, _ = webui.render(ui_editor, s, [0.0, 0.0])
    assert np.array_equal(np.asarray(orig.convert("RGB")).shape, np.asarray(edited0).shape)
    _, edited, diff = webui.render(ui_editor, s, [0.8, 0.0])
    assert np.abs(np.asarray(edited, float) - np.asarray(edited0, float)).mean() > 0.5  # the slider edits
    assert np.asarray(diff).max() > 0
    assert (s.folder() / "edited.png").is_file()
    gif = webui.sweep_gif(ui_editor, s, "eyes:0", frames=3)
    assert Image.open(gif).n_frames >= 3
    # transfer: the current directions, then the saved file, to another image
    other = s.folder() / "other.png"
    to_pil(texture(16, seed=9)[0]).save(other)
    _, t1, _ = webui.transfer(ui_editor, s, str(other), None, [0.8, 0.0])
    _, t2, _ = webui.transfer(ui_editor, s, str(other), str(s.folder() / "directions.safetensors"), [0.8, 0.0])
    assert np.array_equal(np.asarray(t1), np.asarray(t2))


def test_sessions_are_independent(ui_editor, face):
    a, b = webui.Session(), webui.Session()
    webui.load_upload(ui_editor, a, face)
    webui.sample_input(ui_editor, b, 1)
    assert not torch.equal(a.image, b.image)
    webui.set_template_regions(ui_editor, a, ["mouth"])
    assert b.masks == {} and a.folder() != b.folder()


@pytest.mark.parametrize("call, message", [
    (lambda e, s: webui.discover(e, s, 0.5, 2, 1, "auto"), "upload an image"),
    (lambda e, s: webui.render(e, s, [0.1]), "upload an image"),
    (lambda e, s: webui.load_upload(e, s, None), "choose an image"),
    (lambda e, s: webui.sample_input(e, s, -1), "seed"),
])
def test_bad_requests_give_one_line(ui_editor, call, message):
    with pytest.raises(LocalDiffError, match=message) as err:
        call(ui_editor, webui.Session())
    assert "\n" not in str(err.value)


def test_bad_requests_after_upload(ui_editor, face, tmp_path):
    s = webui.Session()
    webui.load_upload(ui_editor, s, face)
    with pytest.raises(LocalDiffError, match="region"):
        webui.discover(ui_editor, s, 0.5, 2, 1, "auto")
    with pytest.raises(LocalDiffError, match="paint"):
        webui.add_painted_region(ui_editor, s, {"layers": []}, "x")
    with pytest.raises(LocalDiffError, match="not valid"):
        webui.add_painted_region(ui_editor, s, painting(16, slice(2, 6), slice(2, 6)), "bad name!")
    webui.set_template_regions(ui_editor, s, ["eyes"])
    with pytest.raises(LocalDiffError, match="joint rank"):
        webui.discover(ui_editor, s, 0.5, 2, 1, "lots")
    notes = tmp_path / "notes.png"
    notes.write_text("not an image")
    with pytest.raises(LocalDiffError, match="not an image") as err:
        webui.load_upload(ui_editor, s, str(notes))
    assert str(tmp_path) not in str(err.value) and "notes" not in str(err.value)  # no temporary paths shown


def test_messages_for_the_page_carry_no_paths():
    assert webui.friendly("mask /tmp/gradio/3f2a/mouth.png is empty") == "mask mouth.png is empty"
    assert webui.friendly("k must be in 1..512, got 900") == "k must be in 1..512, got 900"


def test_session_files_live_under_one_folder_and_go_with_the_session(ui_editor, face):
    a, b = webui.Session(), webui.Session()
    fa, fb = a.folder(), b.folder()
    assert fa != fb and fa.parent == fb.parent == webui._root()
    (fa / "edited.png").write_bytes(b"x")
    a.close()
    assert not fa.exists() and fb.is_dir()
    b.close()


def test_app_has_named_endpoints_and_the_cli_strength_range(ui_editor):
    from localdiff.config import EDIT_RANGE

    config = webui.build_app(ui_editor).get_config_file()
    names = [d.get("api_name") for d in config["dependencies"]]
    assert names == ["upload", "sample", "template_regions", "add_region", "clear_regions", "face_parts",
                     "auto_regions", "discover", "discover_reference", "edit", "sweep", "transfer"]
    sliders = [c["props"] for c in config["components"] if str(c["props"].get("elem_id", "")).startswith("dir")]
    assert len(sliders) == webui.MAX_SLIDERS
    assert all((p["minimum"], p["maximum"]) == (-EDIT_RANGE, EDIT_RANGE) for p in sliders)


def test_regions_without_painting_and_a_reference(ui_editor, face, tmp_path):
    """Automatic regions replace the regions; directions towards an uploaded reference get sliders and record the
    reference's strength; face parts on an image without a face are one line."""
    s = webui.Session()
    webui.load_upload(ui_editor, s, face)
    webui.set_auto_regions(ui_editor, s, 3, k=3)
    assert list(s.masks) == ["region1", "region2", "region3"]
    assert (torch.stack(list(s.masks.values())).sum(0) == 1).all()
    ref = tmp_path / "ref.png"
    to_pil(texture(16, seed=7)[0]).save(ref)
    names = webui.discover_reference(ui_editor, s, str(ref), 0.5, k=2)
    assert names == ["region1:0", "region2:0", "region3:0"]
    assert set(s.directions.meta["reference_strength"]) == {"region1", "region2", "region3"}
    original, edited, _ = webui.render(ui_editor, s, [0.1, 0.0, 0.0])
    assert np.abs(np.asarray(edited, np.float32) - np.asarray(original, np.float32)).max() > 0
    assert s.directions.meta["min_locality"] is None
    webui.discover_reference(ui_editor, s, str(ref), 0.5, k=2, min_locality=0.4)
    assert s.directions.meta["min_locality"] == 0.4
    assert all(0.0 <= f["locality"] <= 1.0 for f in s.directions.meta["fit"].values())
    with pytest.raises(LocalDiffError, match="reference image"):
        webui.discover_reference(ui_editor, s, None, 0.5)
    if __import__("importlib").util.find_spec("mediapipe") is not None:
        with pytest.raises(LocalDiffError, match="no face found"):
            webui.set_face_part_regions(ui_editor, s, ["eyes"])
    with pytest.raises(LocalDiffError, match="tick"):
        webui.set_face_part_regions(ui_editor, s, [])
