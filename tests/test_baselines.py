"""The baselines: orthonormal directions of the right shape, the null-space projection against brute force,
edits that leave the strength-0 image untouched, and ``localdiff eval --quick`` end to end."""

from __future__ import annotations

import csv

import pytest
import torch

from localdiff import baselines
from localdiff.baselines.hspace import fit_hspace_pca
from localdiff.jacobian import project_out
from localdiff.cli import main
from localdiff.evaluation import interpolate_strength

from conftest import REGIONS as REGIONS32
from conftest import texture

SETTINGS = dict(k=3, oversample=2, individual_rank=2, null_rank=2, max_iter=6, tol_deg=0.5)
REGIONS = {n: m[::2, ::2].clone() for n, m in REGIONS32.items()}  # the 16 px model's regions


@pytest.fixture(scope="module")
def editor(small_dir):
    """The 16 px model: every baseline runs on it in seconds."""
    from localdiff import LocalEditor

    return LocalEditor.from_pretrained(small_dir, num_inference_steps=8)


@pytest.fixture(scope="module")
def pca(editor):
    return fit_hspace_pca(editor, n_samples=12, n_components=4)


@pytest.mark.parametrize("method", baselines.METHODS)
def test_baseline_directions_are_orthonormal_and_edit(method, editor, pca):
    image = texture(16)
    md = baselines.discover(method, editor, image, REGIONS, components=pca, **SETTINGS)
    inv = editor.invert(image)
    dim = (inv.hs[0] if md.space == "h" else inv.x0)[0].numel()
    assert set(md.vectors) == set(REGIONS)
    for region, v in md.vectors.items():
        assert v.ndim == 2 and v.shape[1] == dim and 1 <= len(v) <= max(SETTINGS["k"], 6)
        gram = v.double() @ v.double().T
        assert torch.allclose(gram, torch.eye(len(v), dtype=gram.dtype), atol=1e-5), (method, region)
    out = baselines.render(editor, image, md, [("eyes", 0.0), ("eyes", 0.3 if md.space == "h" else 0.1)])
    assert torch.equal(out[0], inv.reconstruction[0])  # strength 0 is the reconstruction, bit for bit
    assert (out[1] - out[0]).abs().mean() > 1e-3  # and a non-zero strength changes the image


def test_project_out_matches_brute_force():
    g = torch.Generator().manual_seed(0)
    null = torch.linalg.qr(torch.randn(20, 3, generator=g, dtype=torch.float64))[0].T  # (3, 20) orthonormal
    v = torch.randn(4, 20, generator=g, dtype=torch.float64)
    got = project_out(v, null)
    complement = torch.eye(20, dtype=torch.float64) - null.T @ null  # explicit projector
    ref = torch.linalg.qr((complement @ v.T))[0].T
    assert (got @ null.T).abs().max() < 1e-10  # orthogonal to the null space
    assert torch.allclose(got @ got.T, torch.eye(4, dtype=torch.float64), atol=1e-10)
    # the same subspace, and the same first direction up to sign (Gram-Schmidt keeps the order)
    assert torch.linalg.svdvals(got @ ref.T).min() > 1 - 1e-10
    assert abs(abs(float(got[0] @ ref[0])) - 1) < 1e-10


def test_nullspace_directions_avoid_the_outside(editor):
    """The projected directions move the outside of the region less than the raw masked ones do."""
    image = texture(16)
    raw = baselines.discover("masked", editor, image, REGIONS, **SETTINGS)
    proj = baselines.discover("nullspace", editor, image, REGIONS, **SETTINGS)
    for region, mask in REGIONS.items():
        def outside_share(v):
            r = editor.responses(image, v[:1], 0.5).pow(2).sum(1)[0]
            return float(r[~mask].sum() / r.sum())
        assert outside_share(proj.vectors[region]) < outside_share(raw.vectors[region]), region


def test_most_local_picks_the_concentrated_response():
    masks = {"left": torch.zeros(4, 4, dtype=torch.bool), "right": torch.zeros(4, 4, dtype=torch.bool)}
    masks["left"][:, :2] = True
    masks["right"][:, 2:] = True
    responses = torch.zeros(3, 1, 4, 4)
    responses[0] = 1.0  # everywhere
    responses[1, :, :, 2:] = 1.0  # right only
    responses[2, :, :, :2] = 1.0  # left only
    assert baselines.most_local(responses, masks) == {"left": 2, "right": 1}


