"""``localdiff serve``: a Gradio app on top of :class:`~localdiff.editor.LocalEditor` (no second implementation).

Each browser session has its own :class:`Session` (a ``gr.State``: image, regions, directions, output folder);
the model and the editor's content-keyed inversion cache are shared, and requests are queued one at a time, so
two users never see each other's results. The handlers are plain functions of (editor, session, inputs) and are
unit-tested without a browser; :func:`build_app` only wires them to components.
"""

from __future__ import annotations

import atexit
import logging
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image
from torch import Tensor

from localdiff.directions import Directions
from localdiff.config import DISCOVERY_METHODS, EDIT_RANGE, DiscoveryConfig
from localdiff.editor import LocalEditor
from localdiff.errors import LocalDiffError
from localdiff.images import load_image, open_image, save_image, to_pil
from localdiff.masks import load_mask, template_names, template_path
from localdiff.reference import strength_span
from localdiff.sampling import generate, make_schedule
from localdiff.viz import display_scale, enlarge, heatmap, save_gif, symmetric_strengths

log = logging.getLogger("localdiff")

MAX_SLIDERS = 12
MAX_UPLOAD = "10mb"
MAX_PIXELS = 4096 * 4096
COLORS = [(255, 64, 64), (64, 160, 255), (64, 220, 96), (255, 200, 0), (200, 64, 255), (0, 220, 220)]
STRENGTH_RANGE = EDIT_RANGE  # the sliders run over the CLI's default range

# Every session's files live in one folder per server process, removed when the session ends and at exit.
_ROOT: Path | None = None


def _root() -> Path:
    global _ROOT
    if _ROOT is None or not _ROOT.is_dir():
        _ROOT = Path(tempfile.mkdtemp(prefix="localdiff-ui-"))
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


@dataclass
class Session:
    """What one browser session has made (never shared between sessions)."""

    image: Tensor | None = None  # (1, C, R, R) in [-1, 1]
    masks: dict[str, Tensor] = field(default_factory=dict)  # name -> bool (R, R)
    directions: Directions | None = None
    workdir: Path | None = None

    def reset(self, image: Tensor | None = None) -> None:
        """Drop the regions and directions, and take ``image`` as the new input if given."""
        if image is not None:
            self.image = image
        self.masks, self.directions = {}, None

    def folder(self) -> Path:
        if self.workdir is None:
            self.workdir = Path(tempfile.mkdtemp(prefix="session-", dir=_root()))
        return self.workdir

    def close(self) -> None:
        """Remove the session's files (Gradio calls this when the browser session ends)."""
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


# ---------------------------------------------------------------------- handlers (plain functions, tested)
def _need_image(session: Session) -> Tensor:
    if session.image is None:
        raise LocalDiffError("upload an image or sample one first")
    return session.image


def overlay(image: Tensor, masks: dict[str, Tensor]) -> Image.Image:
    """The image with each region tinted in its own colour (for display)."""
    arr = np.asarray(to_pil(image[0])).astype(np.float32)
    for i, m in enumerate(masks.values()):
        sel = m.cpu().numpy().astype(bool)
        arr[sel] = 0.55 * arr[sel] + 0.45 * np.array(COLORS[i % len(COLORS)], np.float32)
    return enlarge(Image.fromarray(arr.clip(0, 255).astype(np.uint8)))


def load_upload(editor: LocalEditor, session: Session, path: str | None) -> Image.Image:
    """A new input image from an uploaded file: resets the regions and directions."""
    if not path:
        raise LocalDiffError("choose an image file to upload")
    try:
        im = open_image(path, "the uploaded file")
    except LocalDiffError:
        raise LocalDiffError("the uploaded file is not an image localdiff can read; upload a PNG or JPEG") from None
    if im.size[0] * im.size[1] > MAX_PIXELS:
        raise LocalDiffError(f"the image is {im.size[0]}x{im.size[1]} pixels; the limit is 4096x4096")
    session.reset(load_image(im, editor.model.resolution, name="upload"))
    return overlay(session.image, {})


