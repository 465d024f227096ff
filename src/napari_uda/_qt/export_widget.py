"""The *Export* dock widget: save the adapted mask (and optionally the entropy map) as NIfTI on
the scan's grid, the adapted model (a new bundle, or a TorchScript file with its JSON spec, as
the model's kind says), and a JSON report plus a CSV history.

Every location is checked before anything is written; the files are then written in a thread
worker under staged names and moved into place together at the end, so an export appears whole
or not at all (:class:`~napari_uda.core.outputs.OutputSet`). An existing file is never replaced
unless "Replace existing files" is ticked, and the model's own input files and the scan never.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from magicgui.widgets import CheckBox, Container, FileEdit, LineEdit
from napari.qt.threading import create_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtWidgets import (
    QFileDialog,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from .._writer import write_image, write_labels
from ..adaptation.report import run_metrics, run_report, write_history_csv, write_json
from ..core.outputs import OutputError, OutputSet
from ..core.volume import Volume
from .folder_batch import FolderBatch, describe, folder_job
from .layers import ENTROPY_AFTER, SEGMENTATION_AFTER, layer_meta
from .runner import readable
from .state import get_state

#: What can be exported: key -> (check box label, file name suffixes). The model's suffix is
#: the adapted model's own (:attr:`ModelAdapter.save_suffix`); this one is for bundles.
OUTPUTS = {
    "mask": ("Adapted mask", ("_mask.nii.gz",)),
    "entropy": ("Entropy map", ("_entropy.nii.gz",)),
    "model": ("Adapted model", ("_model.safetensors",)),
    "report": ("Report", ("_report.json", "_history.csv")),
}
MODEL_STEM = "_model"


def default_folder(source_path: str | None) -> Path:
    """The scan's folder if it is writable and not inside the installed package, else
    ``~/napari-uda``."""
    package = Path(__file__).resolve().parents[1]
    if source_path:
        folder = Path(source_path).resolve().parent
        if package not in folder.parents and folder != package and os.access(folder, os.W_OK):
            return folder
    return Path.home() / "napari-uda"


class ExportWidget(QWidget):
    """Write the last run's outputs; nothing is overwritten silently."""

    def __init__(self, napari_viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = napari_viewer
        self.state = get_state(napari_viewer)
        self.worker = None

        self.folder = FileEdit(mode="d", label="Folder", value=Path.home() / "napari-uda")
        self.stem = LineEdit(label="Name", value="adapted", tooltip="File names start with this")
        self.checks = {
            key: CheckBox(text=label, value=key != "entropy", name=key)
            for key, (label, _) in OUTPUTS.items()
        }
        self.replace = CheckBox(
            text="Replace existing files",
            value=False,
            tooltip="Off: exporting stops if a file already exists",
        )
        self.form = Container(widgets=[self.folder, self.stem, *self.checks.values(), self.replace])
        self.form.changed.connect(self._show_plan)
        self.export_button = QPushButton("Export")
        self.export_button.clicked.connect(self.export)
        self.plan = QLabel()
        self.plan.setWordWrap(True)
        self.batch, self.batch_button = None, QPushButton("Apply to folder...")
        self.batch_button.setToolTip(
            "Apply the last run's method and settings to every scan of a folder, in the "
            "background (napari-uda batch; results and report in <Folder>/<Name>_batch)"
        )
        self.batch_button.clicked.connect(lambda: self.apply_to_folder())
        self.batch_status, self.batch_bar = QLabel(), QProgressBar()
        self.batch_status.setWordWrap(True)
        self.batch_bar.setVisible(False)

        layout = QVBoxLayout(self)
        layout.addWidget(self.form.native)
        layout.addWidget(self.export_button)
        layout.addWidget(self.plan)
        layout.addWidget(self.batch_button)
        layout.addWidget(self.batch_bar)
        layout.addWidget(self.batch_status)
        layout.addStretch(1)

        self.state.events.result.connect(self._new_result)
        self.state.events.status.connect(self._update_button)
        self._new_result(self.state.result)

    # -- planning -----------------------------------------------------------------------------
    def _new_result(self, result) -> None:
        if result is not None:
            target = self._layer(self.state.target_layer)
            source = target.metadata.get("source_path") if target is not None else None
            self.folder.value = default_folder(source)
            name = (self.state.target_layer or "scan").replace(" ", "_").strip("()")
            self.stem.value = f"{name}_{result.method}".replace("(", "").replace(")", "")
        self._describe_model(result)
        self._update_button()
        self._show_plan()

    def _describe_model(self, result) -> None:
        """The model check box says what will be written, or why nothing can be."""
        check = self.checks["model"]
        model = result.model if result is not None else None
        if model is None:
            check.text, check.tooltip, check.enabled = OUTPUTS["model"][0], "", True
        elif model.can_save:
            check.text = f"{OUTPUTS['model'][0]}: {model.save_description or model.save_suffix}"
            check.tooltip, check.enabled = "", True
        else:
            check.text = f"{OUTPUTS['model'][0]} (this kind of model cannot be saved)"
            check.tooltip = f"a {type(model).__name__} model has no way to be saved"
            check.value, check.enabled = False, False

    def _update_button(self, *_args) -> None:
        ready = self.state.result is not None and not self.state.running
        self.export_button.setEnabled(ready)
        self.export_button.setToolTip("" if ready else "Run an adaptation first")
        self.batch_button.setEnabled(ready or self.batch is not None)

    def planned_files(self) -> dict[str, list[Path]]:
        """The files each ticked output would write."""
        folder, stem = Path(self.folder.value), self.stem.value.strip() or "adapted"
        plan = {
            key: [folder / f"{stem}{suffix}" for suffix in OUTPUTS[key][1]]
            for key, check in self.checks.items()
            if check.value
        }
        model = self.state.result.model if self.state.result is not None else None
        if "model" in plan and model is not None:
            if model.can_save:  # the model's own kind: .safetensors, or .pt + .json
                plan["model"] = model.saved_files(folder / f"{stem}{MODEL_STEM}{model.save_suffix}")
            else:
                del plan["model"]
        return plan

    def _show_plan(self, *_args) -> None:
        if self.state.result is None:
            self.plan.setText("Nothing to export yet: run an adaptation first.")
            return
        names = [path.name for paths in self.planned_files().values() for path in paths]
        self.plan.setText("Will write: " + (", ".join(names) or "nothing (tick an output)"))

    def _layer(self, name: str | None):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    # -- a whole folder ---------------------------------------------------------------------
    def apply_to_folder(self, scans: str | Path | None = None):
        """Start a batch of the last run over a folder of scans (asked for when ``scans`` is
        None), or stop the running one. Returns the :class:`FolderBatch` (for tests)."""
        if self.batch is not None:
            self.batch.stop()
            self.batch_status.setText("Stopping: cancelling the scans not yet finished…")
            return self.batch
        start = str(self.folder.value)
        scans = scans or QFileDialog.getExistingDirectory(self, "Folder of scans", start)
        if not scans or self.state.result is None:
            return None
        out = Path(self.folder.value) / f"{self.stem.value.strip() or 'adapted'}_batch"
        try:
            job = folder_job(self.state.result, self.state.model_source, Path(scans), out, "auto")
        except ValueError as error:
            show_error(f"Batch not started: {error}")
            return None
        self.batch = FolderBatch(job, Path(scans))
        self.batch.progress.connect(self._batch_progress)
        self.batch.start(self._batch_done, self._batch_failed)
        self.batch_button.setText("Stop batch")
        self.batch_bar.setRange(0, 0)  # busy until the first count arrives
        self.batch_bar.setVisible(True)
        self.batch_status.setText(f"Batch: starting {self.batch.workers} worker process(es)…")
        return self.batch

    def _batch_progress(self, progress) -> None:
        self.batch_bar.setRange(0, progress.total)
        self.batch_bar.setValue(progress.finished)
        self.batch_status.setText(describe(progress))

    def _batch_done(self, outcome) -> None:
        summary = describe(outcome.progress) + (" (stopped)" if outcome.progress.stopped else "")
        self._batch_ended(f"{summary}. Report: {outcome.report.get('html')}", show_info)

    def _batch_failed(self, error: Exception) -> None:
        self._batch_ended(f"Batch failed: {readable(error)}", show_error)

    def _batch_ended(self, message: str, notify) -> None:
        self.batch = None
        self.batch_button.setText("Apply to folder...")
        self.batch_bar.setVisible(False)
        self._update_button()
        self.batch_status.setText(message)
        notify(message)

    # -- writing ------------------------------------------------------------------------------
    def export(self):
        """Check the plan, then write in a thread worker (returned for tests)."""
        result = self.state.result
        plan = self.planned_files()
        if result is None or not plan:
            return None
        if "model" in plan:
            try:  # the model's own files are never replaced, whatever the check box says
                result.model.check_save_path(plan["model"][0])
            except ValueError as error:
                return self._refuse(f"Not exported: {error}")
        existing = [p.name for paths in plan.values() for p in paths if p.exists()]
        if existing and not self.replace.value:
            return self._refuse(
                f"Not exported: {', '.join(existing)} already exist(s) in "
                f"{self.folder.value}. Choose another name or tick 'Replace existing "
                "files'."
            )
        outputs = self._check_locations(result, plan)
        if outputs is None:
            return None
        jobs = self._jobs(result, plan, outputs.staged)
        self.export_button.setEnabled(False)
        self.plan.setText("Exporting…")
        self.worker = create_worker(_run_jobs, jobs, outputs, _start_thread=False)
        self.worker.returned.connect(self._done)
        self.worker.start()
        return self.worker

    def _check_locations(self, result, plan: dict[str, list[Path]]) -> OutputSet | None:
        """Every planned file registered (and its folder proved writable) before any work;
        ``None`` after telling the user why not."""
        target = self._layer(self.state.target_layer)
        scan = target.metadata.get("source_path") if target is not None else None
        outputs = OutputSet(
            overwrite=self.replace.value, protected=[*result.model.input_files(), scan]
        )
        try:
            for paths in plan.values():
                for path in paths:
                    outputs.add(path, path.name)
        except OutputError as error:
            outputs.discard()
            return self._refuse(f"Not exported: {error}")
        return outputs

    def _refuse(self, message: str) -> None:
        """Say why nothing was exported: a notification, and under the button (it stays)."""
        show_error(message)
        self.plan.setText(message)

    def _jobs(self, result, plan: dict[str, list[Path]], staged=Path) -> list[tuple]:
        """The writes, each to ``staged(path)`` (default the path itself)."""
        plan = {key: [staged(path) for path in paths] for key, paths in plan.items()}
        target = self._layer(self.state.target_layer)
        meta = layer_meta(target) if target is not None else {"metadata": {}}
        source: Volume = result.prediction.source
        meta["metadata"].setdefault("affine", source.affine)
        meta["metadata"].setdefault("nifti_header", source.header)
        jobs = []
        if "mask" in plan:
            layer = self._layer(SEGMENTATION_AFTER)
            labels = (
                layer.data
                if layer is not None and layer.data.shape == source.shape
                else result.prediction.labels
            )
            jobs.append((write_labels, str(plan["mask"][0]), np.array(labels), meta))
        if "entropy" in plan:
            layer = self._layer(ENTROPY_AFTER)
            entropy = (
                layer.data
                if layer is not None and layer.data.shape == source.shape
                else result.prediction.entropy
            )
            jobs.append((write_image, str(plan["entropy"][0]), np.array(entropy), meta))
        if "model" in plan:
            jobs.append((_save_model, plan["model"][0], result, self.state.model_source))
        if "report" in plan:
            reference = self._layer(self.state.reference_layer)
            ref = np.asarray(reference.data) if reference is not None else None
            if ref is not None and ref.shape != source.shape:
                ref = None
            inputs = {
                "model": self.state.model_source,
                "target_layer": self.state.target_layer,
                "target_path": meta["metadata"].get("source_path"),
                "reference_layer": self.state.reference_layer if ref is not None else None,
                "class_names": list(result.model.class_names),
                "spacing_mm": list(source.spacing),
                "run": self.state.run_info,
            }
            corrections = self._corrections(target)
            jobs.append(
                (_save_report, plan["report"], result, inputs, source.spacing, ref, corrections)
            )
        return jobs

    def _corrections(self, target) -> dict | None:
        """The corrected slices and the rounds, for the report (None: no round, no slice)."""
        rounds, slices = self.state.rounds, self.state.corrections
        if len(rounds) < 2 and not len(slices):
            return None
        axcodes = target.metadata.get("axcodes") if target is not None else None
        return {"slices": slices.describe(axcodes), "rounds": rounds.report(axcodes)}

    def _done(self, outcome: tuple[list[str], str | None]) -> None:
        written, error = outcome
        self._update_button()
        names = ", ".join(Path(p).name for p in written)
        if error:
            show_error(f"Export failed, nothing was written: {error}")
            self.plan.setText(f"Export failed, nothing was written: {error}")
            return
        show_info(f"Exported to {self.folder.value}: {names}")
        self.plan.setText(f"Exported to {self.folder.value}: {names}")


def _save_model(path: Path, result, model_source: str) -> list[str]:
    """The adapted model in its own kind (a bundle, or TorchScript + JSON spec), its
    provenance saying what was adapted and, for a gated run, what the gate kept."""
    update = {
        "adapted": {
            "method": result.method,
            "settings": result.settings,
            "from": model_source,
            "checkpoint_step": result.checkpoint.step,
        }
    }
    if result.gate is not None:  # rolled back (the unadapted weights), or overruled: say so
        update["adapted"]["gate"] = {"kept": result.gate.keep, "summary": result.gate.summary}
    result.model.save(path, provenance=_plain(update))
    return [str(p) for p in result.model.saved_files(path)]


def _plain(value):
    """Settings and provenance as plain JSON values (numpy scalars become numbers)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return value.item()
    return value


def _save_report(paths, result, inputs, spacing, reference, corrections=None) -> list[str]:
    metrics = run_metrics(result, list(result.model.class_names), spacing, reference)
    report = run_report(result, inputs=inputs, metrics=metrics, corrections=corrections)
    return [str(write_json(report, paths[0])), str(write_history_csv(result.history, paths[1]))]


def _run_jobs(jobs: list[tuple], outputs: OutputSet) -> tuple[list[str], str | None]:
    """Run the writes to staged names (in a worker), then move all into place; at the first
    error nothing is moved and the error is returned as one line."""
    with outputs:
        try:
            for function, *args in jobs:
                function(*args)
            return [str(path) for path in outputs.commit()], None
        except Exception as error:  # reported to the user as one line
            message = readable(error)
            for path in outputs.paths:  # name the file the user asked for, not the staged one
                message = message.replace(str(outputs.staged(path)), str(path))
            return [], message
