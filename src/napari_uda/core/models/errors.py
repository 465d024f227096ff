"""What every model module may raise or recognise, without importing any of them (a leaf, so
the registry and the adapters it opens do not import each other)."""

from __future__ import annotations

from .bundle import BundleError

#: File suffixes of TorchScript models.
TORCHSCRIPT_SUFFIXES = (".pt", ".pth", ".ts", ".torchscript")


class ModelLoadError(BundleError):
    """A model that cannot be opened; the message is one readable line."""
