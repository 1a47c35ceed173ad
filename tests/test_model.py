"""Model adapter: loading layouts, the encode/decode split, fingerprints, clear refusals."""

from __future__ import annotations

import json

import pytest
import torch

from localdiff import LocalDiffError, load_model
from localdiff.model import DiffusionModel

from conftest import make_unet


@pytest.mark.parametrize("which", ["model_dir", "small_dir"])
def test_split_matches_full_unet(which, request):
    model = load_model(request.getfixturevalue(which))
    r = model.resolution
    x = torch.randn(2, 3, r, r, generator=torch.Generator().manual_seed(1))
    for t in (0, 437, 999):
        with torch.no_grad():
            enc = model.encode(x, t)
            split = model.decode(enc.h, enc.skips, enc.temb)
            full = model.unet(x, t).sample
        assert split.shape == full.shape
        assert (split - full).abs().max().item() <= 1e-5


def test_h_shape_and_properties(model_dir):
    model = load_model(model_dir)
    assert model.resolution == 32
    assert model.h_shape == (64, 8, 8)
    assert model.num_train_timesteps == 1000
    assert model.device.type == "cpu" and model.dtype == torch.float32


def test_both_layouts_and_bare_unet_load(model_dir, small_dir, tmp_path):
    assert load_model(model_dir).resolution == 32  # pipeline folder
    assert load_model(small_dir).resolution == 16  # unet/ + scheduler/
    make_unet("plain16").save_pretrained(tmp_path / "bare")  # config.json + weights, no scheduler
    assert load_model(tmp_path / "bare").scheduler.config.num_train_timesteps == 1000


def test_fingerprint_depends_on_weights_not_on_dtype_or_path(model_dir, tmp_path):
    a = load_model(model_dir)
    b = load_model(model_dir, torch_dtype=torch.bfloat16)
    assert a.fingerprint == b.fingerprint and len(a.fingerprint) == 16
    other = make_unet("attn32", seed=1)
    other.save_pretrained(tmp_path / "other")
    assert load_model(tmp_path / "other").fingerprint != a.fingerprint


def test_dtype_argument(model_dir):
    model = load_model(model_dir, torch_dtype=torch.bfloat16)
    x = torch.randn(1, 3, 32, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        assert model.eps(x, 10).dtype == torch.bfloat16


def test_refusals(tmp_path):
    (tmp_path / "file.pt").write_bytes(b"\x80\x04junk")
    with pytest.raises(LocalDiffError, match="is a file"):
        load_model(tmp_path / "file.pt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LocalDiffError, match="not a diffusers model folder"):
        load_model(tmp_path / "empty")
    with pytest.raises(LocalDiffError, match="not found"):
        load_model(tmp_path / "missing")
    with pytest.raises(LocalDiffError, match="not in the local Hugging Face cache"):
        load_model("nobody-here/no-such-model-xyz")


def test_unsupported_models_are_rejected(tmp_path):
    from diffusers import DDPMScheduler, UNet2DModel

    cond = UNet2DModel(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, norm_num_groups=8,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       num_class_embeds=4)
    with pytest.raises(LocalDiffError, match="class-conditional"):
        DiffusionModel(cond, DDPMScheduler())
    with pytest.raises(LocalDiffError, match="epsilon"):
        DiffusionModel(make_unet("plain16"), DDPMScheduler(prediction_type="v_prediction"))
    cfg = tmp_path / "sd" / "unet"
    cfg.mkdir(parents=True)
    (cfg / "config.json").write_text(json.dumps({"_class_name": "UNet2DConditionModel"}))
    with pytest.raises(LocalDiffError, match="UNet2DConditionModel"):
        load_model(tmp_path / "sd")


def test_from_pretrained_without_a_source_loads_the_embedded_model_quietly(capfd):
    from diffusers.utils import logging as dlogging

    from localdiff import LocalEditor
    from localdiff.model import default_model_path

    if default_model_path() is None:
        pytest.skip("no embedded default model in this install")
    before = dlogging.get_verbosity()
    editor = LocalEditor.from_pretrained()
    captured = capfd.readouterr()
    assert editor.model.resolution == 64 and editor.model.name == str(default_model_path())
    assert "accelerate" not in captured.err + captured.out and "float32" not in captured.err + captured.out
    assert dlogging.get_verbosity() == before  # the user's diffusers logging is left as it was
