"""End-to-end discovery on a test model: locality at the eps level, JIVE structure, directions file."""

from __future__ import annotations


import pytest
import torch

from localdiff import Directions, LocalDiffError, LocalEditor
from localdiff.metrics import eps_locality

from conftest import REGIONS, texture


def test_local_directions_are_local_at_eps_level(editor, discovered):
    """method.md section 7, last item: |m * J v|^2 / |J v|^2 at the discovery timestep."""
    g = torch.Generator().manual_seed(0)
    d = discovered.individual["eyes"].shape[1]
    rand = torch.randn(16, d, generator=g)
    rand = rand / rand.norm(dim=1, keepdim=True)
    for region in discovered.regions:
        vecs = torch.cat([discovered.individual[region][:1], rand])
        jv = editor.responses(texture(), vecs, discovered.meta["timestep_fraction"])
        scores = eps_locality(jv, discovered.masks[region])
        ours, baseline = scores[0].item(), scores[1:].mean().item()
        assert ours > 2 * baseline, (region, ours, baseline)


def test_structure_of_directions(discovered):
    assert discovered.regions == ["eyes", "mouth", "side"]
    for r in discovered.regions:
        v = discovered.individual[r]
        assert v.shape == (2, 64 * 8 * 8)
        assert torch.allclose(v @ v.T, torch.eye(2), atol=1e-5)
        assert torch.equal(discovered.masks[r], REGIONS[r])
        # converged, and not trivially: a start of random vectors needs more than one step to settle
        assert discovered.meta["converged"][r] is True
        assert 2 < discovered.meta["iterations"][r] < 50
    assert discovered.meta["step_index"] == 4 and discovered.meta["timestep"] == 500 and discovered.meta["num_steps"] == 10


def test_forced_joint_part_is_orthogonal_to_the_local_directions(editor):
    dirs = editor.discover(texture(), REGIONS, method="jive", k=4, individual_rank=2, timestep=0.5, joint_rank=1)
    assert dirs.joint.shape == (1, 64 * 8 * 8)
    assert dirs.meta["joint_rank"] == 1
    for r in dirs.regions:
        assert (dirs.individual[r] @ dirs.joint.T).abs().max() < 1e-5


def test_permutation_rule_runs_locks_jive(editor):
    """joint_rank="permutation": Lock et al.'s test and alternation; the test's numbers are in meta, the rank is
    the count of observed singular values above their thresholds, the local directions are orthogonal to the joint
    ones; a misspelt rule is refused."""
    dirs = editor.discover(texture(), REGIONS, method="jive", k=4, individual_rank=2, timestep=0.5,
                           joint_rank="permutation")
    test = dirs.meta["joint_rank_test"]
    assert dirs.meta["joint_rank_rule"] == "permutation"
    above = [o > t for o, t in zip(test["observed"], test["thresholds"])] + [False]
    assert dirs.meta["joint_rank"] == above.index(False) == len(dirs.joint)
    for r in dirs.regions:
        assert dirs.individual[r].shape[0] == 2
        assert (dirs.individual[r] @ dirs.joint.T).abs().max() < 1e-5
    with pytest.raises(LocalDiffError, match="permutation"):
        editor.discover(texture(), REGIONS, method="jive", k=4, individual_rank=2, timestep=0.5, joint_rank="perm")


