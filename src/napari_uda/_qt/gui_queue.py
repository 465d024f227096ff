"""Spread GUI work over event-loop turns so no single turn blocks the GUI for long.

Creating a napari layer or redrawing after new data can take a good fraction of a second with
software OpenGL; doing four of them in one slot freezes the viewer for that long. A
:class:`GuiQueue` runs one queued callable per event-loop turn instead, so timers, input and
painting get their turn in between. Work with a ``key`` replaces pending work with the same key
(a newer preview supersedes an older one that was not drawn yet).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from qtpy.QtCore import QObject, QTimer


class GuiQueue:
    """Run callables on the GUI thread, one per event-loop turn, in order."""

    def __init__(self, parent: QObject | None = None):
        self._items: list[tuple[Hashable | None, Callable[[], object]]] = []
        self._timer = QTimer(parent)
        self._timer.setInterval(0)
        self._timer.timeout.connect(self._run_one)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, work: Callable[[], object], key: Hashable | None = None) -> None:
        """Queue ``work``; pending work with the same ``key`` is dropped."""
        if key is not None:
            self._items = [(k, w) for k, w in self._items if k != key]
        self._items.append((key, work))
        self._timer.start()

    def clear(self) -> None:
        """Drop all pending work."""
        self._items.clear()
        self._timer.stop()

    def _run_one(self) -> None:
        if not self._items:
            self._timer.stop()
            return
        _, work = self._items.pop(0)
        if not self._items:
            self._timer.stop()
        work()
