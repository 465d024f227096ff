"""Choosing the compute device: CUDA, then Apple MPS, then CPU, unless the user says."""

from __future__ import annotations

from typing import Literal

import torch

DeviceChoice = Literal["auto", "cpu", "cuda", "mps"]


def available_devices() -> list[str]:
    """Devices usable on this machine, best first (``cpu`` always last)."""
    devices = []
    if torch.cuda.is_available():
        devices.append("cuda")
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        devices.append("mps")
    devices.append("cpu")
    return devices


def resolve_device(choice: str = "auto") -> torch.device:
    """``auto`` picks the best available device; asking for a missing one is an error."""
    choice = (choice or "auto").lower()
    if choice == "auto":
        return torch.device(available_devices()[0])
    if choice not in ("cpu", "cuda", "mps"):
        raise ValueError(f"unknown device {choice!r}; choose auto, cpu, cuda or mps")
    if choice not in available_devices():
        raise ValueError(f"device {choice!r} is not available here; use auto or cpu")
    return torch.device(choice)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (float16); a no-op context elsewhere."""
    return torch.autocast(
        device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda"
    )
