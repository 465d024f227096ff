"""Spread GUI work over event-loop turns so no single turn blocks the GUI for long.

Creating a napari layer or redrawing after new data can take a good fraction of a second with
software OpenGL; doing four of them in one slot freezes the viewer for that long. A
:class:`GuiQueue` runs one queued callable at a time instead, with a pause of :data:`PAUSE_MS`
after each (a single-shot timer restarted once the work is done), so timers, input and painting
get their turn in between even when the work took long (a zero-delay timer would fire again in
the same event-loop pass, before other overdue timers). Work with a ``key`` replaces pending
work with the same key (a newer preview supersedes an older one that was not drawn yet).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable

from qtpy.QtCore import QObject, QTimer

#: Milliseconds between two pieces of queued work.
PAUSE_MS = 15


class GuiQueue:
    """Run callables on the GUI thread one at a time, in order, with a pause after each."""

    def __init__(self, parent: QObject | None = None):
        self._items: list[tuple[Hashable | None, Callable[[], object]]] = []
        self._timer = QTimer(parent)
        self._timer.setSingleShot(True)
        self._timer.setInterval(PAUSE_MS)
        self._timer.timeout.connect(self._run_one)

    def __len__(self) -> int:
        return len(self._items)

    def put(self, work: Callable[[], object], key: Hashable | None = None) -> None:
        """Queue ``work``; pending work with the same ``key`` is dropped."""
        if key is not None:
            self._items = [(k, w) for k, w in self._items if k != key]
        self._items.append((key, work))
        if not self._timer.isActive():
            self._timer.start()

    def clear(self) -> None:
        """Drop all pending work."""
        self._items.clear()
        self._timer.stop()

    def _run_one(self) -> None:
        if not self._items:
            return
        _, work = self._items.pop(0)
        try:
            work()
        finally:
            if self._items:
                self._timer.start()
