"""npe2 sample data: the shipped demo heads (source and new scanner), their reference brain masks,
and a one-click demo session that also loads the demo model and opens the widgets."""

from __future__ import annotations

from pathlib import Path

from ._reader import volume_layer_data
from .core.volume import load_volume


def demo_path(key: str) -> Path:
    """Path of a shipped demo file: ``source_image``, ``source_mask``, ``target_image``,
    ``target_mask`` or ``model``."""
    from .data import demo_files

    files = demo_files()
    value = files[key] if isinstance(files, dict) else getattr(files, key)
    return Path(value)


def _layer(key: str, name: str) -> tuple:
    return volume_layer_data(load_volume(demo_path(key)), name=name)


def source_head() -> list[tuple]:
    """The demo head as the source scanner (the one the demo model was trained on) sees it."""
    return [_layer("source_image", "head (source scanner)")]


def source_mask() -> list[tuple]:
    """Reference brain mask of the source-scanner head."""
    return [_layer("source_mask", "brain mask (source scanner)")]


def target_head() -> list[tuple]:
    """The demo head as the new scanner sees it (the volume to adapt to)."""
    return [_layer("target_image", "head (new scanner)")]


def target_mask() -> list[tuple]:
    """Reference brain mask of the new-scanner head (for QA only, never for training)."""
    return [_layer("target_mask", "brain mask (new scanner)")]


def demo_session() -> list[tuple]:
    """New-scanner head and its reference mask; also loads the demo model into the current
    viewer's session and opens the Model and Adapt widgets."""
    import napari

    viewer = napari.current_viewer()
    if viewer is not None:
        from ._qt.state import get_state

        state = get_state(viewer)
        if state.model is None:
            from .core.models import load_model

            state.model = load_model(demo_path("model"))
            state.model_source = "demo model"
        for widget in ("Model", "Adapt"):
            viewer.window.add_plugin_dock_widget("napari-uda", widget)
    return target_head() + target_mask()
