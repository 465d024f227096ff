"""Source training: labelled volumes in, a :class:`~napari_uda.core.models.ModelBundle` out.

:func:`train_bundle` follows the papers: a 2D U-Net trained with Adam (learning rate 1e-3) on
Dice + cross-entropy with flips, small rotations and zooms and intensity gamma / scale / shift
augmentation; then, as UDAS does, the early segmentation head alone is trained on the same
labels with every other weight frozen (BatchNorm statistics included). The bundle stores the
source class ratios, a small *source pack* of labelled slices, and provenance (settings, seed,
data file names and sha256, versions, date).

Progress goes to a ``callback`` as :class:`TrainingProgress` records; nothing here prints.
Training is deterministic on the CPU for a given seed.
"""

from __future__ import annotations

import functools
import hashlib
import platform
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F

from .. import __version__
from ..settings import setting, settings_to_dict
from .augment import SpatialAugmentation
from .device import resolve_device
from .models.bundle import ModelBundle, SourcePack
from .models.unet import UNet2D, UNetConfig
from .plausibility import expected_from_masks
from .preprocessing import PreprocessingConfig, prepare_volume
from .volume import Volume

LossName = Literal["dice_ce", "dice", "ce"]


@dataclass
class TrainingSettings:
    """Source training settings (paper defaults)."""

    epochs: int = setting(60, "Passes over all training slices for the U-Net.", min=1, max=10000)
    batch_size: int = setting(16, "Slices per optimiser step.", min=1, max=1024)
    learning_rate: float = setting(1e-3, "Adam learning rate.", min=1e-7, max=1.0)
    weight_decay: float = setting(0.0, "Adam weight decay (L2).", min=0.0, max=1.0)
    loss: Literal["dice_ce", "dice", "ce"] = setting(
        "dice_ce",
        "Loss: soft Dice plus cross-entropy (dice_ce), soft Dice (dice) or cross-entropy (ce).",
        choices=("dice_ce", "dice", "ce"),
    )
    augment: bool = setting(True, "Random flips, rotations, zooms and intensity changes.")
    flip_probability: float = setting(
        0.5, "Probability of mirroring each in-plane axis.", min=0.0, max=1.0
    )
    rotation_degrees: float = setting(
        10.0, "In-plane rotation drawn in +-this many degrees.", min=0.0, max=180.0
    )
    scale_jitter: float = setting(0.1, "Zoom drawn in 1 +- this.", min=0.0, max=0.9)
    gamma_jitter: float = setting(
        0.3, "Intensity gamma drawn as exp(+-this) (log-uniform).", min=0.0, max=2.0
    )
    intensity_scale_jitter: float = setting(
        0.1, "Normalised intensities multiplied by 1 +- this.", min=0.0, max=1.0
    )
    intensity_shift_jitter: float = setting(
        0.1, "Normalised intensities shifted by +- this.", min=0.0, max=5.0
    )
    torchio_augmentation: bool = setting(
        False, "Also apply torchio bias field and noise to each volume once per epoch."
    )
    early_head_epochs: int = setting(
        20,
        "Epochs that train the early head alone, everything else frozen (0: skip).",
        min=0,
        max=10000,
    )
    early_head_learning_rate: float = setting(
        1e-2,
        "Adam learning rate of the early head (a 1x1 convolution on frozen features).",
        min=1e-7,
        max=1.0,
    )
    source_pack_size: int = setting(
        24, "Labelled source slices stored in the bundle (0: none).", min=0, max=1024
    )
    seed: int = setting(0, "Seeds weights, batches and augmentation.", min=0)


@dataclass
class TrainingProgress:
    """One progress record.

    Attributes:
        phase: ``"unet"`` (whole network) or ``"early_head"``.
        epoch: epochs finished in this phase (1-based).
        epochs: planned epochs of this phase.
        loss: mean training loss of the epoch.
        dice: mean soft foreground Dice of the epoch's training batches (augmented).
        elapsed_seconds: wall time since training started.
        message: a short human note.
    """

    phase: Literal["unet", "early_head"]
    epoch: int
    epochs: int
    loss: float
    dice: float
    elapsed_seconds: float
    message: str = ""


