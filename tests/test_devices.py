"""The GPU path, tested without a GPU: every tensor localdiff makes names its device.

On a GPU a tensor made without ``device=`` lands on the CPU, and the first operation that mixes it with the
model's tensors fails (or, worse, silently copies every step). A CPU-only machine cannot see that, so a spy
(a ``TorchFunctionMode``) records every tensor factory called from localdiff's own code without a device while
discovery (every method and variant), tracking, reference directions, joint discovery and editing run. Tensors
that are meant to live on the CPU (seeded random starts, the schedule's host scalars, masks) say so with
``device="cpu"``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import localdiff
from localdiff import LocalEditor

from conftest import REGIONS, texture

SOURCE = Path(localdiff.__file__).resolve().parent
TORCH = Path(torch.__file__).resolve().parent
FACTORIES = {torch.zeros, torch.ones, torch.empty, torch.full, torch.randn, torch.rand, torch.randint,
             torch.randperm, torch.arange, torch.linspace, torch.eye, torch.tensor, torch.as_tensor}


class FactorySpy(TorchFunctionMode):
    """Records ``file:line function`` for each tensor factory called without ``device`` directly from
    localdiff's code (calls made inside torch or diffusers are theirs, not ours)."""

    def __init__(self):
        super().__init__()
        self.found: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and kwargs.get("device") is None:
            frame = inspect.currentframe().f_back
            while frame is not None and TORCH in Path(frame.f_code.co_filename).resolve().parents:
                frame = frame.f_back
            if frame is not None:
                path = Path(frame.f_code.co_filename).resolve()
                if SOURCE in path.parents:
                    self.found.append(f"{path.relative_to(SOURCE)}:{frame.f_lineno} {func.__name__}")
        return func(*args, **kwargs)


def test_the_spy_sees_a_hidden_cpu_tensor():
    """The spy itself: a factory without a device in localdiff's code is seen, one with a device is not."""
    from localdiff import jacobian

    spy = FactorySpy()
    with spy:
        jacobian.orthonormal_rows(torch.randn(3, 5, device="cpu"))  # made here, in the test: not localdiff's
        exec(compile("torch.zeros(2)", jacobian.__file__, "exec"), {"torch": torch})  # as if in jacobian.py
    assert spy.found == ["jacobian.py:1 zeros"]


def test_no_hidden_cpu_tensors_in_discovery_and_editing(small_dir):
    spy_editor = LocalEditor.from_pretrained(small_dir, num_inference_steps=3)
    image, other = texture(16), texture(16, seed=1)
    regions = {name: mask[::2, ::2] for name, mask in REGIONS.items()}
    fast = dict(k=2, individual_rank=1, max_iter=2, tol_deg=1.0, timestep=0.5)
    spy = FactorySpy()
    with spy:
        found = {}
        for method in ("jive", "masked", "nullspace", "ratio"):
            found[method] = spy_editor.discover(image, regions, method=method, **fast)
        spy_editor.discover(image, regions, method="jive", joint_rank="permutation", rest_block=True, **fast)
        spy_editor.discover(image, regions, method="masked", track=True, **fast)
        spy_editor.discover([image, other], regions, method="masked", **fast)
        spy_editor.reference_directions(image, other, {"mouth": regions["mouth"]}, k=2, max_iter=2, tol_deg=1.0)
        d = found["jive"]["mouth"][0]
        spy_editor.render(image, [[(d, 0.3)], [(d, -0.3), (found["ratio"]["eyes"][0], 0.2)]], schedule="window")
        spy_editor.render_images(torch.cat([image, other]), [(d, 0.3)], asymmetric=True)
        spy_editor.responses(image, d.vector[None], 0.5)
    assert spy.found == [], "tensors made without a device:\n" + "\n".join(sorted(set(spy.found)))


def test_half_precision_weights_keep_float32_linear_algebra(small_dir):
    """fp16/bf16 weights: the subspaces, JIVE and the stored directions are float32 (the GPU setting)."""
    ed = LocalEditor.from_pretrained(small_dir, torch_dtype=torch.bfloat16, num_inference_steps=4)
    masks = {"top": REGIONS["eyes"][::2, ::2], "bottom": REGIONS["mouth"][::2, ::2]}
    dirs = ed.discover(texture(16), masks, k=2, individual_rank=1, max_iter=3, tol_deg=1.0, timestep=0.5)
    assert ed.model.dtype == torch.bfloat16
    assert dirs.individual["top"].dtype == torch.float32 and dirs.joint.dtype == torch.float32
    edited = ed.render(texture(16), [[(dirs["top"][0], 0.3)]])
    assert edited.dtype == torch.bfloat16 and torch.isfinite(edited.float()).all()
