"""Screenshots of the napari-uda widgets and of a before/after comparison, for the docs.

Opens the shipped demo (new-scanner head, its reference mask, the demo model) in napari, runs
one adaptation from the Adapt widget exactly as a user would, and saves into
``docs/screenshots/``:

* ``model_widget.png``, ``adapt_widget.png``, ``qa_widget.png``, ``export_widget.png``: each
  dock widget after the run;
* ``before_after.png``: the same axial slice before and after adaptation (the segmentation
  filled over the scan with the reference mask outlined in cyan, and the entropy maps on the
  same fixed [0, 1] scale);
* ``window.png``: the whole napari window with the Adapt widget;
* ``corrections_widget.png`` and ``corrections_window.png``: then three axial slices of
  ``segmentation (after)`` corrected (to the reference, through the layer's editing API) and
  one round of *Adapt with corrections*: the Adapt widget with the list of corrected slices and
  the round, and the whole window;
* ``adapt_rolled_back.png`` and ``adapt_overruled.png``: then a run the keep-or-roll-back gate
  rolls back (TENT, one epoch, with an expected brain volume of 1000-1300 ml that TENT's mask
  leaves): the Adapt widget with its *Use the adapted result anyway* button, and after the
  button (``--overrule-only`` takes only these two; it prints the window's size, which must
  stay within the screen).

Needs a display; run under Xvfb::

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshots.py
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "screenshots"
WINDOW = (1500, 980)
DOCK_WIDTH = 540


def settle(app, seconds: float = 0.5) -> None:
    """Let Qt draw, and close notification toasts so they cover nothing."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        app.processEvents()
        time.sleep(0.01)
    for widget in app.allWidgets():
        if type(widget).__name__ == "NapariQtNotification" and widget.isVisible():
            widget.close()
    app.processEvents()