def test_interpolate_strength():
    s, ok = interpolate_strength([0.1, 0.2, 0.4], [0.01, 0.04, 0.16], 0.08)  # change ~ strength^2
    assert ok and abs(s - 0.2 * 2**0.5) < 1e-9
    assert interpolate_strength([0.1, 0.2], [0.01, 0.02], 0.5) == (0.2, False)  # never reached
    s, ok = interpolate_strength([0.1, 0.2], [0.02, 0.04], 0.01)  # below the ladder: linear
    assert ok and abs(s - 0.05) < 1e-12


@pytest.fixture
def images(tmp_path):
    """Two small textured images to evaluate on (the face GAN is not a test dependency)."""
    from localdiff.images import to_pil

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        to_pil(texture(16, seed=i)[0]).save(folder / f"face{i}.png")
    return folder


def test_timing_row_median_of_an_even_count():
    from localdiff.evaluation import timing_row

    # median of 4 values: the mean of the middle two (torch.median would give the lower one, 2.0)
    assert timing_row("jive", [1.0, 2.0, 3.0, 10.0]) == "| jive | 2.5 | 4.0 | 4.1 |"


def test_eval_quick_writes_the_report(small_dir, images, tmp_path):
    out = tmp_path / "eval"
    code = main(["eval", "--quick", "--model", str(small_dir), "--images", str(images), "--out-dir", str(out), "-q"])
    assert code == 0
    assert {p.name for p in out.iterdir()} == {"results.csv", "summary.md", "curves.png", "panel.png"}
    rows = list(csv.DictReader(open(out / "results.csv")))
    methods = {r["method"] for r in rows}
    assert methods == set(baselines.METHODS)
    matched = [r for r in rows if r["kind"] == "matched"]
    assert {r["setting"] for r in matched} == {"source", "transfer"}
    assert len(matched) == len(methods) * 3 * 3  # 3 regions x (2 faces + face 0's directions on face 1)
    for r in matched:
        assert 0.0 <= float(r["locality"]) <= 1.0
        assert 0.0 < float(r["eps_locality"]) <= 1.0
        if r["reached"] == "True":  # calibrated to the target visibility
            assert abs(float(r["inside_change"]) - 0.08) < 0.04, r
    summary = (out / "summary.md").read_text()
    assert summary.startswith(f"# localdiff eval: {small_dir} (fingerprint ")  # not the default model's name
    assert "LPIPS: unavailable" in summary or "LPIPS (AlexNet)" in summary
    assert "### Paired against masked" in summary and "| ratio − masked" not in summary
    assert summary.count("| ratio | ") >= 3  # summary, paired (source) and paired (transfer) rows


def test_eps_level_locality_of_h_and_x_methods(editor):
    """The evaluation's eps-level locality: for h-space methods the same number discovery records; for x-space
    methods the locality of d eps/dx_t v, checked against a finite difference."""
    from localdiff.evaluation import eps_level_locality
    from localdiff.metrics import eps_locality

    image = texture(16)
    md = baselines.discover("ratio", editor, image, REGIONS, **SETTINGS)
    got = eps_level_locality(editor, image, md, REGIONS, list(REGIONS))
    for r in REGIONS:
        assert got[r] == pytest.approx(md.info["eps_locality"][r][0], abs=1e-4)
    loco = baselines.discover("loco", editor, image, REGIONS, **SETTINGS)
    got = eps_level_locality(editor, image, loco, REGIONS, ["eyes"])
    inv = editor.invert(image)
    step = inv.schedule.index_of(loco.timestep)
    x, t = inv.xs[step].double(), inv.schedule.timesteps[step]
    v = loco.vectors["eyes"][0].double().view_as(x)
    model = editor.model
    model.unet.double()
    try:
        with torch.no_grad():
            fd = (model.eps(x + 1e-4 * v, t) - model.eps(x - 1e-4 * v, t)) / 2e-4
    finally:
        model.unet.float()
    assert got["eyes"] == pytest.approx(eps_locality(fd[0].float(), REGIONS["eyes"]).item(), abs=1e-3)