def test_discovery_is_deterministic_for_a_seed(editor):
    """Two editors with empty caches give the same directions for a seed, and another seed gives others (three
    iterations are not converged, so the start shows)."""
    from localdiff import LocalEditor

    masks = {"mouth": REGIONS["mouth"], "side": REGIONS["side"]}

    def fresh(seed):
        e = LocalEditor(editor.model, num_inference_steps=editor.num_inference_steps)
        return e.discover(texture(), masks, k=4, individual_rank=2, max_iter=3, seed=seed).individual["mouth"]

    a, b, c = fresh(0), fresh(0), fresh(1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_clear_cache_makes_the_next_discovery_start_cold(editor, monkeypatch):
    """After clear_cache the subspace iteration runs again (the cache would answer without it), and with
    inversions=True the inversion is redone too."""
    import localdiff.editor as editor_module
    from localdiff import LocalEditor

    e = LocalEditor(editor.model, num_inference_steps=editor.num_inference_steps)
    masks = {"mouth": REGIONS["mouth"], "side": REGIONS["side"]}
    e.discover(texture(), masks, method="masked", k=2, individual_rank=1, max_iter=2)
    calls = []
    solve = editor_module.subspace_iteration
    monkeypatch.setattr(editor_module, "subspace_iteration", lambda *a, **kw: calls.append(1) or solve(*a, **kw))
    e.discover(texture(), masks, method="masked", k=2, individual_rank=1, max_iter=2)
    assert calls == []  # cached
    inversion = e.invert(texture())
    e.clear_cache(inversions=False)
    e.discover(texture(), masks, method="masked", k=2, individual_rank=1, max_iter=2)
    assert calls == [1] and e.invert(texture()) is inversion
    e.clear_cache()
    assert e.invert(texture()) is not inversion


def test_save_load_round_trip(discovered, tmp_path):
    path = tmp_path / "d.safetensors"
    discovered.save(path)
    back = Directions.load(path)
    assert back.regions == discovered.regions
    for r in back.regions:
        assert torch.equal(back.individual[r], discovered.individual[r])
        assert torch.equal(back.masks[r], discovered.masks[r])
    meta = back.meta
    for key in ("format_version", "model_fingerprint", "timestep", "num_steps", "k", "joint_rank",
                "individual_rank", "source_image_hash", "h_norm"):
        assert key in meta, key
    assert back.select("mouth:1").index == 1 and back.select("mouth").index == 0
    assert "mouth" in back.describe()


def test_directions_refusals(discovered, tmp_path):
    with pytest.raises(LocalDiffError, match="no region"):
        discovered.select("nose")
    with pytest.raises(LocalDiffError, match="indices 0..1"):
        discovered.select("mouth:7")
    with pytest.raises(LocalDiffError, match="not a whole number"):
        discovered.select("mouth:x")
    with pytest.raises(LocalDiffError, match="another model|not with this one"):
        discovered.check_model("0000000000000000")
    discovered.check_model("0000000000000000", allow_foreign=True)

    pkl = tmp_path / "d.safetensors"
    torch.save({"x": torch.zeros(2)}, pkl)
    with pytest.raises(LocalDiffError, match="pickle"):
        Directions.load(pkl)
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"hello world, not a tensor file")
    with pytest.raises(LocalDiffError, match="not a valid safetensors"):
        Directions.load(junk)
    from safetensors.torch import save_file

    plain = tmp_path / "plain.safetensors"
    save_file({"a": torch.zeros(1)}, str(plain))
    with pytest.raises(LocalDiffError, match="not localdiff"):
        Directions.load(plain)


def test_editor_refuses_foreign_directions(editor, discovered, tmp_path):
    from dataclasses import replace

    foreign = replace(discovered["mouth"][0], fingerprint="ffffffffffffffff")
    with pytest.raises(LocalDiffError, match="another model"):
        editor.edit(texture(), foreign, strength=0.1)
    with pytest.raises(LocalDiffError, match="finite"):
        editor.edit(texture(), discovered["mouth"][0], strength=float("nan"))


def test_a_safetensors_header_that_starts_like_a_pickle_still_loads(discovered, tmp_path):
    """A safetensors file starts with its header length (8 bytes, little-endian); when its low byte is 0x80 the
    file starts like a pickle. It must load (found when a new metadata key made a real file's header that long)."""
    from dataclasses import replace

    path = tmp_path / "d.safetensors"
    for pad in range(512):
        replace(discovered, meta=dict(discovered.meta, padding="x" * pad)).save(path)
        if path.read_bytes()[:1] == b"\x80":
            break
    assert path.read_bytes()[:1] == b"\x80"
    assert Directions.load(path).regions == discovered.regions