ProgressCallback = Callable[[TrainingProgress], None]
SourceTensorsHook = Callable[[ModelBundle, torch.Tensor], dict[str, torch.Tensor]]


# -- losses -------------------------------------------------------------------------------------
def soft_dice(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean soft Dice over the foreground classes of a batch (labels (B, H, W) int)."""
    probabilities = torch.softmax(logits, dim=1)
    one_hot = F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).to(probabilities)
    dims = (0, 2, 3)
    intersection = (probabilities * one_hot).sum(dims)
    total = probabilities.sum(dims) + one_hot.sum(dims)
    dice = (2 * intersection + 1.0) / (total + 1.0)
    return dice[1:].mean() if logits.shape[1] > 1 else dice.mean()


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor, loss: LossName) -> torch.Tensor:
    """The training loss ``loss`` ("dice_ce", "dice" or "ce")."""
    if loss == "ce":
        return F.cross_entropy(logits, labels)
    dice_loss = 1.0 - soft_dice(logits, labels)
    if loss == "dice":
        return dice_loss
    return dice_loss + F.cross_entropy(logits, labels)


# -- augmentation -------------------------------------------------------------------------------
def augment_batch(
    images: torch.Tensor,
    labels: torch.Tensor,
    settings: TrainingSettings,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Random flips, rotation and zoom (images and labels alike), then intensity gamma, scale and
    shift (images only). Images are (B, 1, H, W) normalised slices, labels (B, H, W)."""
    spatial = SpatialAugmentation(
        rotation_degrees=settings.rotation_degrees,
        max_translation=0.05,
        scale_range=(1 - settings.scale_jitter, 1 + settings.scale_jitter),
        flip_probability=settings.flip_probability,
    )
    transform = spatial.sample(images, generator=generator)
    images = transform(images)
    labels = transform(labels[:, None])[:, 0]

    batch = images.shape[0]
    low = images.amin(dim=(1, 2, 3), keepdim=True)
    high = images.amax(dim=(1, 2, 3), keepdim=True)
    span = (high - low).clamp_min(1e-6)
    log_gamma = (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * settings.gamma_jitter
    images = low + span * ((images - low) / span).clamp(0, 1) ** log_gamma.exp()
    scale = 1 + (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * (
        settings.intensity_scale_jitter
    )
    shift = (torch.rand(batch, 1, 1, 1, generator=generator) * 2 - 1) * (
        settings.intensity_shift_jitter
    )
    return images * scale + shift, labels


def torchio_augment(volume: Volume) -> Volume:
    """A torchio bias field and Gaussian noise on a whole volume (uses torch's global RNG)."""
    import torchio as tio

    transform = tio.Compose([tio.RandomBiasField(0.3), tio.RandomNoise(std=(0, 0.03))])
    data = np.asarray(volume.data, dtype=np.float32)
    scale = float(np.percentile(data, 99.5)) or 1.0
    image = tio.ScalarImage(tensor=torch.from_numpy(data / scale)[None], affine=volume.affine)
    return volume.with_data(transform(image).data[0].numpy() * scale)


# -- data ---------------------------------------------------------------------------------------
@dataclass
class TrainingSlices:
    """All training slices, padded to one size."""

    images: torch.Tensor  # (N, 1, H, W) float32
    labels: torch.Tensor  # (N, H, W) int64
    volume_index: torch.Tensor  # (N,) which input volume each slice came from


def _pad_to(tensor: torch.Tensor, height: int, width: int, value: float) -> torch.Tensor:
    pad = (0, width - tensor.shape[-1], 0, height - tensor.shape[-2])
    return F.pad(tensor, pad, value=value)


def build_slices(
    images: list[Volume],
    masks: list[Volume],
    preprocessing: PreprocessingConfig,
    num_classes: int,
) -> TrainingSlices:
    """Preprocess every (image, mask) pair into network slices, padded to a common size.

    Raises:
        ValueError: a mask that does not match its image's grid or holds labels outside
            ``0 .. num_classes - 1``.
    """
    if len(images) != len(masks) or not images:
        raise ValueError(f"need as many masks as images, got {len(images)} and {len(masks)}")
    prepared_images, prepared_labels = [], []
    for image, mask in zip(images, masks):
        name = mask.path.name if mask.path is not None else "mask"
        values = np.unique(np.asarray(mask.data))
        if values.min() < 0 or values.max() >= num_classes or np.any(np.mod(values, 1) != 0):
            raise ValueError(
                f"{name}: labels must be integers 0..{num_classes - 1}, found "
                f"{', '.join(str(v) for v in values[:8])}"
            )
        if mask.shape != image.shape or not np.allclose(mask.affine, image.affine, atol=1e-3):
            raise ValueError(f"{name}: mask is not on the grid of its image")
        prepared = prepare_volume(image, preprocessing)
        prepared_images.append(prepared.inputs)
        prepared_labels.append(prepared.labels_to_inputs(mask))
    height = max(t.shape[-2] for t in prepared_images)
    width = max(t.shape[-1] for t in prepared_images)
    padded_images = [_pad_to(t, height, width, float(t.min())) for t in prepared_images]
    padded_labels = [_pad_to(t, height, width, 0) for t in prepared_labels]
    return TrainingSlices(
        torch.cat(padded_images),
        torch.cat(padded_labels),
        torch.cat([torch.full((len(t),), i) for i, t in enumerate(padded_images)]),
    )


def class_ratios(labels: torch.Tensor, num_classes: int) -> list[float]:
    """Fraction of voxels of each class in ``labels``."""
    counts = torch.bincount(labels.flatten(), minlength=num_classes).double()
    return [float(v) for v in counts / counts.sum().clamp_min(1)]


def choose_source_pack(slices: TrainingSlices, size: int) -> SourcePack | None:
    """``size`` slices spread evenly over the slices holding foreground (all slices if too few)."""
    if size <= 0:
        return None
    has_foreground = (slices.labels > 0).flatten(1).any(1)
    candidates = torch.nonzero(has_foreground).flatten()
    if len(candidates) < size:
        candidates = torch.arange(len(slices.labels))
    positions = torch.linspace(0, len(candidates) - 1, min(size, len(candidates))).round().long()
    chosen = candidates[positions.unique()]
    return SourcePack(slices.images[chosen].clone(), slices.labels[chosen].clone())


def source_statistics(slices: TrainingSlices, num_classes: int) -> dict:
    """Class ratios over all training voxels and over slices that hold foreground."""
    has_foreground = (slices.labels > 0).flatten(1).any(1)
    per_slice = [class_ratios(labels, num_classes) for labels in slices.labels[has_foreground]] or [
        class_ratios(slices.labels, num_classes)
    ]
    return {
        "class_ratios": class_ratios(slices.labels, num_classes),
        "class_ratios_foreground_slices": class_ratios(slices.labels[has_foreground], num_classes),
        "class_ratios_per_slice_min": [float(v) for v in np.min(per_slice, axis=0)],
        "class_ratios_per_slice_max": [float(v) for v in np.max(per_slice, axis=0)],
        "num_volumes": int(slices.volume_index.max()) + 1,
        "num_slices": len(slices.labels),
        "num_foreground_slices": int(has_foreground.sum()),
        "slice_shape": list(slices.images.shape[-2:]),
    }


def file_record(volume: Volume) -> dict:
    """Name and sha256 of the file a volume came from (or a note that it has none)."""
    if volume.path is None:
        return {"name": None, "sha256": None}
    return {
        "name": volume.path.name,
        "sha256": hashlib.sha256(volume.path.read_bytes()).hexdigest(),
    }


# -- training -----------------------------------------------------------------------------------
def _run_epochs(
    model: UNet2D,
    slices_for_epoch: Callable[[], TrainingSlices],
    settings: TrainingSettings,
    *,
    phase: Literal["unet", "early_head"],
    epochs: int,
    optimizer: torch.optim.Optimizer,
    device: torch.device,
    generator: torch.Generator,
    started: float,
    callback: ProgressCallback | None,
    should_stop: Callable[[], bool] | None,
) -> bool:
    """Train for ``epochs``; returns False if ``should_stop`` asked to stop."""
    for epoch in range(1, epochs + 1):
        slices = slices_for_epoch()
        count = len(slices.labels)
        batch_size = min(settings.batch_size, count)
        order = torch.randperm(count, generator=generator)
        losses, dices = [], []
        for step in range(max(1, count // batch_size)):  # no partial batch (BatchNorm)
            if should_stop is not None and should_stop():
                return False
            index = order[step * batch_size : (step + 1) * batch_size]
            images, labels = slices.images[index], slices.labels[index]
            if settings.augment:
                images, labels = augment_batch(images, labels, settings, generator)
            images, labels = images.to(device), labels.to(device)
            outputs = model.forward_features(images)
            logits = outputs.logits if phase == "unet" else outputs.early_logits
            loss = segmentation_loss(logits, labels, settings.loss)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            dices.append(float(soft_dice(logits.detach(), labels)))
        if callback is not None:
            callback(
                TrainingProgress(
                    phase=phase,
                    epoch=epoch,
                    epochs=epochs,
                    loss=float(np.mean(losses)),
                    dice=float(np.mean(dices)),
                    elapsed_seconds=time.perf_counter() - started,
                )
            )
    return True


def train_bundle(
    images: list[Volume],
    masks: list[Volume],
    settings: TrainingSettings | None = None,
    architecture: UNetConfig | None = None,
    preprocessing: PreprocessingConfig | None = None,
    class_names: list[str] | None = None,
    callback: ProgressCallback | None = None,
    should_stop: Callable[[], bool] | None = None,
    *,
    device: str = "auto",
    provenance: dict | None = None,
    source_tensors: SourceTensorsHook | None = None,
    expected_volume: Mapping[str, tuple[float, float]] | None = None,
) -> ModelBundle:
    """Train a U-Net bundle on labelled volumes.

    Args:
        images: training images (any orientation and spacing).
        masks: one label volume per image, on the image's grid, values ``0..C-1``.
        settings: training settings. Default :class:`TrainingSettings()`.
        architecture: the U-Net. Default :class:`UNetConfig()` with ``num_classes`` taken from
            ``class_names``.
        preprocessing: how volumes become slices. Default :class:`PreprocessingConfig()`.
        class_names: one name per class, background first. Default ``["background",
            "foreground"]``.
        callback: receives a :class:`TrainingProgress` after every epoch.
        should_stop: polled before every step; when it returns True training ends and the
            bundle holds the weights so far (``provenance["stopped_early"]`` is True).
        device: ``"auto"``, ``"cpu"``, ``"cuda"`` or ``"mps"``. Default ``"auto"``.
        provenance: extra provenance entries (e.g. the command line).
        source_tensors: called with the finished bundle and every preprocessed training slice
            (N, 1, H, W); the tensors it returns are stored with the bundle's source statistics
            (``napari-uda train`` stores AIVA's source bottleneck features this way). Default
            None.
        expected_volume: the plausible volume per foreground class in ml, stored as the
            bundle's ``source_statistics["expected_volume_ml"]`` (the gate and the QA widget
            flag results outside it); replaces, class by class, the range derived from the
            training masks (:func:`~napari_uda.core.plausibility.expected_from_masks`: half
            the smallest to one and a half times the largest). Default None: derived only.
    """
    settings = settings or TrainingSettings()
    class_names = list(class_names or ["background", "foreground"])
    architecture = architecture or UNetConfig(num_classes=len(class_names))
    preprocessing = preprocessing or PreprocessingConfig()
    if architecture.num_classes != len(class_names):
        raise ValueError(
            f"{len(class_names)} class names for a network with {architecture.num_classes} outputs"
        )
    if architecture.in_channels != 1:
        raise ValueError("training supports single-channel images only (in_channels=1)")
    device_obj = resolve_device(device)
    started = time.perf_counter()

    slices = build_slices(images, masks, preprocessing, architecture.num_classes)
    run_epochs = functools.partial(
        _run_epochs,
        settings=settings,
        device=device_obj,
        generator=torch.Generator().manual_seed(settings.seed),
        started=started,
        callback=callback,
        should_stop=should_stop,
    )

    def unet_slices() -> TrainingSlices:
        if not settings.torchio_augmentation:
            return slices
        augmented = [torchio_augment(image) for image in images]
        return build_slices(augmented, masks, preprocessing, architecture.num_classes)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        model = UNet2D(architecture).to(device_obj)
        completed = _fit_unet(model, settings, run_epochs, unet_slices, lambda: slices)
    model.eval().cpu()

    record = _training_record(images, masks, settings, device_obj, started, completed)
    record.update(provenance or {})
    statistics = source_statistics(slices, architecture.num_classes)
    derived = expected_from_masks(
        ((np.rint(np.asarray(mask.data)), mask.spacing) for mask in masks), class_names
    )
    expected = {**derived, **dict(expected_volume or {})}
    statistics["expected_volume_ml"] = {k: list(v) for k, v in expected.items()}
    bundle = ModelBundle.from_model(
        model,
        class_names,
        preprocessing,
        provenance=record,
        source_statistics=statistics,
        source_pack=choose_source_pack(slices, settings.source_pack_size),
    )
    if source_tensors is not None:
        bundle.source_tensors.update(source_tensors(bundle, slices.images))
    return bundle


def _fit_unet(
    model: UNet2D,
    settings: TrainingSettings,
    run_epochs: Callable[..., bool],
    unet_slices: Callable[[], TrainingSlices],
    head_slices: Callable[[], TrainingSlices],
) -> bool:
    """Train the whole U-Net, then (when it has one and ``early_head_epochs`` > 0) its early
    head alone on the frozen network. Returns False when training was stopped early."""
    model.train()
    optimizer = torch.optim.Adam(
        model.parameters(), lr=settings.learning_rate, weight_decay=settings.weight_decay
    )
    completed = run_epochs(
        model, unet_slices, phase="unet", epochs=settings.epochs, optimizer=optimizer
    )
    if not (completed and model.config.early_head and settings.early_head_epochs > 0):
        return completed
    model.eval()  # frozen BatchNorm statistics and no dropout in the shared layers
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    head_parameters = list(model.early_head.parameters())
    for parameter in head_parameters:
        parameter.requires_grad_(True)
    head_optimizer = torch.optim.Adam(head_parameters, lr=settings.early_head_learning_rate)
    completed = run_epochs(
        model,
        head_slices,
        phase="early_head",
        epochs=settings.early_head_epochs,
        optimizer=head_optimizer,
    )
    for parameter in model.parameters():
        parameter.requires_grad_(True)
    return completed


def _training_record(
    images: list[Volume],
    masks: list[Volume],
    settings: TrainingSettings,
    device: torch.device,
    started: float,
    completed: bool,
) -> dict:
    """The bundle's provenance: when, with what, on which files, how long."""
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "tool": f"napari-uda {__version__} core.training.train_bundle",
        "settings": settings_to_dict(settings),
        "seed": settings.seed,
        "device": str(device),
        "training_data": [
            {"image": file_record(image), "mask": file_record(mask)}
            for image, mask in zip(images, masks)
        ],
        "versions": {
            "napari_uda": __version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
            "python": platform.python_version(),
        },
        "seconds": round(time.perf_counter() - started, 1),
        "stopped_early": not completed,
    }
