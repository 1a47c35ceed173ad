"""localdiff: unsupervised local editing of images with pretrained diffusion models.

Implements Kouzelis et al., *Enabling Local Editing in Diffusion Models by Joint and Individual Component
Analysis* (BMVC 2024): masked h-space Jacobians, Jacobian subspace iteration and JIVE.

Quick start::

    from localdiff import LocalEditor
    editor = LocalEditor.from_pretrained("path/or/hub-id", torch_dtype=torch.float32, device="cpu")
    dirs = editor.discover(image, masks={"mouth": mouth_mask, "eyes": eyes_mask})   # or a DiscoveryConfig
    edited = editor.edit(image, dirs["mouth"][0], strength=0.25)                     # a PIL image
    edited = editor.edit([image, other], dirs["mouth"][0], strength=0.25)            # batched: a list
    dirs.save("face.safetensors")
"""

from localdiff.config import DiscoveryConfig
from localdiff.directions import Direction, Directions
from localdiff.editor import LocalEditor
from localdiff.errors import LocalDiffError
from localdiff.model import DiffusionModel, load_model

__all__ = ["Direction", "Directions", "DiffusionModel", "DiscoveryConfig", "LocalDiffError", "LocalEditor",
           "load_model"]
__version__ = "0.1.0"
