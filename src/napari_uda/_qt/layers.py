"""Result layers (segmentations and entropy maps) placed exactly on the target image.

Every layer made here copies the target layer's ``scale``, ``translate`` and NIfTI metadata
(affine and header), so it overlays the scan in napari and saves back onto the scan's grid.
Entropy maps use one perceptual colormap and the fixed range [0, 1] (normalised entropy), so the
*before* and *after* maps compare honestly (a fixed range: napari computes no contrast limits).

Layers are made once; later predictions are copied into the existing layer's array and the layer
is refreshed (:func:`_update_in_place`), which costs the GUI thread a few milliseconds where
replacing ``layer.data`` re-derives the layer's dimensions and notifies every listener.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from napari.layers import Image, Labels, Layer

from .._writer import volume_from_layer_data
from ..core.volume import Volume

SEGMENTATION_BEFORE = "segmentation (before)"
SEGMENTATION_AFTER = "segmentation (after)"
ENTROPY_BEFORE = "entropy (before)"
ENTROPY_AFTER = "entropy (after)"
RESULT_LAYERS = (SEGMENTATION_BEFORE, ENTROPY_BEFORE, SEGMENTATION_AFTER, ENTROPY_AFTER)

ENTROPY_COLORMAP = "magma"
ENTROPY_LIMITS = (0.0, 1.0)


def layer_meta(layer: Layer) -> dict:
    """A layer's placement and metadata in the form npe2 writers receive them."""
    return {
        "metadata": dict(layer.metadata),
        "scale": tuple(layer.scale),
        "translate": tuple(layer.translate),
        "name": layer.name,
    }


def layer_volume(layer: Layer) -> Volume:
    """The layer as a :class:`Volume` on its scan's grid (a copy, safe to hand to a worker)."""
    volume = volume_from_layer_data(np.array(layer.data, copy=True), layer_meta(layer))
    source = layer.metadata.get("source_path")
    if source:
        from pathlib import Path

        volume.path = Path(source)
    return volume


def _placement(like: Layer) -> dict:
    metadata = {
        key: like.metadata[key]
        for key in ("affine", "nifti_header", "source_path", "axcodes")
        if key in like.metadata
    }
    return {"scale": tuple(like.scale), "translate": tuple(like.translate), "metadata": metadata}


def _existing(viewer, name: str, kind: type[Layer]) -> Layer | None:
    if name in viewer.layers and isinstance(viewer.layers[name], kind):
        return viewer.layers[name]
    return None


def _update_in_place(layer: Layer, data: np.ndarray) -> bool:
    """Copy ``data`` into ``layer``'s own array and refresh it, when shape and type match."""
    current = layer.data
    if (
        not isinstance(current, np.ndarray)
        or current.shape != data.shape
        or current.dtype != data.dtype
        or not current.flags.writeable
    ):
        return False
    if current is not data:
        np.copyto(current, data)
    layer.refresh()
    return True


def show_labels(viewer, name: str, labels: np.ndarray, like: Layer, **kwargs) -> Labels:
    """Add labels layer ``name`` placed like ``like``, or update the one already there."""
    placement = _placement(like)
    layer = _existing(viewer, name, Labels)
    if layer is None:
        if name in viewer.layers:
            viewer.layers.remove(name)
        return viewer.add_labels(labels, name=name, opacity=0.5, **placement, **kwargs)
    _place(layer, placement)
    if not _update_in_place(layer, labels):
        layer.data = labels
    return layer


def show_entropy(viewer, name: str, entropy: np.ndarray, like: Layer, **kwargs) -> Image:
    """Add entropy image ``name`` (magma, fixed [0, 1]) placed like ``like``, or update it."""
    placement = _placement(like)
    layer = _existing(viewer, name, Image)
    if layer is None:
        if name in viewer.layers:
            viewer.layers.remove(name)
        return viewer.add_image(
            entropy.astype(np.float32, copy=False),
            name=name,
            colormap=ENTROPY_COLORMAP,
            contrast_limits=ENTROPY_LIMITS,
            blending="additive",
            **placement,
            **kwargs,
        )
    _place(layer, placement)
    entropy = entropy.astype(np.float32, copy=False)
    if not _update_in_place(layer, entropy):
        layer.data = entropy
    if tuple(layer.contrast_limits) != ENTROPY_LIMITS:
        layer.contrast_limits = ENTROPY_LIMITS
    return layer


