"""Screenshot of the *Model* widget with a given model open (an nnU-Net v2 folder, a MONAI
bundle, any model ``load_model`` opens), for the docs.

Needs a display; run under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_model_widget.py \
        --model path/to/Dataset123_X/nnUNetTrainer__nnUNetPlans__3d_fullres \
        --out docs/screenshots/model_widget_nnunet.png
"""

from __future__ import annotations

import argparse
from pathlib import Path

from screenshots import DOCK_WIDTH, WINDOW, save_trimmed, settle


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="model path (or name) to open")
    parser.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtCore import Qt
    from qtpy.QtWidgets import QApplication

    from napari_uda._qt.model_widget import ModelWidget

    viewer = napari.Viewer(show=True, title="napari-uda")
    viewer.window._qt_window.resize(*WINDOW)
    app = QApplication.instance()
    widget = ModelWidget(viewer)
    dock = viewer.window.add_dock_widget(widget, name="Model", area="right")
    viewer.window._qt_window.resizeDocks([dock], [DOCK_WIDTH], Qt.Orientation.Horizontal)
    if not widget.load_path(args.model):
        return 1
    settle(app, 1.0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_trimmed(dock.grab(), args.out)
    viewer.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
