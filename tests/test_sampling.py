"""DDIM inversion and regeneration, edit schedules, alpha = 0 exactness."""

from __future__ import annotations

import pytest
import torch

from localdiff import load_model
from localdiff.metrics import psnr
from localdiff.sampling import ddim_invert, ddim_sample, ddim_step, edit_steps, generate, initial_noise, make_schedule

from conftest import texture


def test_step_matches_diffusers_schedulers(model_dir):
    from diffusers import DDIMInverseScheduler, DDIMScheduler

    model = load_model(model_dir)
    sched = make_schedule(model, 10)
    ref = DDIMScheduler.from_config(model.scheduler.config, clip_sample=False)
    ref.set_timesteps(10)
    assert torch.equal(sched.timesteps, ref.timesteps.long())
    g = torch.Generator().manual_seed(0)
    x, e = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 3, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        ours = ddim_step(x, e, e, float(sched.alpha[i]), float(sched.alpha_next[i]))
        theirs = ref.step(e, t, x, eta=0.0).prev_sample
        assert (ours - theirs).abs().max() < 1e-5
    # the inversion step is the same formula walked the other way; DDIMInverseScheduler agrees
    inv = DDIMInverseScheduler.from_config(model.scheduler.config, clip_sample=False)
    inv.set_timesteps(10)
    xi = x
    for i in range(len(sched) - 1, -1, -1):  # as ddim_invert walks: clean -> 0 -> 100 -> ... -> 900
        ours = ddim_step(xi, e, e, float(sched.alpha_next[i]), float(sched.alpha[i]))
        theirs = inv.step(e, sched.timesteps[i], xi).prev_sample  # diffusers: step *to* timesteps[i]
        assert (ours - theirs).abs().max() < 1e-5
        xi = ours


@pytest.mark.parametrize("bounds", [dict(clip_sample=True), dict(clip_sample=False),
                                    dict(clip_sample=True, clip_sample_range=0.5),
                                    dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5)])
def test_generation_matches_diffusers_ddim_loop(model_dir, bounds):
    """generate() follows the scheduler config's x0 bounds exactly as diffusers' DDIMScheduler.step loop does."""
    from diffusers import DDIMScheduler

    model = load_model(model_dir)
    model.scheduler = DDIMScheduler.from_config(model.scheduler.config, **bounds)
    ours = generate(model, 2, make_schedule(model, 10), seed=3)
    ref = DDIMScheduler.from_config(model.scheduler.config)
    ref.set_timesteps(10)
    x = initial_noise(model, 2, seed=3)
    with torch.no_grad():
        for t in ref.timesteps:
            x = ref.step(model.unet(x, t).sample, t, x, eta=0.0).prev_sample
    assert (ours - x.clamp(-1, 1)).abs().max() <= 1e-4
    # the bounds are active on this model (its x0 predictions leave [-1, 1]), so the comparison can tell them apart
    unbounded = DDIMScheduler.from_config(model.scheduler.config, clip_sample=False, thresholding=False)
    model.scheduler = unbounded
    if bounds.get("clip_sample") is not False:
        assert (generate(model, 2, make_schedule(model, 10), seed=3) - ours).abs().max() > 1e-2


def test_inversion_round_trip_psnr(model_dir):
    model = load_model(model_dir)
    x0 = texture()
    sched = make_schedule(model, 50)
    x_T = ddim_invert(model, x0, sched)
    rec, xs, hs = ddim_sample(model, x_T, sched, record=True)
    value = psnr((rec + 1) / 2, (x0 + 1) / 2).item()
    assert value >= 30.0, value
    assert len(xs) == 51 and len(hs) == 50 and torch.equal(xs[-1], rec)


def test_zero_offset_reproduces_reconstruction_bit_for_bit(editor):
    inv = editor.invert(texture())
    zeros = torch.zeros_like(inv.hs[0])
    again, _, _ = ddim_sample(editor.model, inv.x_T, inv.schedule, delta_h=lambda i: zeros)
    assert torch.equal(again, inv.reconstruction)


def test_alpha_zero_edit_is_the_reconstruction(editor, discovered):
    inv = editor.invert(texture())
    d = discovered["mouth"][0]
    out = editor.render(texture(), [[(d, 0.0)], [(d, 0.2)]])
    assert torch.equal(out[0], inv.reconstruction[0])
    assert (out[1] - out[0]).abs().max() > 1e-3
    # same with every schedule
    for schedule in ("window", "single"):
        out = editor.render(texture(), [[(d, 0.0)]], schedule=schedule)
        assert torch.equal(out[0], inv.reconstruction[0])