def test_paired_table_and_bootstrap_interval():
    from localdiff.evaluation import bootstrap_interval, paired_differences, paired_table

    rows = []
    for face in ("a", "b", "c", "d"):
        for region in ("eyes", "mouth"):
            for method, loc in (("masked", 0.5), ("ratio", 0.7 if region == "eyes" else 0.4)):
                rows.append(dict(face=face, source=face, region=region, method=method, setting="source",
                                 kind="matched", locality=loc, eps_locality=loc, leakage=1 - loc))
    diffs = paired_differences(rows, "ratio", "masked", "source", "locality")
    assert sorted(round(d, 6) for d in diffs) == [-0.1] * 4 + [0.2] * 4
    lo, hi = bootstrap_interval(diffs)
    assert -0.1 <= lo < 0.05 < hi <= 0.2
    assert bootstrap_interval([0.3] * 5) == (pytest.approx(0.3), pytest.approx(0.3))
    table = paired_table(rows, ["masked", "ratio"], "masked", "source")
    assert table[2].startswith("| ratio | 8 | +0.050 [")
    assert "better on 4/8" in table[2]


def test_eval_joint_rank_reaches_jive_only(small_dir, images, tmp_path):
    """--joint-rank 1 takes a joint direction out of JIVE's local directions, so they are no longer the masked
    Jacobian's top singular vectors; the masked baseline is unchanged by it."""
    out = tmp_path / "eval"
    code = main(["eval", "--quick", "--model", str(small_dir), "--images", str(images), "--methods", "jive", "masked",
                 "--no-transfer", "--joint-rank", "1", "--out-dir", str(out), "-q"])
    assert code == 0
    rows = [r for r in csv.DictReader(open(out / "results.csv")) if r["kind"] == "curve"]
    inside = {(r["method"], r["face"], r["region"], r["strength"]): float(r["inside_change"]) for r in rows}
    diffs = [abs(v - inside[("masked", *edit)]) for (method, *edit), v in inside.items() if method == "jive"]
    assert len(diffs) > 0
    assert max(diffs) > 1e-4  # different directions, different edits


def test_interrupted_eval_goes_on_where_it_stopped(editor, tmp_path):
    """Rows recorded face by face; a second run on more faces scores only the new ones and equals one uninterrupted
    run, also when the saved directions for the transfer are gone (rediscovered); other settings are refused."""
    from localdiff.errors import LocalDiffError
    from localdiff.evaluation import EvalSettings, Progress, progress_key, run_evaluation

    settings = EvalSettings(methods=("jive", "loco"), ladder=(0.25, 1.0), pca_samples=4,
                            discover=dict(k=2, oversample=2, individual_rank=1, null_rank=2, max_iter=4, tol_deg=1.0))
    faces = [(f"f{i}", texture(16, seed=i)) for i in range(3)]
    key = progress_key(settings, editor.model, editor.num_inference_steps, REGIONS)

    whole = run_evaluation(editor, faces, REGIONS, settings, progress=False, resume=Progress(tmp_path / "a", key))
    part = Progress(tmp_path / "b", key)
    first = run_evaluation(editor, faces[:2], REGIONS, settings, progress=False, resume=part)
    assert (tmp_path / "b" / "rows.jsonl").read_text().count("\n") == 2
    (tmp_path / "b" / "previous.safetensors").unlink()  # the transfer's directions get rediscovered
    rest = run_evaluation(editor, faces, REGIONS, settings, progress=False, resume=part)
    assert rest["rows"] == whole["rows"] and len(first["rows"]) < len(rest["rows"])
    assert set(rest["panel"]) == {"jive", "loco"}  # face 0's panel comes back from the progress folder
    assert [len(t) for t in rest["timings"].values()] == [3, 3]

    with open(tmp_path / "b" / "rows.jsonl", "a") as f:
        f.write('{"face": "f3", "rows": [')  # a line cut short by a crash is dropped
    assert Progress(tmp_path / "b", key).load(["f0", "f1", "f2", "f3"])[0] == ["f0", "f1", "f2"]
    assert (tmp_path / "b" / "rows.jsonl").read_text().endswith("}\n")

    other = EvalSettings(**{**settings.__dict__, "target_change": 0.05})
    with pytest.raises(LocalDiffError, match="other settings .*target_change"):
        Progress(tmp_path / "b", progress_key(other, editor.model, editor.num_inference_steps, REGIONS)).load(["f0"])


