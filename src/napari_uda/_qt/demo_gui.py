"""``python -m napari_uda._qt.demo_gui``: napari opened ready to correct, for ``scripts/demo.sh
--gui``.

Opens the demo session (the new-scanner head, its reference mask for QA, the demo model, the
Model and Adapt widgets), shows an axial slice, and presses **Run** in the Adapt widget with
TENT (label-free, a few seconds on the demo). When the run ends, ``segmentation (after)`` is
selected with napari's brush, the method becomes *Corrections only*, and a notification says
what to do next: correct a few slices, then press **Adapt with corrections**.
"""

from __future__ import annotations

import argparse
import sys

#: The method chosen for rounds once the first run has ended.
ROUND_METHOD = "corrections"
#: What the user reads when the first run has ended.
NEXT_STEP = (
    "Correct 'segmentation (after)' on a few slices (brush, eraser, fill bucket; each slice "
    "you edit counts), then press 'Adapt with corrections' in the Adapt widget (method: "
    "Corrections only)."
)
TARGET, REFERENCE = "head (new scanner)", "brain mask (new scanner)"


def open_demo(viewer, *, method: str = "tent", run: bool = True):
    """Open the demo session in ``viewer`` and start a first run; the Adapt widget."""
    from .layers import axial_view

    viewer.open_sample("napari-uda", "demo_session")
    _, adapt = viewer.window.add_plugin_dock_widget("napari-uda", "Adapt")
    axial_view(viewer, viewer.layers[TARGET])
    adapt.reference.value = viewer.layers[REFERENCE]
    index = adapt.method_combo.findData(method)
    if index >= 0:
        adapt.method_combo.setCurrentIndex(index)

    def ready(*_args) -> None:
        if _ready_to_correct(viewer, adapt):
            adapt.state.events.status.disconnect(ready)

    adapt.state.events.status.connect(ready)
    if run:
        adapt.run()
    return adapt


def _ready_to_correct(viewer, adapt) -> bool:
    """When the first run has ended: the *after* segmentation selected, with the brush (True
    once done)."""
    from napari.utils.notifications import show_info

    from .layers import after_segmentation

    layer = after_segmentation(viewer)
    current = adapt.state.rounds.current
    if adapt.state.running or layer is None or current is None or current.number != 0:
        return False
    viewer.layers.selection.active = layer
    layer.mode = "paint"
    index = adapt.method_combo.findData(ROUND_METHOD)
    if index >= 0:
        adapt.method_combo.setCurrentIndex(index)
    show_info(NEXT_STEP)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="tent", help="method of the first run (tent)")
    parser.add_argument("--no-run", action="store_true", help="open only; do not press Run")
    args = parser.parse_args(argv)
    import napari

    viewer = napari.Viewer(title="napari-uda demo: correct, then adapt")
    open_demo(viewer, method=args.method, run=not args.no_run)
    napari.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