def sample_input(editor: LocalEditor, session: Session, seed: float) -> Image.Image:
    """A new input image drawn from the model with ``seed``."""
    seed = int(seed)
    if seed < 0:
        raise LocalDiffError(f"the seed must be 0 or more, got {seed}")
    session.reset(generate(editor.model, 1, make_schedule(editor.model, editor.num_inference_steps), seed=seed))
    return overlay(session.image, {})


def set_template_regions(editor: LocalEditor, session: Session, names: list[str]) -> Image.Image:
    """Use the model's shipped templates ``names`` as the regions (replacing template regions chosen before)."""
    image = _need_image(session)
    painted = {n: m for n, m in session.masks.items() if n not in template_names()}
    session.masks = {**{n: load_mask(template_path(n), editor.model.resolution, name=n) for n in names}, **painted}
    session.directions = None
    return overlay(image, session.masks)


def add_painted_region(editor: LocalEditor, session: Session, painting: dict | None, name: str) -> Image.Image:
    """A region from the brush strokes of the image editor (any painted pixel of any layer), named ``name``."""
    image = _need_image(session)
    from localdiff.directions import check_region_name

    name = check_region_name((name or "").strip())
    layers = [np.asarray(lay) for lay in (painting or {}).get("layers") or [] if lay is not None]
    if not layers:
        raise LocalDiffError("paint the region with the brush first, then add it")
    alpha = np.zeros(layers[0].shape[:2], bool)
    for lay in layers:
        alpha |= (lay[..., 3] > 0) if lay.ndim == 3 and lay.shape[2] == 4 else (lay.reshape(*lay.shape[:2], -1).max(-1) > 0)
    mask_img = Image.fromarray((alpha * 255).astype(np.uint8))
    session.masks[name] = load_mask(mask_img, editor.model.resolution, name=name)
    session.directions = None
    return overlay(image, session.masks)


def set_face_part_regions(editor: LocalEditor, session: Session, parts: list[str]) -> Image.Image:
    """The face parts ``parts`` found on the session's image by MediaPipe's face mesh as the regions (replacing
    face-part regions found before; other regions stay)."""
    from localdiff.facemasks import FACE_PARTS, face_part_masks

    image = _need_image(session)
    if not parts:
        raise LocalDiffError("tick the face parts to find first (e.g. eyes, mouth)")
    found = face_part_masks(to_pil(image[0]), list(parts))
    kept = {n: m for n, m in session.masks.items() if n not in FACE_PARTS}
    session.masks = {**kept, **found}
    session.directions = None
    return overlay(image, session.masks)


def set_auto_regions(editor: LocalEditor, session: Session, n: float, k: int = 8) -> Image.Image:
    """``n`` regions found from the model itself (:func:`localdiff.regions.auto_regions`, comparing ``k``
    directions), replacing all regions."""
    from localdiff.regions import auto_regions

    image = _need_image(session)
    session.masks = auto_regions(editor, image, int(n), k=int(k))
    session.directions = None
    return overlay(image, session.masks)


def clear_regions(editor: LocalEditor, session: Session) -> Image.Image:
    image = _need_image(session)
    session.reset()
    return overlay(image, {})


def discover(editor: LocalEditor, session: Session, timestep: float, k: int, individual_rank: int,
             joint_rank: str, method: str = DiscoveryConfig.method, stage=None) -> list[str]:
    """Discover local directions for the session's regions; returns the slider names ("region:index").

    ``stage(fraction, text)``, if given, is told each stage as it starts (inversion, subspace iteration, JIVE)."""
    image = _need_image(session)
    if not session.masks:
        raise LocalDiffError("choose at least one region (a template or a painted one) before discovering")
    text = str(joint_rank).strip().lower()
    jr = None if text in ("", "auto") else text if text == "permutation" else _int(joint_rank, "joint rank")
    stage = stage or (lambda fraction, text: None)
    stage(0.0, "inverting the image (DDIM)")
    editor.invert(image)
    stage(0.3, f"subspace iteration for {len(session.masks)} regions")
    session.directions = editor.discover(image, session.masks, method=str(method), timestep=float(timestep),
                                         k=int(k), individual_rank=int(individual_rank), joint_rank=jr)
    stage(0.95, f"{method} directions found; rendering")
    path = session.folder() / "directions.safetensors"
    session.directions.save(path)
    return [d.name for d in session.directions.local()][:MAX_SLIDERS]


