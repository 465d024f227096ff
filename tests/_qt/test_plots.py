"""Live plots: which event values become points, and napari's theme colours."""

from __future__ import annotations

from napari.utils.theme import get_theme

from napari_uda._qt.plots import LivePlots
from napari_uda.adaptation.events import AdaptationEvent


def _event(step, *, evaluated=False, entropy=0.5, agreement=None, reference=None):
    return AdaptationEvent(
        step=step,
        total_steps=6,
        epoch=1 + (step - 1) // 3 if step else 0,
        losses={"total": 1.0 / step, "entropy": 0.1} if step else {},
        elapsed_seconds=float(step),
        mean_entropy=entropy,
        agreement_dice=agreement,
        reference_dice=reference,
        evaluated=evaluated,
    )


def test_points_follow_evaluations(qtbot):
    plots = LivePlots("dark")
    qtbot.addWidget(plots)
    events = [
        _event(0, evaluated=True, entropy=0.6, agreement=1.0, reference=[0.6]),  # unadapted
        _event(1, entropy=0.6, agreement=1.0, reference=[0.6]),
        _event(2, entropy=0.6, agreement=1.0, reference=[0.6]),
        _event(3, evaluated=True, entropy=0.4, agreement=0.9, reference=[0.7]),
        _event(4, entropy=0.4, agreement=0.9, reference=[0.7]),
        _event(5, entropy=0.4, agreement=0.85, reference=[0.7]),  # a per-step agreement
        _event(6, evaluated=True, entropy=0.3, agreement=0.85, reference=[0.8]),
    ]
    for event in events:
        plots.add_event(event)
    assert plots.data["loss"][0] == [1, 2, 3, 4, 5, 6]
    assert plots.data["entropy"] == ([0, 3, 6], [0.6, 0.4, 0.3])
    assert plots.data["reference"] == ([0, 3, 6], [0.6, 0.7, 0.8])
    assert plots.data["agreement"][0] == [0, 3, 5, 6]
    one_by_one = {key: (list(steps), list(values)) for key, (steps, values) in plots.data.items()}
    plots.clear()
    plots.add_events(events)  # in one batch: the same points, drawn once
    assert plots.data == one_by_one
    for key, (steps, values) in one_by_one.items():
        drawn_steps, drawn_values = plots.curves[key].getData()
        assert list(drawn_steps) == steps and list(drawn_values) == values
    plots.clear()
    assert all(plots.points(key) == 0 for key in plots.data)


def test_theme_colours(qtbot):
    plots = LivePlots("dark")
    qtbot.addWidget(plots)
    assert plots.graphics.backgroundBrush().color().name() == get_theme("dark").background.as_hex()
    plots.set_theme("light")
    assert plots.graphics.backgroundBrush().color().name() == get_theme("light").background.as_hex()
    assert "total loss" in plots.legend.text()
