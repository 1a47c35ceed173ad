"""Face-part masks for any face photo, from MediaPipe's face mesh (478 landmarks), without painting.

The optional extra ``pip install -e ".[masks]"`` installs mediapipe 0.10.14, whose wheel holds the face-mesh model
(later releases download their models at run time, which fails offline). Each part is the filled convex hull of
its landmarks in MediaPipe's own groupings (``FACEMESH_LIPS``, ``FACEMESH_LEFT_EYE`` ...), one hull per side for
the paired parts. Small images are upsampled for detection and the hulls are rasterised at the detection size,
then area-averaged back to the image's size and thresholded at one half.

There is no ``hair`` part: the face mesh has no landmarks on the hair, and a hull around the head would be a
guess; use the shipped ``hair`` template (default model) or paint it.

    masks = face_part_masks("face.png", ["eyes", "mouth"])     # {"eyes": (H, W) bool tensor, ...}
    editor.discover("face.png", masks)
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from localdiff.errors import LocalDiffError
from localdiff.images import ImageLike, as_pil

# part -> the face-mesh landmark groups it is made of (one filled hull each)
FACE_PARTS = {
    "eyes": ("FACEMESH_LEFT_EYE", "FACEMESH_RIGHT_EYE"),
    "brows": ("FACEMESH_LEFT_EYEBROW", "FACEMESH_RIGHT_EYEBROW"),
    "nose": ("FACEMESH_NOSE",),
    "mouth": ("FACEMESH_LIPS",),
    "face": ("FACEMESH_FACE_OVAL",),
}
# Faces are detected at this size at least (the face mesh finds no face in a 64 px image; upsampled it does).
DETECT_SIZE = 256
INSTALL = 'automatic face masks need mediapipe 0.10.14 (its wheel holds the face-mesh model); run: pip install -e ".[masks]"'


def parse_parts(text: str | Sequence[str]) -> list[str]:
    """``"eyes,mouth"`` or a list of part names -> the names, checked against :data:`FACE_PARTS`."""
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    unknown = [p for p in parts if p not in FACE_PARTS]
    if unknown or not parts:
        extra = " (hair has no face-mesh landmarks: use the hair template or paint it)" if "hair" in unknown else ""
        raise LocalDiffError(f"unknown face part(s) {', '.join(unknown) or '(none given)'}; choose from "
                             f"{', '.join(FACE_PARTS)}{extra}")
    if len(set(parts)) != len(parts):
        raise LocalDiffError(f"a face part is named twice in {','.join(parts)}")
    return parts


def _mediapipe():
    os.environ.setdefault("GLOG_minloglevel", "2")  # MediaPipe's C++ start-up messages
    try:
        import cv2
        import mediapipe as mp
    except ImportError:
        raise LocalDiffError(INSTALL) from None
    return mp, cv2


def face_landmarks(image: ImageLike) -> np.ndarray:
    """The face mesh's 478 landmarks of the one face in ``image`` as (478, 2) pixel coordinates (x, y) of the
    image as given. Raises :class:`LocalDiffError` when no face is found."""
    mp, _ = _mediapipe()
    pil = as_pil(image, "image").convert("RGB")
    w, h = pil.size
    scale = max(1.0, DETECT_SIZE / min(w, h))
    big = pil.resize((round(w * scale), round(h * scale)), Image.Resampling.BICUBIC) if scale > 1 else pil
    with mp.solutions.face_mesh.FaceMesh(static_image_mode=True, max_num_faces=1, refine_landmarks=True,
                                         min_detection_confidence=0.5) as mesh:
        found = mesh.process(np.asarray(big))
    if not found.multi_face_landmarks:
        raise LocalDiffError("no face found in the image (MediaPipe face mesh); automatic masks need a face seen "
                             "roughly from the front: paint the masks instead (--mask NAME=MASK.png)")
    points = found.multi_face_landmarks[0].landmark
    return np.array([(p.x * w, p.y * h) for p in points], dtype=np.float64)


def part_masks_from_landmarks(landmarks: np.ndarray, size: tuple[int, int], parts: Sequence[str]) -> dict[str, Tensor]:
    """Filled convex hulls of each part's landmark groups, rasterised at ``size`` (width, height): part -> (H, W)
    bool tensor. ``landmarks`` (478, 2) are pixel coordinates at ``size``."""
    mp, cv2 = _mediapipe()
    w, h = size
    scale = max(1.0, DETECT_SIZE / min(w, h))
    big = (round(w * scale), round(h * scale))
    masks = {}
    for part in parse_parts(parts):
        canvas = np.zeros((big[1], big[0]), dtype=np.uint8)
        for group in FACE_PARTS[part]:
            index = sorted({i for edge in getattr(mp.solutions.face_mesh, group) for i in edge})
            pts = np.round(landmarks[index] * scale).astype(np.int32)
            cv2.fillConvexPoly(canvas, cv2.convexHull(pts), 255)
        coverage = np.asarray(Image.fromarray(canvas).resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255
        m = torch.from_numpy(coverage >= 0.5)
        if not m.any():
            raise LocalDiffError(f"the {part} found in the image is smaller than a pixel at {w}x{h}; use a larger "
                                 f"image or paint the mask")
        masks[part] = m
    return masks


def face_part_masks(image: ImageLike, parts: str | Sequence[str] = tuple(FACE_PARTS)) -> dict[str, Tensor]:
    """Masks of the face ``parts`` (default: all of :data:`FACE_PARTS`) of the one face in ``image``, at the
    image's size: part -> (H, W) bool tensor, True inside."""
    parts = parse_parts(parts)
    pil = as_pil(image, "image")
    return part_masks_from_landmarks(face_landmarks(pil), pil.size, parts)
