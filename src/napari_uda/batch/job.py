"""What a batch runs, as one small picklable dataclass sent with every case to the workers."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

#: ``per-scan``: each scan adapted one-shot (as ``napari-uda adapt``); ``site``: one site model
#: adapted on a few scans, then every scan predicted with it (kept or rolled back per scan).
MODES = ("per-scan", "site")


@dataclass(frozen=True)
class BatchJob:
    """A batch's settings.

    Attributes:
        model: the model file (bundle, TorchScript or deepbet) every case starts from.
        method: the adaptation method (``napari-uda methods``).
        out_dir: the output folder (manifest, ``cases/<id>/``, report).
        mode: one of :data:`MODES` (default ``per-scan``).
        settings: the method's ``key=value`` settings (paper defaults for the rest).
        seed: seeds every adaptation and the site sample (default 0).
        device: ``auto``, ``cpu``, ``cuda`` or ``mps``, resolved on each worker.
        torch_threads: PyTorch intra-op threads per worker (None: leave the worker's choice).
        site_model: the adapted site model (set by the driver in ``site`` mode).
        write_entropy: also write each case's entropy map (default True).
        site_scans: ``site`` mode: the case ids the site model adapts on.
        expected_volume: ``CLASS=LOW:HIGH`` ml ranges replacing the model's own (the gate's
            expected-volume check).
        gate: keep-or-roll-back gate on (default True); off, the adapted mask is always kept.
    """

    model: str
    method: str
    out_dir: str
    mode: str = "per-scan"
    settings: tuple[str, ...] = ()
    seed: int = 0
    device: str = "auto"
    torch_threads: int | None = None
    site_model: str | None = None
    write_entropy: bool = True
    site_scans: tuple[str, ...] = field(default=())
    expected_volume: tuple[str, ...] = ()
    gate: bool = True

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, not {self.mode!r}")

    @property
    def cases_dir(self) -> Path:
        return Path(self.out_dir) / "cases"

    def case_dir(self, case_id: str) -> Path:
        return self.cases_dir / case_id

    def identity(self) -> dict[str, Any]:
        """What must match for a rerun to resume this batch (not threads, device or paths of
        the outputs, which may change between runs)."""
        keys = ("model", "method", "mode", "settings", "seed", "site_scans", "expected_volume")
        keys += ("gate",)
        values = asdict(self)
        identity = {key: values[key] for key in keys}
        identity["model"] = str(Path(self.model).resolve())
        identity["settings"] = sorted(self.settings)
        identity["site_scans"] = list(self.site_scans)
        identity["expected_volume"] = list(self.expected_volume)
        return identity


def settings_as_text(settings: dict[str, Any]) -> tuple[str, ...]:
    """A method's settings dict (e.g. a finished run's) as the ``key=value`` texts the CLI's
    ``--set`` takes (sequences comma-separated, None as ``none``)."""

    def text(value: Any) -> str:
        if value is None:
            return "none"
        if isinstance(value, (list, tuple)):
            return ",".join(text(item) for item in value)
        return str(value)

    return tuple(f"{key}={text(value)}" for key, value in settings.items())