def test_method_specs_run_and_label_variants(editor):
    """NAME:key=value,... overrides the shared settings for one method and labels its results; misspellings are
    refused before any work."""
    from localdiff.errors import LocalDiffError

    assert baselines.parse_method("jive:k=16,joint_rank=permutation,rest_block=true,tol_deg=0.5") == (
        "jive", dict(k=16, joint_rank="permutation", rest_block=True, tol_deg=0.5))
    assert baselines.parse_method("jive:joint_rank=auto") == ("jive", dict(joint_rank=None))
    for bad in ("jiv", "jive:x=1", "jive:k", "jive:k16"):
        with pytest.raises(LocalDiffError):
            baselines.parse_method(bad)
    spec = "masked:individual_rank=1"
    md = baselines.discover(spec, editor, texture(16), REGIONS, **SETTINGS)
    plain = baselines.discover("masked", editor, texture(16), REGIONS, **SETTINGS)
    assert md.method == spec and plain.method == "masked"
    for r in REGIONS:
        assert md.vectors[r].shape[0] == 1 and plain.vectors[r].shape[0] == 2
        assert torch.allclose(md.vectors[r][0], plain.vectors[r][0])


def test_saved_method_directions_keep_their_per_step_vectors(tmp_path):
    """The evaluation's progress file keeps tracked (per-step) directions, so a resumed run transfers the same
    edits."""
    from localdiff.evaluation import load_method_directions, save_method_directions

    g = torch.Generator().manual_seed(0)
    tracked = baselines.MethodDirections("jive:track=true", "h", {"eyes": torch.randn(2, 8, generator=g)}, 0.7, 3.0,
                                         "abc", per_step={"eyes": torch.randn(4, 2, 8, generator=g)},
                                         steps=[3, 4, 5, 6], num_steps=10)
    still = baselines.MethodDirections("masked", "h", {"eyes": torch.randn(2, 8, generator=g)}, 0.7, 3.0, "abc")
    save_method_directions({m.method: m for m in (tracked, still)}, "f0", tmp_path / "p.safetensors")
    back = load_method_directions(tmp_path / "p.safetensors", "f0")
    assert torch.equal(back["jive:track=true"].per_step["eyes"], tracked.per_step["eyes"])
    assert back["jive:track=true"].steps == [3, 4, 5, 6] and back["jive:track=true"].num_steps == 10
    assert back["masked"].per_step is None
    d = back["jive:track=true"].direction("eyes")
    assert torch.equal(d.vector_at(5), tracked.per_step["eyes"][2, 0])
    assert load_method_directions(tmp_path / "p.safetensors", "f1") is None


def test_a_tracked_method_is_not_scored_as_the_untracked_one():
    """The evaluation reuses the scores of a method that found exactly the same edits. A tracked method's
    discovery-step vectors can equal the untracked method's while its per-step vectors (what is applied) differ;
    reusing them made ``ratio:track=true`` copy ``ratio``'s rows, and saving the shared panel tensor crashed the
    32-face run. The key must tell them apart, and equal edits must still share it."""
    from dataclasses import replace

    from localdiff.evaluation import _edits_key

    v = torch.linalg.qr(torch.randn(12, 2))[0].T
    plain = baselines.MethodDirections("ratio", "h", {"eyes": v}, 0.7, 3.0, "f" * 16)
    again = replace(plain, method="jive", vectors={"eyes": v.clone()})
    tracked = replace(plain, method="ratio:track=true", per_step={"eyes": torch.randn(4, 2, 12)},
                      steps=[0, 1, 2, 3], num_steps=4)
    assert _edits_key(plain, ["eyes"]) == _edits_key(again, ["eyes"])
    assert _edits_key(tracked, ["eyes"]) != _edits_key(plain, ["eyes"])
    retracked = replace(tracked, per_step={"eyes": tracked.per_step["eyes"].clone()})
    assert _edits_key(tracked, ["eyes"]) == _edits_key(retracked, ["eyes"])


def test_progress_saves_a_panel_whose_methods_share_one_tensor(tmp_path):
    """Two methods with the same edits share one rendered tensor in the panel; safetensors refuses shared
    storage, which ended the 32-face run after its first face."""
    from localdiff.evaluation import Progress

    out = torch.rand(3, 3, 8, 8)
    progress = Progress(tmp_path / "p", key={"k": 1})
    progress.save_face("face0", [{"x": 1}], {"masked": 1.0}, {}, panel={"masked": out, "jive": out})
    _, _, _, panel = progress.load(["face0"])
    assert set(panel) == {"masked", "jive"} and torch.equal(panel["jive"], out)