def discover_reference(editor: LocalEditor, session: Session, reference_path: str | None, timestep: float,
                       k: int = DiscoveryConfig.k, min_locality: float = 0.0) -> list[str]:
    """One direction per region towards an uploaded reference image's region; returns the slider names. The
    strength that makes the fitted edit is in the directions' ``meta["reference_strength"]``; ``min_locality``
    above 0 keeps only edits at least that local (:meth:`LocalEditor.reference_directions`)."""
    image = _need_image(session)
    if not session.masks:
        raise LocalDiffError("choose at least one region before finding directions towards a reference")
    if not reference_path:
        raise LocalDiffError("upload the reference image (the face whose region to move towards)")
    try:
        reference = load_image(reference_path, editor.model.resolution, name="reference")
    except LocalDiffError:
        raise LocalDiffError("the reference is not an image localdiff can read; upload a PNG or JPEG") from None
    session.directions = editor.reference_directions(image, reference, session.masks, timestep=float(timestep),
                                                     k=int(k), min_locality=float(min_locality) or None,
                                                     reference_name=Path(reference_path).name)
    session.directions.save(session.folder() / "directions.safetensors")
    return [d.name for d in session.directions.local()][:MAX_SLIDERS]


def _int(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise LocalDiffError(f"{what} must be a whole number or 'auto', got {text!r}") from None


def _edits(directions: Directions, values) -> list:
    return [(d, float(v)) for d, v in zip(directions.local()[:MAX_SLIDERS], values) if float(v) != 0.0]


def render(editor: LocalEditor, session: Session, values, *, image: Tensor | None = None,
           directions: Directions | None = None) -> tuple[Image.Image, Image.Image, Image.Image]:
    """(original, edited, |difference| heatmap) for the slider ``values`` (one per local direction)."""
    image = image if image is not None else _need_image(session)
    directions = directions or session.directions
    if directions is None:
        raise LocalDiffError("discover directions first (or upload a directions file for transfer)")
    edits = _edits(directions, values)
    inv = editor.invert(image)
    edited = editor.render(image, [edits], allow_foreign=False)[0] if edits else inv.reconstruction[0]
    save_image(to_pil(edited), session.folder() / "edited.png")
    diff = (edited.float().clamp(-1, 1) - inv.reconstruction[0].float().clamp(-1, 1)) / 2
    return enlarge(to_pil(image[0])), enlarge(to_pil(edited)), enlarge(heatmap(diff, vmax=0.25))


def transfer(editor: LocalEditor, session: Session, target_path: str | None, dirs_path: str | None, values):
    """Apply the current (or an uploaded) directions file with the slider values to another uploaded image."""
    if not target_path:
        raise LocalDiffError("upload the image to transfer the edit to")
    directions = Directions.load(dirs_path) if dirs_path else session.directions
    if directions is None:
        raise LocalDiffError("discover directions first, or upload a directions file")
    directions.check_model(editor.model.fingerprint)
    try:
        target = load_image(target_path, editor.model.resolution, name="transfer image")
    except LocalDiffError:
        raise LocalDiffError("the image to transfer to is not an image localdiff can read; upload a PNG or JPEG") from None
    return render(editor, session, values, image=target, directions=directions)


def sweep_gif(editor: LocalEditor, session: Session, name: str, frames: int = 9) -> str:
    """A GIF of direction ``name`` over the sliders' range on the session's image; returns its path."""
    image = _need_image(session)
    if session.directions is None:
        raise LocalDiffError("discover directions first")
    d = session.directions.select(name or session.directions.local()[0].name)
    span = strength_span(session.directions.meta, STRENGTH_RANGE)
    out = editor.render(image, [[(d, s)] for s in symmetric_strengths(span, frames)])
    path = session.folder() / f"sweep_{d.region}_{d.index}.gif"
    save_gif(out, path)
    return str(path)


# ---------------------------------------------------------------------- the app
def build_app(editor: LocalEditor):
    """The Gradio Blocks app for ``editor`` (call ``.queue().launch()`` on it, or use :func:`serve`)."""
    import gradio as gr

    lock = threading.Lock()  # the editor's caches are shared; one request at a time uses them

    def guarded(fn, n_outputs: int):
        """Run a handler; a mistake becomes one friendly line (a toast), the server logs one line, and the
        outputs are left as they were (no error badges)."""
        def run(*args, **kwargs):
            try:
                with lock:
                    return fn(*args, **kwargs)
            except LocalDiffError as exc:
                message = friendly(str(exc))
                log.info("web UI: %s", message)
            except Exception:  # a bug: the traceback goes to the server log, the user gets one line
                log.exception("web UI request failed")
                message = "something went wrong inside localdiff; the server log has the details"
            gr.Warning(message)
            skipped = tuple(gr.skip() for _ in range(n_outputs))
            return skipped if n_outputs != 1 else skipped[0]
        return run

    scale = display_scale(editor.model.resolution)
    with gr.Blocks(title="localdiff", delete_cache=(3600, 3600)) as app:
        state = gr.State(Session(), delete_callback=lambda s: s.close() if isinstance(s, Session) else None)
        from localdiff.model import default_model_path

        is_default = default_model_path() is not None and editor.model.name == str(default_model_path())
        model_name = "the embedded default model" if is_default else f"`{editor.model.name}`"
        gr.Markdown("## localdiff — local edits with a diffusion model\n"
                    f"Model: {model_name} ({editor.model.resolution} px, fingerprint "
                    f"`{editor.model.fingerprint}`). 1) upload or sample an image, 2) choose regions, 3) discover, "
                    "4) move the sliders.")
        with gr.Row():
            with gr.Column():
                # a File, not an Image: gradio would decode an Image upload itself and show its own internal
                # error for a file that is not one; load_upload says it in one line instead
                upload = gr.File(label="upload an image (PNG, JPEG)", file_types=["image"], type="filepath",
                                 elem_id="upload", height=120)
                with gr.Row():
                    seed = gr.Number(value=0, precision=0, label="seed", elem_id="seed")
                    sample_btn = gr.Button("sample from the model", elem_id="sample")
                templates = gr.CheckboxGroup(template_names(), label="template regions", elem_id="templates")
                with gr.Accordion("paint a region", open=False):
                    painter = gr.ImageEditor(type="numpy", label="paint over the image", elem_id="painter",
                                             brush=gr.Brush(colors=["#ff0000"], color_mode="fixed",
                                                            default_size=max(2, 2 * scale)))
                    region_name = gr.Textbox(label="region name", value="region1")
                    add_btn = gr.Button("add painted region")
                with gr.Accordion("regions without painting", open=False):
                    from localdiff.facemasks import FACE_PARTS

                    parts = gr.CheckboxGroup(list(FACE_PARTS), value=["eyes", "mouth"], label="face parts",
                                             elem_id="parts")
                    parts_btn = gr.Button("find face parts (MediaPipe)", elem_id="find_parts")
                    with gr.Row():
                        n_regions = gr.Number(value=4, precision=0, minimum=2, maximum=16,
                                              label="number of regions")
                        auto_btn = gr.Button("automatic regions (from the model)", elem_id="auto_regions")
                clear_btn = gr.Button("clear regions")
            with gr.Column():
                regions_view = gr.Image(label="regions", interactive=False, elem_id="regions", height=256)
                with gr.Accordion("discovery options", open=False):
                    timestep = gr.Slider(0.05, 1.0, value=DiscoveryConfig.timestep, step=0.05, label="timestep (× T)")
                    k = gr.Slider(1, 12, value=DiscoveryConfig.k, step=1, label="k (singular vectors per region)")
                    ind_rank = gr.Slider(1, 12, value=DiscoveryConfig.individual_rank, step=1, label="local directions per region")
                    joint = gr.Textbox(value="auto", label="joint rank (jive: auto, permutation or a number)")
                    method = gr.Dropdown(list(DISCOVERY_METHODS), value=DiscoveryConfig.method, label="method",
                                         info="jive: AJIVE split (the paper); masked: top singular vectors; "
                                              "nullspace: projected off the outside's; ratio: most in-region change")
                discover_btn = gr.Button("discover", variant="primary", elem_id="discover")
                with gr.Accordion("or: towards a reference image", open=False):
                    reference = gr.File(label="reference image (its regions' look is the target)",
                                        file_types=["image"], type="filepath", elem_id="reference", height=100)
                    min_locality = gr.Slider(0.0, 0.9, value=0.0, step=0.05, label="minimum locality (0: none)",
                                             info="share of the edit's change inside the region; higher: more "
                                                  "local edits that move the region less far")
                    reference_btn = gr.Button("find directions towards the reference", elem_id="discover_reference")
        status = gr.Markdown("", elem_id="status")
        sliders = [gr.Slider(-STRENGTH_RANGE, STRENGTH_RANGE, value=0.0, step=0.05, visible=False,
                             label=f"direction {i}", elem_id=f"dir{i}") for i in range(MAX_SLIDERS)]
        with gr.Row():
            original = gr.Image(label="original", interactive=False, elem_id="original")
            edited = gr.Image(label="edited", interactive=False, elem_id="edited")
            diff = gr.Image(label="|difference|", interactive=False, elem_id="diff")
        with gr.Row():
            sweep_name = gr.Dropdown([], label="direction for the sweep GIF", allow_custom_value=False)
            sweep_btn = gr.Button("make sweep GIF")
        downloads = gr.File(label="downloads (edited PNG, sweep GIF, directions)", file_count="multiple",
                            interactive=False, elem_id="downloads")
        with gr.Accordion("transfer to another image", open=False):
            with gr.Row():
                target = gr.File(label="image to transfer to (PNG, JPEG)", file_types=["image"], type="filepath")
                dirs_file = gr.File(label="directions file (optional: else the current ones)",
                                    file_types=[".safetensors"], type="filepath")
            transfer_btn = gr.Button("apply the sliders to this image")
            with gr.Row():
                t_original = gr.Image(label="original", interactive=False)
                t_edited = gr.Image(label="edited", interactive=False)
                t_diff = gr.Image(label="|difference|", interactive=False)

        def files(session: Session) -> list[str]:
            folder = session.folder()
            return [str(p) for p in sorted(folder.iterdir()) if p.suffix in (".png", ".gif", ".safetensors")]

        def on_image(fn):
            def run(session, value):
                view = fn(editor, session, value)
                return session, view, view, *[gr.update(visible=False, value=0.0) for _ in sliders]
            return run

        new_image_outputs = [state, regions_view, painter, *sliders]
        upload.upload(guarded(on_image(load_upload), len(new_image_outputs)), [state, upload], new_image_outputs,
                      api_name="upload")
        sample_btn.click(guarded(on_image(sample_input), len(new_image_outputs)), [state, seed], new_image_outputs,
                         api_name="sample")
        templates.change(guarded(lambda s, names: (s, set_template_regions(editor, s, names)), 2),
                         [state, templates], [state, regions_view], api_name="template_regions")
        add_btn.click(guarded(lambda s, p, n: (s, add_painted_region(editor, s, p, n)), 2),
                      [state, painter, region_name], [state, regions_view], api_name="add_region")
        clear_btn.click(guarded(lambda s: (s, clear_regions(editor, s)), 2), [state], [state, regions_view],
                        api_name="clear_regions")
        parts_btn.click(guarded(lambda s, names: (s, set_face_part_regions(editor, s, names)), 2),
                        [state, parts], [state, regions_view], api_name="face_parts")
        auto_btn.click(guarded(lambda s, n: (s, set_auto_regions(editor, s, n)), 2),
                       [state, n_regions], [state, regions_view], api_name="auto_regions")

        def on_discover(session, t, kk, ir, jr, m, progress=gr.Progress(track_tqdm=True)):
            editor.progress = True  # its bars (inversion, subspace iteration i/N) show in the page
            try:
                names = discover(editor, session, t, kk, ir, jr, m, stage=lambda f, text: progress(f, desc=text))
            finally:
                editor.progress = False
            meta = session.directions.meta
            its, eps = meta.get("iterations", {}), meta.get("eps_locality", {})
            joint = f"; JIVE joint rank {meta['joint_rank']}" if meta["method"] == "jive" else ""
            msg = (f"found {len(names)} local directions ({', '.join(names)}) with {meta['method']}; subspace "
                   f"iterations {', '.join(f'{r} {n}' for r, n in its.items())}{joint}; eps-level locality of the "
                   f"first direction {', '.join(f'{r} {v[0]:.2f}' for r, v in eps.items())}. Move a slider to edit.")
            return found(session, names, msg)

        def found(session, names, msg):
            """The page after new directions: one slider per direction at 0, the unedited views, the sweep
            choices and the downloads."""
            span = strength_span(session.directions.meta, STRENGTH_RANGE, over=1.5)
            ups = [gr.update(visible=i < len(names), label=names[i] if i < len(names) else "", value=0.0,
                             minimum=-span, maximum=span) for i in range(MAX_SLIDERS)]
            views = render(editor, session, [0.0] * len(names))
            return (session, msg, *ups, *views, gr.update(choices=names, value=names[0] if names else None),
                    files(session))

        discover_outputs = [state, status, *sliders, original, edited, diff, sweep_name, downloads]
        discover_btn.click(guarded(on_discover, len(discover_outputs)), [state, timestep, k, ind_rank, joint, method],
                           discover_outputs, api_name="discover")

        def on_reference(session, ref, t, kk, low):
            names = discover_reference(editor, session, ref, t, kk, low)
            meta = session.directions.meta
            reached = {r: f.get("locality") for r, f in meta.get("fit", {}).items()}
            msg = ("directions towards the reference found (" + ", ".join(
                f"{r}: strength {v:.3f} makes the fitted edit"
                + (f", {reached[r]:.2f} local" if reached.get(r) is not None else "")
                for r, v in meta["reference_strength"].items()) + "). Move a slider.")
            return found(session, names, msg)

        reference_btn.click(guarded(on_reference, len(discover_outputs)), [state, reference, timestep, k, min_locality],
                            discover_outputs, api_name="discover_reference")

        def on_slide(session, *values):
            return (session, *render(editor, session, values), files(session))

        gr.on([s.release for s in sliders], guarded(on_slide, 5), [state, *sliders],
              [state, original, edited, diff, downloads], api_name="edit")

        sweep_btn.click(guarded(lambda s, n: (s, (sweep_gif(editor, s, n), files(s))[1]), 2),
                        [state, sweep_name], [state, downloads], api_name="sweep")
        transfer_btn.click(guarded(lambda s, t, f, *v: (s, *transfer(editor, s, t, f, v)), 4),
                           [state, target, dirs_file, *sliders], [state, t_original, t_edited, t_diff],
                           api_name="transfer")
    return app


def friendly(message: str) -> str:
    """A message for the page: file paths shortened to their names (no temporary folders shown)."""
    return re.sub(r"(?:[A-Za-z]:)?(?:[/\\][^\s/\\]+)+[/\\]([^\s/\\]+)", r"\1", message)


def serve(editor: LocalEditor, *, host: str = "127.0.0.1", port: int = 7860, share: bool = False) -> None:
    """Queue requests (one at a time; up to 32 waiting) and serve the app until interrupted."""
    app = build_app(editor)
    app.queue(default_concurrency_limit=1, max_size=32)
    try:
        app.launch(server_name=host, server_port=port, share=share, max_file_size=MAX_UPLOAD, show_error=True)
    except OSError as exc:  # gradio's message about the port names its environment variable, not our --port
        raise LocalDiffError(f"cannot serve on {host}:{port} ({exc.strerror or 'port in use'}); choose another port "
                             f"with --port") from None


__all__ = ["Session", "build_app", "serve", "load_upload", "sample_input", "set_template_regions",
           "set_face_part_regions", "set_auto_regions", "add_painted_region", "discover", "discover_reference",
           "render", "transfer", "sweep_gif"]