def test_discover_validates_input(editor):
    with pytest.raises(LocalDiffError, match="empty"):
        editor.discover(texture(), {"a": torch.zeros(32, 32, dtype=torch.bool)})
    with pytest.raises(LocalDiffError, match="whole image"):
        editor.discover(texture(), {"a": torch.ones(32, 32, dtype=torch.bool)})
    with pytest.raises(LocalDiffError, match="reserved"):
        editor.discover(texture(), {"joint": REGIONS["mouth"]})
    with pytest.raises(LocalDiffError, match="timestep"):
        editor.discover(texture(), {"a": REGIONS["mouth"]}, timestep=1.5)
    with pytest.raises(LocalDiffError, match="individual rank"):
        editor.discover(texture(), {"a": REGIONS["mouth"]}, k=2, individual_rank=3)
    # JIVE's own settings given to another method would be silently ignored: refused, saying how to fix it
    for method, jive_only in (("ratio", dict(joint_rank=1)), ("masked", dict(rest_block=True))):
        with pytest.raises(LocalDiffError, match=f"setting of the jive method, not of {method}; add method='jive'"):
            editor.discover(texture(), {"a": REGIONS["mouth"]}, method=method, **jive_only)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_discovery_keeps_its_linear_algebra_in_float32(small_dir, dtype):
    """The model runs in bfloat16/float16, QR and JIVE in float32 (CPU LAPACK has no half-precision QR); the
    directions are orthonormal and close to the float32 ones."""
    from localdiff import LocalEditor
    from localdiff.jacobian import largest_principal_angle

    masks = {"top": torch.zeros(16, 16, dtype=torch.bool), "bottom": torch.zeros(16, 16, dtype=torch.bool)}
    masks["top"][:6], masks["bottom"][10:] = True, True
    image = texture(16, seed=1)
    found = {}
    for dt in (torch.float32, dtype):
        ed = LocalEditor.from_pretrained(small_dir, torch_dtype=dt, num_inference_steps=6)
        found[dt] = ed.discover(image, masks, k=2, oversample=2, individual_rank=1, timestep=0.5)
    half = found[dtype]
    for r in masks:
        v = half.individual[r]
        assert v.dtype == torch.float32
        assert torch.allclose(v @ v.T, torch.eye(len(v)), atol=1e-5)
        assert largest_principal_angle(found[torch.float32].individual[r], v) < 10.0


def test_every_method_gives_local_orthonormal_directions_and_records_eps_locality(editor, discovered, tmp_path):
    """method= on the same subspaces: each method's directions are orthonormal and recorded with their eps-level
    locality; the ratio method, which maximises it, is the most local; masked is jive without the split."""
    found = {m: editor.discover(texture(), REGIONS, method=m, k=4, individual_rank=2, timestep=0.5, null_rank=2)
             for m in ("masked", "nullspace", "ratio")}
    found["jive"] = discovered
    for m, dirs in found.items():
        assert dirs.meta["method"] == m
        for r in REGIONS:
            v = dirs.individual[r]
            assert v.shape == (2, 64 * 8 * 8)
            assert torch.allclose(v @ v.T, torch.eye(2), atol=1e-5)
            assert len(dirs.meta["eps_locality"][r]) == 2
        dirs.save(tmp_path / f"{m}.safetensors")  # (masked's singular values are views of the region's: copied)
        back = Directions.load(tmp_path / f"{m}.safetensors")
        assert back.meta["method"] == m and torch.equal(back.individual["eyes"], dirs.individual["eyes"])
    for r in REGIONS:
        jv = editor.responses(texture(), found["ratio"].individual[r][:1], 0.5)
        assert eps_locality(jv, REGIONS[r]).item() == pytest.approx(found["ratio"].meta["eps_locality"][r][0], abs=1e-4)
        best = found["ratio"].meta["eps_locality"][r][0]
        assert best > found["masked"].meta["eps_locality"][r][0] + 0.01
        assert best > found["nullspace"].meta["eps_locality"][r][0]
    assert found["masked"].joint.shape[0] == 0
    with pytest.raises(LocalDiffError, match="unknown discovery method"):
        editor.discover(texture(), REGIONS, method="magic")


