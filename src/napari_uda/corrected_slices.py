"""Which slices of a segmentation the user has corrected (no Qt: the napari widgets drive it).

After a run the user corrects the *after* segmentation on a few slices with napari's label tools.
A slice the user edited counts as *checked*: the whole slice, as the user left it, becomes the
truth there (not only the voxels painted). :class:`CorrectedSlices` keeps that list:

* each slice is a :class:`SliceRef`: an array axis (the axis the user was stepping through when
  painting) and an index along it; slices on several axes may be mixed;
* :meth:`CorrectedSlices.edited` takes the *touched* slices of an edit (from napari's ``paint``
  event: :func:`touched_slices`) and keeps those whose content now differs from the *baseline*
  (the segmentation as the last run showed it). :meth:`CorrectedSlices.recheck` compares every
  slice touched since the baseline again, so napari's undo and redo (which emit no ``paint``
  event) take a slice out of the list and put it back;
* :meth:`CorrectedSlices.mark` marks a slice explicitly (the user checked it and it needs no
  change); :meth:`CorrectedSlices.unmark` takes one out (it stays out until painted again);
* :meth:`CorrectedSlices.corrections` is the labels volume the engine trains on:
  :data:`NOT_CORRECTED` (-1) everywhere except the corrected slices, which hold the user's labels
  (:func:`~napari_uda.adaptation.rounds.keep_corrections` writes them back into every new
  segmentation, so the corrected slices always stay exactly as the user made them);
* :meth:`CorrectedSlices.rebase` starts from a new baseline after a round: the slices stay
  corrected (they were used) and only leave the list when un-marked;
* :class:`Rounds` keeps the first run and each round of Adapt with corrections, with the state
  each round started from, so that going back restores it.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .core.corrections import NOT_CORRECTED

#: Anatomical plane of the slices taken along an axis, by the axis's orientation code.
PLANES = {
    "S": "axial",
    "I": "axial",
    "A": "coronal",
    "P": "coronal",
    "L": "sagittal",
    "R": "sagittal",
}

#: How a slice came into the list.
EDITED, MARKED, KEPT = "edited", "marked", "kept"


def plane_name(axis: int, axcodes: str | Sequence[str] | None = None) -> str:
    """``"axial"``, ``"coronal"`` or ``"sagittal"`` for array ``axis`` of a scan with
    orientation codes ``axcodes`` (e.g. ``"LAS"``), else ``"axis <n>"``."""
    if axcodes and len(axcodes) > axis:
        plane = PLANES.get(str(axcodes[axis]).upper())
        if plane:
            return plane
    return f"axis {axis}"


@dataclass(frozen=True, order=True)
class SliceRef:
    """Slice ``index`` along array ``axis``."""

    axis: int
    index: int

    def key(self, ndim: int) -> tuple:
        """The index expression of this slice in an ``ndim``-dimensional array."""
        key: list[Any] = [slice(None)] * ndim
        key[self.axis] = self.index
        return tuple(key)


def _atom_ranges(atom, shape: Sequence[int]) -> list[tuple[int, int]] | None:
    """Inclusive (first, last) index per axis that one napari history atom changed."""
    slice_key = getattr(atom, "slice_key", None)
    if slice_key is not None:  # napari's mask-based atom: a bounding box of slices
        ranges = []
        for size, part in zip(shape, slice_key):
            start, stop, _ = part.indices(size) if isinstance(part, slice) else (part, part + 1, 1)
            ranges.append((int(start), int(stop) - 1))
        return ranges
    indices = atom[0] if isinstance(atom, (tuple, list)) and atom else None
    if indices is None or len(indices) != len(shape):
        return None
    arrays = [np.asarray(ix).ravel() for ix in indices]
    if not arrays or arrays[0].size == 0:
        return None
    return [(int(a.min()), int(a.max())) for a in arrays]


def touched_slices(atoms: Iterable, shape: Sequence[int], view_axis: int | None) -> set[SliceRef]:
    """The slices an edit touched, from the atoms of a napari Labels ``paint`` event.

    ``view_axis`` is the array axis the viewer steps through (the slices the user sees); an
    edit made in a 2D view touches one slice along it, a 3D brush several. Without a view axis
    (a 3D view) the axis along which the edit is thinnest is taken.
    """
    touched: set[SliceRef] = set()
    for atom in atoms:
        ranges = _atom_ranges(atom, shape)
        if ranges is None:
            continue
        axis = view_axis
        if axis is None or not 0 <= axis < len(shape):
            axis = int(np.argmin([last - first for first, last in ranges]))
        first, last = ranges[axis]
        touched.update(SliceRef(axis, index) for index in range(first, last + 1))
    return touched


@dataclass
class CorrectedSlices:
    """The corrected slices of one segmentation (see the module docstring).

    Attributes:
        baseline: the segmentation as the last run showed it (a copy), or None before a run.
        origins: each corrected slice and how it came in (``edited``, ``marked`` or ``kept``:
            used in an earlier round).
        touched: slices edited since the baseline, compared again by :meth:`recheck`.
        dismissed: slices the user un-marked (not re-added until painted again).
    """

    baseline: np.ndarray | None = None
    origins: dict[SliceRef, str] = field(default_factory=dict)
    touched: set[SliceRef] = field(default_factory=set)
    dismissed: set[SliceRef] = field(default_factory=set)

    # -- the list -------------------------------------------------------------------------------
    @property
    def slices(self) -> list[SliceRef]:
        """The corrected slices, by axis then index."""
        return sorted(self.origins)

    def __len__(self) -> int:
        return len(self.origins)

    def __contains__(self, ref: object) -> bool:
        return ref in self.origins

    def mark(self, ref: SliceRef) -> None:
        """Count ``ref`` as corrected although it may be unchanged (the user checked it)."""
        self.dismissed.discard(ref)
        self.origins.setdefault(ref, MARKED)

    def unmark(self, ref: SliceRef) -> None:
        """``ref`` no longer counts (its labels stay as they are; a next run may change them)."""
        self.origins.pop(ref, None)
        self.dismissed.add(ref)

    def clear(self) -> None:
        self.origins.clear()
        self.touched.clear()
        self.dismissed.clear()

    # -- following edits ------------------------------------------------------------------------
    def reset(self, baseline: np.ndarray | None) -> None:
        """A new segmentation to correct: forget every slice; ``baseline`` is copied."""
        self.clear()
        self.baseline = None if baseline is None else np.array(baseline, copy=True)

    def rebase(self, baseline: np.ndarray) -> None:
        """After a round: compare later edits with ``baseline`` (copied); the corrected slices
        stay in the list (as ``kept``) until un-marked."""
        self.baseline = np.array(baseline, copy=True)
        self.origins = dict.fromkeys(self.origins, KEPT)
        self.touched.clear()

    def differs(self, labels: np.ndarray, ref: SliceRef) -> bool:
        """Whether slice ``ref`` of ``labels`` differs from the baseline (True without one)."""
        if self.baseline is None or self.baseline.shape != labels.shape:
            return True
        key = ref.key(labels.ndim)
        return not np.array_equal(np.asarray(labels[key]), self.baseline[key])

    def touch(self, refs: Iterable[SliceRef], shape: Sequence[int]) -> set[SliceRef]:
        """The user is editing slices ``refs`` (of a volume of ``shape``): they are compared
        from now on (napari announces an edit before it writes it); the ones inside."""
        refs = {ref for ref in refs if 0 <= ref.index < shape[ref.axis]}
        self.dismissed -= refs
        self.touched |= refs
        return refs

    def edited(self, labels: np.ndarray, refs: Iterable[SliceRef]) -> bool:
        """The user edited slices ``refs`` of ``labels``; True if the list changed."""
        return self.recheck(labels, self.touch(refs, labels.shape))

    def recheck(self, labels: np.ndarray, refs: Iterable[SliceRef] | None = None) -> bool:
        """Compare the touched slices (or ``refs``) with the baseline again: an edited slice
        that differs is in the list, one that no longer differs (undone) is not. Slices marked
        by hand or kept from a round stay. True if the list changed."""
        changed = False
        for ref in self.touched if refs is None else refs:
            if ref in self.dismissed:
                continue
            origin = self.origins.get(ref)
            differs = self.differs(labels, ref)
            if differs and origin is None:
                self.origins[ref] = EDITED
                changed = True
            elif not differs and origin == EDITED:
                del self.origins[ref]
                changed = True
        return changed

    # -- what the engine gets -------------------------------------------------------------------
    def mask(self, shape: Sequence[int]) -> np.ndarray:
        """Boolean volume: True on the corrected slices."""
        corrected = np.zeros(tuple(shape), dtype=bool)
        for ref in self.origins:
            corrected[ref.key(len(shape))] = True
        return corrected

    def corrections(self, labels: np.ndarray) -> np.ndarray:
        """int16 volume: the user's ``labels`` on the corrected slices, :data:`NOT_CORRECTED`
        elsewhere."""
        volume = np.full(labels.shape, NOT_CORRECTED, dtype=np.int16)
        for ref in self.origins:
            key = ref.key(labels.ndim)
            volume[key] = np.asarray(labels[key])
        return volume

    def snapshot(self) -> CorrectedSlices:
        """A deep copy (for going back to it)."""
        return copy.deepcopy(self)

    def describe(self, axcodes: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """JSON-able list of the corrected slices (for reports)."""
        return [
            {
                "axis": ref.axis,
                "plane": plane_name(ref.axis, axcodes),
                "index": ref.index,
                "how": self.origins[ref],
            }
            for ref in self.slices
        ]


# -- rounds ------------------------------------------------------------------------------------
def light_result(result: Any) -> Any:
    """``result`` (an ``AdaptationResult``) as an earlier round keeps it: its model, masks,
    entropy maps, history and report as they were, its class probabilities dropped (each
    prediction's ``probabilities`` becomes an empty ``(C, 0)`` array). The probabilities are
    most of a result's memory (two float32 maps per class of the scan, before and after) and
    going back to a round only shows its mask and entropy, exports them and continues from its
    model. What the gate rolled back is dropped (a later round started: the roll-back stands).
    Anything else is returned as it is."""
    from .adaptation.events import AdaptationResult
    from .core.inference import Prediction

    if not isinstance(result, AdaptationResult):
        return result
    light: dict[int, Prediction] = {}

    def without_probabilities(prediction: Prediction | None) -> Prediction | None:
        if prediction is None:
            return None
        if id(prediction) not in light:  # a result's lists share its predictions: keep that
            empty = np.empty((prediction.probabilities.shape[0], 0), dtype=np.float32)
            light[id(prediction)] = dataclasses.replace(prediction, probabilities=empty)
        return light[id(prediction)]

    return dataclasses.replace(
        result,
        prediction=without_probabilities(result.prediction),
        initial_prediction=without_probabilities(result.initial_prediction),
        predictions=[without_probabilities(p) for p in result.predictions],
        initial_predictions=[without_probabilities(p) for p in result.initial_predictions],
        rolled_back=None,  # the gate's roll-back can no longer be overruled
    )


@dataclass
class Round:
    """What the napari session keeps of one run besides
    :class:`~napari_uda.adaptation.rounds.RoundHistory`'s record of it.

    Attributes:
        number: 0 for the first run (no corrections), then 1, 2, ...
        result: the run's :class:`~napari_uda.adaptation.events.AdaptationResult` (its model is
            the model the next round starts from; its prediction's entropy is shown again on
            going back). Once a later round is added it is kept light (:func:`light_result`:
            no class probabilities), which is all going back and exporting need.
        info: the run's method, settings, seed and device (for reports).
        start_labels: the segmentation as it was when the round started (the user's edits in
            it), restored by going back.
        start_slices: the corrected slices when the round started, restored by going back.
    """

    number: int
    result: Any
    info: dict[str, Any] = field(default_factory=dict)
    start_labels: np.ndarray | None = None
    start_slices: CorrectedSlices | None = None


@dataclass
class Rounds:
    """The rounds of one scan in napari: the first run (round 0, whose model is the
    :class:`~napari_uda.adaptation.rounds.RoundHistory`'s base), then each Adapt with
    corrections, recorded in that history (weights, corrections, mask; its report) and here with
    the state it started from; going back drops the latest round from both."""

    rounds: list[Round] = field(default_factory=list)
    history: Any = None  # adaptation.rounds.RoundHistory, from the first run on

    def __len__(self) -> int:
        return len(self.rounds)

    @property
    def current(self) -> Round | None:
        return self.rounds[-1] if self.rounds else None

    def begin(self, result: Any, info: dict[str, Any]) -> Round:
        """A first run: the rounds start again from its result (round 0)."""
        from .adaptation.rounds import RoundHistory

        self.history = RoundHistory(result.model)
        self.rounds = [Round(0, result, dict(info))]
        return self.rounds[0]

    def add(
        self,
        result: Any,
        info: dict[str, Any],
        corrections: np.ndarray,
        start_labels: np.ndarray,
        start_slices: CorrectedSlices,
        reference: np.ndarray | None = None,
    ) -> Round:
        """A finished round that trained on ``corrections``, started from ``start_labels`` and
        ``start_slices`` (kept as given: pass copies)."""
        self.history.record(result, corrections, reference=reference)
        self.rounds[-1].result = light_result(self.rounds[-1].result)
        entry = Round(len(self.rounds), result, dict(info), start_labels, start_slices)
        self.rounds.append(entry)
        return entry

    def overruled(self, reference: np.ndarray | None = None) -> None:
        """The user kept the latest run's adapted model against the gate's roll-back (its
        result holds it now, :func:`~napari_uda.adaptation.gate.overrule_gate`): the history
        continues from that model. Round 0 becomes the history's base; a later round is
        recorded again with its corrections (``reference``: for its Dice in the report). (A
        round with corrections is not rolled back today: with corrections the gate only
        warns.)"""
        from .adaptation.rounds import RoundHistory

        current = self.current
        if current is None:
            return
        if current.number == 0:
            self.history = RoundHistory(current.result.model)
            return
        corrections = self.history.latest.corrections.dense()
        self.history.undo()
        self.history.record(current.result, corrections, reference=reference)

    def back(self) -> Round:
        """Drop the latest round (never round 0); the dropped round, whose ``start_*`` is the
        state to restore (the new :attr:`current` is the round whose model and result count)."""
        if len(self.rounds) < 2:
            raise IndexError("there is no round to go back from")
        self.history.undo()
        return self.rounds.pop()

    def report(self, axcodes: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
        """The first run, then the history's report of each round with its corrected slices."""
        if not self.rounds:
            return []
        first = self.rounds[0].result
        report = [
            {
                "round": 0,
                "method": first.method,
                "settings": self.rounds[0].info.get("settings", first.settings),
                "seconds": round(float(first.seconds), 2),
                "stop_reason": first.stop_reason,
                "gate": first.gate.summary if first.gate is not None else None,
            }
        ]
        for entry, summary in zip(self.rounds[1:], self.history.report()):
            slices = entry.start_slices.describe(axcodes) if entry.start_slices else []
            report.append({**summary, "corrected_slices": slices})
        return report
