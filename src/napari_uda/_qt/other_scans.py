"""*Apply to other scans*: the current round's model segments the other open images (the next
scans from the same scanner), each checked against the loaded (source) model.

Both models predict every other 3D image layer in a napari thread worker (never on the GUI
thread); :func:`~napari_uda.adaptation.rounds.check_other_scans` gates the two models on each
scan with the end-of-run gate's label-free signals and rules. Each scan gets a new labels layer
``<scan>: segmentation (round N)`` placed on it; where the adapted model may be worse there (or
its mask needs checking), a napari warning names the scan and why.
"""

from __future__ import annotations

from napari.layers import Image
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info, show_warning

from .layers import RESULT_LAYERS, layer_volume, show_labels
from .runner import readable


def applied_layer_name(scan: str, round_number: int) -> str:
    """The name of the layer the adapted model's mask of ``scan`` gets."""
    return f"{scan}: segmentation (round {round_number})"


def _check(adapted, source, volumes, device):
    """Worker: the checks, or one readable line."""
    from ..adaptation.rounds import check_other_scans

    try:
        return check_other_scans(adapted, source, volumes, device=device)
    except Exception as error:  # reported to the user as one line
        return readable(error)


class OtherScans:
    """Runs *Apply to other scans* for the Adapt widget (one at a time)."""

    def __init__(self, viewer, state, on_change=None):
        self.viewer = viewer
        self.state = state
        self.worker = None
        #: called when a check starts and when it ends (the Adapt widget's buttons)
        self.on_change = on_change or (lambda: None)

    def scans(self) -> list[Image]:
        """The other open 3D image layers (not the target, not result layers)."""
        return [
            layer
            for layer in self.viewer.layers
            if isinstance(layer, Image)
            and layer.ndim == 3
            and layer.rgb is False
            and layer.name not in RESULT_LAYERS
            and layer.name != self.state.target_layer
        ]

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(self):
        """Segment and check every other scan in a worker (returned for tests)."""
        current = self.state.rounds.current
        if current is None or self.state.model is None or self.busy:
            return None
        scans = self.scans()
        if not scans:
            show_error("Open another scan from the same scanner first (File > Open).")
            return None
        try:
            volumes = [layer_volume(layer) for layer in scans]
        except ValueError as error:
            show_error(f"Cannot apply to other scans: {error}")
            return None
        names, number = [layer.name for layer in scans], current.number
        args = (current.result.model, self.state.model, volumes, self.state.device_in_use)
        self.worker = create_worker(_check, *args, _start_thread=False)
        self.worker.returned.connect(lambda outcome: self._show(outcome, names, number))
        self.worker.finished.connect(self._finished)
        self.worker.start()
        self.on_change()
        return self.worker

    def _finished(self) -> None:
        self.worker = None
        self.on_change()

    def _show(self, outcome, names: list[str], number: int) -> None:
        """One layer per scan; a warning per scan where the adapted model may be worse."""
        if isinstance(outcome, str):
            show_error(f"Apply to other scans failed: {outcome}")
            return
        for name, check in zip(names, outcome):
            if name not in self.viewer.layers:  # closed meanwhile
                continue
            scan = self.viewer.layers[name]
            show_labels(
                self.viewer, applied_layer_name(name, number), check.prediction.labels, scan
            )
            if check.warning:
                show_warning(f"{name}: {check.warning}")
        fine = [n for n, c in zip(names, outcome) if not c.warning]
        if fine:
            show_info(
                f"Round {number}'s model segmented {', '.join(fine)}; the gate keeps it "
                "there against the loaded model (no warning)."
            )