def test_sampling_path_reproduces_the_reconstruction_at_zero_strength(editor, discovered):
    """Not the shortcut: resuming the cached trajectory at any step with a zero offset gives the reconstruction bit
    for bit, and a tiny strength through render's sampling path stays next to it."""
    inv = editor.invert(texture())
    zeros = torch.zeros_like(inv.hs[0])
    for start in (0, 4, 9):
        again, _, _ = ddim_sample(editor.model, inv.xs[start], inv.schedule, start=start, delta_h=lambda i: zeros)
        assert torch.equal(again, inv.reconstruction)
    d = discovered["mouth"][0]
    tiny = editor.render(texture(), [[(d, 1e-6)]], schedule="window")[0]
    assert 0 < (tiny - inv.reconstruction[0]).abs().max() < 1e-4


def test_asymmetric_step_formula(editor, discovered):
    """Asyrp's step: the edited eps forms x0, the unedited eps the direction term, checked by hand on one step
    (not the last, where alpha_next = 1 leaves no direction term)."""
    model, inv = editor.model, editor.invert(texture())
    i = 4
    x, t = inv.xs[i], inv.schedule.timesteps[i]
    dh = 0.3 * discovered.unit * discovered["mouth"][0].vector.reshape(inv.hs[0].shape)
    with torch.no_grad():
        enc = model.encode(x, t)
        eps_edit = model.decode(enc.h + dh, enc.skips, enc.temb)
        eps_plain = model.decode(enc.h, enc.skips, enc.temb)
    a, a_next = float(inv.schedule.alpha[i]), float(inv.schedule.alpha_next[i])
    expected = a_next**0.5 * (x - (1 - a) ** 0.5 * eps_edit) / a**0.5 + (1 - a_next) ** 0.5 * eps_plain
    asym, _, _ = ddim_sample(model, x, inv.schedule, start=i, stop=i + 1, delta_h=lambda _: dh, asymmetric=True)
    sym, _, _ = ddim_sample(model, x, inv.schedule, start=i, stop=i + 1, delta_h=lambda _: dh)
    assert (asym - expected).abs().max() < 1e-5
    assert (sym - expected).abs().max() > 1e-3


def test_composed_directions_each_keep_their_own_timestep(editor, discovered):
    """A direction found at another timestep is applied in its own window, not the first direction's."""
    from dataclasses import replace

    a = discovered["mouth"][0]
    late = replace(discovered["eyes"][0], timestep_fraction=0.2)
    both = editor.render(texture(), [[(a, 0.2), (late, 0.2)]], schedule="single")[0]
    inv = editor.invert(texture())
    s_a, s_late = inv.schedule.index_of(a.timestep_fraction), inv.schedule.index_of(0.2)
    assert s_a != s_late
    da = 0.2 * a.unit * a.vector.reshape(inv.hs[0].shape)
    dl = 0.2 * late.unit * late.vector.reshape(inv.hs[0].shape)
    expected, _, _ = ddim_sample(editor.model, inv.xs[s_a], inv.schedule, start=s_a,
                                 delta_h=lambda i: da if i == s_a else dl if i == s_late else None)
    assert (both - expected[0]).abs().max() < 1e-5


def test_edit_schedules_differ_and_single_skips_early_steps(editor, discovered):
    d = discovered["mouth"][0]
    outs = {s: editor.render(texture(), [[(d, 0.3)]], schedule=s)[0] for s in ("all", "window", "single")}
    base = editor.invert(texture()).reconstruction[0]
    sizes = {s: (o - base).abs().mean().item() for s, o in outs.items()}
    assert sizes["all"] > sizes["single"] > 0
    assert sizes["window"] > sizes["single"]
    asym = editor.render(texture(), [[(d, 0.3)]], asymmetric=True)[0]
    assert not torch.equal(asym, outs["all"])


def test_edit_steps():
    class S:
        def __len__(self):
            return 10

    assert list(edit_steps(S(), "all", 4)) == list(range(10))
    assert list(edit_steps(S(), "window", 4)) == [0, 1, 2, 3, 4]
    assert list(edit_steps(S(), "single", 4)) == [4]
    with pytest.raises(ValueError):
        edit_steps(S(), "sometimes", 4)


def test_batched_edits_match_single_edits(editor, discovered):
    a, b = discovered["mouth"][0], discovered["eyes"][0]
    batch = editor.render(texture(), [[(a, 0.2)], [(b, -0.2)], [(a, 0.2), (b, -0.2)]])
    single = editor.render(texture(), [[(a, 0.2), (b, -0.2)]])
    assert (batch[2] - single[0]).abs().max() < 1e-4