def save_trimmed(pixmap, path: Path, margin: int = 10) -> None:
    """Save a widget grab without the empty dock background below its content."""
    image = pixmap.toImage()
    background = image.pixel(image.width() // 2, image.height() - 2)
    last = image.height() - 1
    while last > 0 and all(image.pixel(x, last) == background for x in range(0, image.width(), 4)):
        last -= 1
    pixmap.copy(0, 0, pixmap.width(), min(pixmap.height(), last + margin)).save(str(path))


def canvas(viewer, visible: set[str]) -> np.ndarray:
    for layer in viewer.layers:
        layer.visible = layer.name in visible
    return viewer.screenshot(canvas_only=True, flash=False)


def crop_to_content(images: list[np.ndarray], margin: int = 12) -> list[np.ndarray]:
    """Crop every image to the union of their non-black pixels (plus a margin)."""
    content = np.any([image[..., :3].max(axis=-1) > 8 for image in images], axis=0)
    rows, columns = np.flatnonzero(content.any(axis=1)), np.flatnonzero(content.any(axis=0))
    if not len(rows):
        return images
    top, bottom = max(rows[0] - margin, 0), rows[-1] + margin + 1
    left, right = max(columns[0] - margin, 0), columns[-1] + margin + 1
    return [image[top:bottom, left:right] for image in images]


def compose(panels: list[tuple[str, np.ndarray]], path: Path, columns: int = 2) -> None:
    """Tile the panels (cropped alike) with a title above each and save as PNG."""
    from PIL import Image, ImageDraw, ImageFont

    images = crop_to_content([image for _, image in panels])
    panels = [(caption, image) for (caption, _), image in zip(panels, images)]
    height, width = panels[0][1].shape[:2]
    title = 34
    rows = -(-len(panels) // columns)
    sheet = Image.new("RGB", (columns * width, rows * (height + title)), (35, 36, 43))
    draw = ImageDraw.Draw(sheet)
    try:
        font = ImageFont.truetype("DejaVuSans.ttf", 20)
    except OSError:
        font = ImageFont.load_default()
    for index, (caption, image) in enumerate(panels):
        x, y = (index % columns) * width, (index // columns) * (height + title)
        sheet.paste(Image.fromarray(image[..., :3]), (x, y + title))
        draw.text((x + 10, y + 6), caption, fill=(240, 241, 242), font=font)
    sheet.save(path)


def worst_slices(after: np.ndarray, reference: np.ndarray, axis: int, count: int) -> list[int]:
    """The ``count`` slices along ``axis`` with the most wrong voxels, at least 4 apart."""
    others = tuple(a for a in range(after.ndim) if a != axis)
    wrong = (after != reference).sum(axis=others)
    chosen: list[int] = []
    for index in np.argsort(-wrong, kind="stable"):
        if wrong[index] and all(abs(int(index) - c) >= 4 for c in chosen):
            chosen.append(int(index))
        if len(chosen) == count:
            break
    return sorted(chosen)


def correct_slices(viewer, app, reference: np.ndarray, count: int = 3) -> list[int]:
    """Correct the worst axial slices of 'segmentation (after)' to the reference, through the
    layer's editing API (one undoable edit per slice, as napari's label tools make)."""
    from napari_uda._qt.layers import go_to_slice, stepping_axis

    after = viewer.layers["segmentation (after)"]
    axis = stepping_axis(viewer)
    chosen = worst_slices(np.asarray(after.data), reference, axis, count)
    for index in chosen:
        go_to_slice(viewer, after, axis, index)
        key = [slice(None)] * 3
        key[axis] = index
        wrong = list(np.nonzero(after.data[tuple(key)] != reference[tuple(key)]))
        wrong.insert(axis, np.full(len(wrong[0]), index))
        after.data_setitem(tuple(wrong), reference[tuple(wrong)])
        settle(app, 0.3)
    return chosen


def corrections_views(viewer, adapt, dock, app, out: Path) -> str:
    """Correct three slices, run one round of Adapt with corrections (Corrections only), and
    save the Adapt widget (the corrected slices, the round) and the window."""
    reference = np.asarray(viewer.layers["brain mask (new scanner)"].data)
    for layer in viewer.layers:
        layer.visible = layer.name in ("head (new scanner)", "segmentation (after)")
    chosen = correct_slices(viewer, app, reference)
    summary = f"corrected axial slices {chosen}"
    adapt.method_combo.setCurrentIndex(adapt.method_combo.findData("corrections"))
    adapt.corrections.adapt_button.click()
    while adapt.state.running or adapt.runner.running:
        app.processEvents()
        time.sleep(0.01)
    summary += f"; {adapt.status.text()}"
    adapt.tabs.setCurrentWidget(adapt.corrections)  # the round ends on its plots
    adapt.corrections.list.item(0).setSelected(True)
    adapt.corrections.go_button.click()
    dock.raise_()
    settle(app, 1.0)
    save_trimmed(dock.grab(), out / "corrections_widget.png")
    viewer.window._qt_window.grab().save(str(out / "corrections_window.png"))
    return summary


def overrule_views(viewer, adapt, dock, app, out: Path) -> str:
    """A run the gate rolls back (an expected volume the adapted mask leaves), then the user
    keeps the adapted result anyway: save the Adapt widget before and after."""
    adapt.state.corrections.clear()  # a new run, without the corrected slices of a round
    adapt.corrections.show_slices()
    for layer in viewer.layers:
        layer.visible = layer.name in ("head (new scanner)", "segmentation (after)")
    adapt.method_combo.setCurrentIndex(adapt.method_combo.findData("tent"))
    adapt.form.set_values({"epochs": 1, "batch_size": 32})
    adapt.expected_volume.value = "brain=1000:1300"  # the unadapted brain: about 1070 ml
    adapt.run_button.click()
    while adapt.state.running or adapt.runner.running:
        app.processEvents()
        time.sleep(0.01)
    if adapt.overrule_button.isHidden():
        return f"the gate did not roll back, no overrule screenshots: {adapt.status.text()}"
    dock.raise_()
    settle(app, 1.0)
    save_trimmed(dock.grab(), out / "adapt_rolled_back.png")
    rolled_back = adapt.status.text()
    adapt.overrule_button.click()
    settle(app, 1.0)
    save_trimmed(dock.grab(), out / "adapt_overruled.png")
    window = viewer.window._qt_window
    return (
        f"rolled back: {rolled_back}\noverruled: {adapt.status.text()}\n"
        f"window {window.width()}x{window.height()} px"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--method", default="tent", help="method to run (default tent)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model", help="model bundle (default: the demo model)")
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--overrule-only", action="store_true", help="only the gate overrule")
    args = parser.parse_args(argv)

    import napari
    from qtpy.QtWidgets import QApplication

    from napari_uda._qt.adapt_widget import AdaptWidget
    from napari_uda._qt.export_widget import ExportWidget
    from napari_uda._qt.layers import axial_view
    from napari_uda._qt.model_widget import ModelWidget
    from napari_uda._qt.qa_widget import QAWidget
    from napari_uda.settings import apply_overrides

    args.out.mkdir(parents=True, exist_ok=True)
    viewer = napari.Viewer(show=True, title="napari-uda")
    viewer.window._qt_window.resize(*WINDOW)
    app = QApplication.instance()
    widgets = {
        "Model": ModelWidget(viewer),
        "Adapt": AdaptWidget(viewer),
        "QA": QAWidget(viewer),
        "Export": ExportWidget(viewer),
    }
    docks = {
        name: viewer.window.add_dock_widget(widget, name=name, area="right", tabify=True)
        for name, widget in widgets.items()
    }
    from qtpy.QtCore import Qt

    viewer.window._qt_window.resizeDocks([docks["Model"]], [DOCK_WIDTH], Qt.Orientation.Horizontal)
    viewer.open_sample("napari-uda", "target_head")
    viewer.open_sample("napari-uda", "target_mask")
    if args.model:
        widgets["Model"].load_path(args.model)
    else:
        widgets["Model"].demo_button.click()
    target = viewer.layers["head (new scanner)"]
    axial_view(viewer, target)

    adapt = widgets["Adapt"]
    if args.overrule_only:
        adapt.reference.value = viewer.layers["brain mask (new scanner)"]
        print(overrule_views(viewer, adapt, docks["Adapt"], app, args.out))
        viewer.close()
        return 0
    adapt.method_combo.setCurrentIndex(adapt.method_combo.findData(args.method))
    if args.set:
        method = adapt.methods[args.method]
        chosen = apply_overrides(method.Settings(**adapt.form.values()), args.set)
        adapt.form.set_values(vars(chosen))
    adapt.reference.value = viewer.layers["brain mask (new scanner)"]
    adapt.preview_every.value = 5
    docks["Adapt"].raise_()
    adapt.run_button.click()
    while adapt.state.running:
        app.processEvents()
        time.sleep(0.01)
    result = adapt.state.result
    if result is None:
        print(f"the run failed: {adapt.status.text()}", file=sys.stderr)
        return 1
    settle(app, 1.0)

    for name, dock in docks.items():
        dock.raise_()
        settle(app)
        save_trimmed(dock.grab(), args.out / f"{name.lower()}_widget.png")
        if name == "Adapt":
            viewer.layers["brain mask (new scanner)"].visible = False
            viewer.reset_view()
            settle(app)
            viewer.window._qt_window.grab().save(str(args.out / "window.png"))

    from napari.utils.colormaps import DirectLabelColormap

    reference = viewer.layers["brain mask (new scanner)"]
    viewer.layers.move(viewer.layers.index(reference), len(viewer.layers))  # outline on top
    reference.contour, reference.opacity = 1, 1.0
    reference.colormap = DirectLabelColormap(
        color_dict={None: "transparent", 0: "transparent", 1: "cyan"}
    )
    dice = (
        (result.reference_dice_before or [np.nan])[-1],
        (result.reference_dice_after or [np.nan])[-1],
    )
    image, ref = target.name, reference.name
    panels = [
        (f"before: Dice {dice[0]:.3f} (cyan: reference mask)",
         canvas(viewer, {image, "segmentation (before)", ref})),
        (f"after {result.method}: Dice {dice[1]:.3f}",
         canvas(viewer, {image, "segmentation (after)", ref})),
        (f"entropy before: mean {result.initial_prediction.entropy.mean():.3f}",
         canvas(viewer, {"entropy (before)"})),
        (f"entropy after: mean {result.prediction.entropy.mean():.3f}",
         canvas(viewer, {"entropy (after)"})),
    ]  # fmt: skip
    compose(panels, args.out / "before_after.png")
    for layer in viewer.layers:
        layer.visible = layer.name in (image, "segmentation (after)")
    print(f"screenshots in {args.out}; {result.method}: {result.stop_reason}, Dice "
          f"{dice[0]:.3f} -> {dice[1]:.3f}")  # fmt: skip
    print(corrections_views(viewer, adapt, docks["Adapt"], app, args.out))
    print(overrule_views(viewer, adapt, docks["Adapt"], app, args.out))
    viewer.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