def _place(layer: Layer, placement: dict) -> None:
    """Move ``layer`` to the target's placement (only when it differs: each change re-slices)."""
    if not np.allclose(layer.scale, placement["scale"]):
        layer.scale = placement["scale"]
    if not np.allclose(layer.translate, placement["translate"]):
        layer.translate = placement["translate"]
    layer.metadata.update(placement["metadata"])


def prediction_updates(
    viewer, prediction, like: Layer, *, after: bool
) -> list[tuple[str, Callable[[], Layer]]]:
    """``(layer name, work)`` pairs that show a
    :class:`~napari_uda.core.inference.Prediction` as the *before* or *after* layers, one layer
    per piece of work (to be run in separate event-loop turns, see
    :class:`~napari_uda._qt.gui_queue.GuiQueue`).

    New layers start hidden except ``segmentation (after)`` (shown one turn after it is made),
    so the scan stays visible; an existing layer keeps the visibility the user gave it.
    """
    segmentation, entropy = (
        (SEGMENTATION_AFTER, ENTROPY_AFTER) if after else (SEGMENTATION_BEFORE, ENTROPY_BEFORE)
    )
    labels, entropy_map = prediction.labels, prediction.entropy
    updates = [
        (entropy, lambda: show_entropy(viewer, entropy, entropy_map, like, visible=False)),
        (segmentation, lambda: show_labels(viewer, segmentation, labels, like, visible=False)),
    ]
    if after and segmentation not in viewer.layers:  # made hidden (cheaper), shown next turn
        updates.append((f"{segmentation}: show", lambda: _reveal(viewer, segmentation)))
    return updates


def _reveal(viewer, name: str) -> None:
    if name in viewer.layers:
        viewer.layers[name].visible = True


def show_prediction(viewer, prediction, like: Layer, *, after: bool) -> None:
    """Show a prediction as the before or after layers at once (see
    :func:`prediction_updates`)."""
    for _, work in prediction_updates(viewer, prediction, like, after=after):
        work()


def stepping_axis(viewer, ndim: int = 3) -> int:
    """The array axis of an ``ndim``-dimensional layer that the viewer steps through (the axis
    its slider moves; in a 3D view, the axis that would be sliced in 2D)."""
    world = viewer.dims.order[-3] if len(viewer.dims.order) >= 3 else 0
    return int(min(max(0, world - (viewer.dims.ndim - ndim)), ndim - 1))


def current_index(viewer, layer: Layer, axis: int) -> int:
    """The index along ``axis`` of ``layer``'s data at the viewer's current position."""
    position = layer.world_to_data(viewer.dims.point)
    return int(np.clip(np.round(position[axis]), 0, layer.data.shape[axis] - 1))


def go_to_slice(viewer, layer: Layer, axis: int, index: int) -> None:
    """Show slice ``index`` along ``layer``'s array ``axis``: step through that axis (the other
    two stay displayed in their order) and move the slider there."""
    world_axis = axis + (viewer.dims.ndim - layer.ndim)
    order = list(viewer.dims.order)
    if len(order) >= 3 and order[-3] != world_axis:
        rest = [a for a in order if a != world_axis]
        viewer.dims.order = (*rest[:-2], world_axis, *rest[-2:])
    viewer.dims.set_point(world_axis, layer.translate[axis] + layer.scale[axis] * int(index))


def after_segmentation(viewer) -> Labels | None:
    """The ``segmentation (after)`` labels layer (3D), if the viewer has one (the layer itself,
    not the proxy a plugin's viewer hands out: one identity to follow)."""
    layer = _existing(viewer, SEGMENTATION_AFTER, Labels)
    layer = getattr(layer, "__wrapped__", layer)
    return layer if layer is not None and layer.ndim == 3 else None


def axial_view(viewer, layer: Layer, fraction: float = 0.55) -> None:
    """Step through ``layer``'s axial slices (from its orientation codes, default RAS), anterior
    up and the patient's left on the right, at ``fraction`` of the way up the head."""
    axcodes = layer.metadata.get("axcodes", "RAS")
    superior = next(i for i, code in enumerate(axcodes) if code in "SI")
    anterior = next(i for i, code in enumerate(axcodes) if code in "AP")
    lateral = 3 - superior - anterior
    viewer.dims.order = (superior, anterior, lateral)
    camera = viewer.scene.camera if hasattr(viewer, "scene") else viewer.camera
    camera.orientation2d = ("up", "right")
    shape = layer.data.shape[superior]
    viewer.dims.set_point(
        superior, layer.translate[superior] + layer.scale[superior] * shape * fraction
    )
    viewer.reset_view()
