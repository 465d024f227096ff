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


class DeviceError(ValueError):
    """An unknown device name or a device this machine does not have; one readable line."""


def resolve_device(choice: str | torch.device | None = "auto") -> torch.device:
    """The device to compute on.

    ``"auto"`` (default, also ``None``) picks the best available: CUDA, then MPS, then CPU.
    ``"cpu"``, ``"cuda"``, ``"cuda:1"`` or ``"mps"`` ask for one; asking for a device this
    machine does not have is an error rather than a silent fall-back.

    Raises:
        DeviceError: unknown name or unavailable device.
    """
    if isinstance(choice, torch.device):
        choice = str(choice)
    choice = (choice or "auto").strip().lower()
    if choice == "auto":
        return torch.device(available_devices()[0])
    kind, _, index = choice.partition(":")
    if kind not in ("cpu", "cuda", "mps") or (index and not index.isdigit()):
        raise DeviceError(f"unknown device {choice!r}; choose auto, cpu, cuda or mps")
    if kind not in available_devices():
        reason = {"cuda": "no CUDA GPU found", "mps": "no Apple MPS device found"}.get(kind, "")
        raise DeviceError(f"device {choice!r} is not available here ({reason}); use auto or cpu")
    if kind == "cuda" and index and int(index) >= torch.cuda.device_count():
        raise DeviceError(
            f"device {choice!r} is not available here ({torch.cuda.device_count()} CUDA GPUs)"
        )
    return torch.device(choice)


def autocast(device: torch.device, enabled: bool = True):
    """Mixed precision on CUDA (float16) when ``enabled`` (default True); a no-op elsewhere."""
    return torch.autocast(
        device_type=device.type, dtype=torch.float16, enabled=enabled and device.type == "cuda"
    )


def cpu_bfloat16_supported() -> bool:
    """Whether this CPU computes bfloat16 natively (oneDNN: AVX-512 BF16 or AMX); without it
    bfloat16 autocast is emulated and slower than float32."""
    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    try:
        return bool(check()) if check is not None else False
    except RuntimeError:
        return False