def test_rest_block_joins_the_split(editor, discovered):
    """The rest of the image as an extra block: a forced joint direction then has to be shared with it too, which
    changes what is removed; the regions' directions stay orthogonal to it."""
    plain = editor.discover(texture(), REGIONS, method="jive", k=4, individual_rank=2, timestep=0.5, joint_rank=1)
    rest = editor.discover(texture(), REGIONS, method="jive", k=4, individual_rank=2, timestep=0.5, joint_rank=1,
                           rest_block=True)
    assert rest.meta["rest_block"] is True and rest.regions == plain.regions
    from localdiff.jacobian import largest_principal_angle

    assert largest_principal_angle(plain.joint, rest.joint) > 1.0
    for r in REGIONS:
        assert (rest.individual[r] @ rest.joint.T).abs().max() < 1e-5
    everything = {"all": torch.ones(32, 32, dtype=torch.bool)}
    with pytest.raises(LocalDiffError, match="whole image"):
        editor.discover(texture(), everything, method="jive", k=2, individual_rank=1, rest_block=True)


def test_tracked_directions_follow_the_steps_and_are_applied_per_step(editor, tmp_path):
    """track=True: one set of directions per DDIM step, equal to the discovery's at its step and close to a cold
    discovery at the neighbouring steps, sign-continuous; they survive a save/load and render applies each step's
    own vector."""
    from dataclasses import replace

    from localdiff.jacobian import largest_principal_angle
    from localdiff.sampling import ddim_sample

    dirs = editor.discover(texture(), REGIONS, method="masked", k=4, individual_rank=2, timestep=0.5, track=True)
    steps = dirs.meta["per_step_indices"]
    assert steps == list(range(10))
    at = dirs.meta["step_index"]
    inv = editor.invert(texture())
    for r in REGIONS:
        tracked = dirs.per_step[r]
        assert tracked.shape == (10, 2, 64 * 8 * 8)
        assert torch.equal(tracked[at], dirs.individual[r])
        assert ((tracked[:-1] * tracked[1:]).sum(-1) > 0).all()  # each direction keeps its sign from step to step
    for s in (at - 1, at + 1):  # tracking ~ rediscovering there (1 iteration per step: 35-68 deg off)
        cold = editor.discover(texture(), REGIONS, method="masked", k=4, individual_rank=2,
                               timestep=float(inv.schedule.timesteps[s]) / 1000)
        assert cold.meta["step_index"] == s
        for r in REGIONS:
            assert largest_principal_angle(cold.individual[r][:1], dirs.per_step[r][s][:1]) < 15.0, (s, r)
    path = tmp_path / "tracked.safetensors"
    dirs.save(path)
    back = Directions.load(path)
    assert torch.equal(back.per_step["mouth"], dirs.per_step["mouth"])
    d = back["mouth"][0]
    assert torch.equal(d.vector_at(0), dirs.per_step["mouth"][0, 0]) and d.num_steps == 10
    shape = inv.hs[0].shape
    expected, _, _ = ddim_sample(editor.model, inv.x_T, inv.schedule,
                                 delta_h=lambda i: 0.3 * d.unit * d.vector_at(i).reshape(shape))
    got = editor.render(texture(), [[(d, 0.3)]])[0]
    assert (got - expected[0]).abs().max() < 1e-5
    untracked = editor.render(texture(), [[(replace(d, per_step=None, num_steps=None), 0.3)]])[0]
    assert (got - untracked).abs().max() > 1e-4
    other = LocalEditor(editor.model, num_inference_steps=6)
    with pytest.raises(LocalDiffError, match="tracked over 10 DDIM steps"):
        other.render(texture(), [[(d, 0.3)]])


def test_warm_start_converges_at_once():
    from localdiff.jacobian import subspace_iteration

    g = torch.Generator().manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40, generator=g, dtype=torch.float64))
    j = (u * torch.logspace(0, -2, 40, dtype=torch.float64)) @ u.T
    jvp, vjp = (lambda v: v @ j.T), (lambda w: w @ j)
    cold = subspace_iteration(jvp, vjp, 40, torch.ones(1, 40), 3, tol_deg=0.01, max_iter=100, dtype=torch.float64)
    warm = subspace_iteration(jvp, vjp, 40, torch.ones(1, 40), 3, tol_deg=0.01, max_iter=100, dtype=torch.float64,
                              start=cold.vectors)
    assert cold.iterations[0] > 4 and warm.iterations[0] <= 3
    with pytest.raises(ValueError, match="start must have shape"):
        subspace_iteration(jvp, vjp, 40, torch.ones(1, 40), 3, start=torch.zeros(2, 3, 40))
