"""Helpers for the nnU-Net tests: a trained-model folder in nnU-Net v2's exact format (plans,
dataset.json, fold_<k>/checkpoint_final.pth as nnU-Net's trainer saves it) holding a tiny
PlainConvUNet trained for a few seconds on the demo head, at a coarse spacing."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from napari_uda.core.models.nnunet import (
    NnUNetAdapter,
    NnUNetConfiguration,
    build_network,
    read_folder,
)
from napari_uda.core.volume import Volume

ARCHITECTURE_3D = {
    "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
    "arch_kwargs": {
        "n_stages": 3,
        "features_per_stage": [4, 8, 16],
        "conv_op": "torch.nn.modules.conv.Conv3d",
        "kernel_sizes": [[3, 3, 3]] * 3,
        "strides": [[1, 1, 1], [2, 2, 2], [2, 2, 2]],
        "n_conv_per_stage": [1, 1, 1],
        "n_conv_per_stage_decoder": [1, 1],
        "conv_bias": True,
        "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
        "norm_op_kwargs": {"eps": 1e-05, "affine": True},
        "dropout_op": None,
        "dropout_op_kwargs": None,
        "nonlin": "torch.nn.LeakyReLU",
        "nonlin_kwargs": {"inplace": True},
    },
    "_kw_requires_import": ["conv_op", "norm_op", "dropout_op", "nonlin"],
}


def architecture(spatial_dims: int, features=(4, 8, 16)) -> dict:
    """A 3-stage PlainConvUNet entry as nnU-Net's planner writes it."""
    arch = json.loads(json.dumps(ARCHITECTURE_3D))
    kwargs = arch["arch_kwargs"]
    kwargs["features_per_stage"] = list(features)
    if spatial_dims == 3:
        return arch
    kwargs["conv_op"] = "torch.nn.modules.conv.Conv2d"
    kwargs["norm_op"] = "torch.nn.modules.instancenorm.InstanceNorm2d"
    kwargs["kernel_sizes"] = [[3, 3]] * 3
    kwargs["strides"] = [[1, 1], [2, 2], [2, 2]]
    return arch


def plans(
    configuration: str = "3d_fullres",
    *,
    spacing=(4.0, 4.0, 4.0),
    patch=(32, 32, 32),
    transpose_forward=(2, 0, 1),
    use_mask_for_norm=True,
    features=(4, 8, 16),
) -> dict:
    """A plans.json with one configuration (plus a ``3d_lowres`` inheriting from 3d_fullres)."""
    dims = len(patch)
    backward = [int(i) for i in np.argsort(transpose_forward)]
    config = {
        "data_identifier": f"nnUNetPlans_{configuration}",
        "preprocessor_name": "DefaultPreprocessor",
        "batch_size": 2,
        "patch_size": list(patch),
        "median_image_size_in_voxels": [40, 50, 40][:dims],
        "spacing": list(spacing)[:dims],
        "normalization_schemes": ["ZScoreNormalization"],
        "use_mask_for_norm": [use_mask_for_norm],
        "resampling_fn_data": "resample_data_or_seg_to_shape",
        "resampling_fn_seg": "resample_data_or_seg_to_shape",
        "resampling_fn_data_kwargs": {
            "is_seg": False,
            "order": 3,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_seg_kwargs": {
            "is_seg": True,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "resampling_fn_probabilities": "resample_data_or_seg_to_shape",
        "resampling_fn_probabilities_kwargs": {
            "is_seg": False,
            "order": 1,
            "order_z": 0,
            "force_separate_z": None,
        },
        "architecture": architecture(dims, features),
        "batch_dice": False,
    }
    configurations = {configuration: config}
    if configuration == "3d_fullres":
        configurations["3d_lowres"] = {
            "inherits_from": "3d_fullres",
            "data_identifier": "nnUNetPlans_3d_lowres",
            "spacing": [6.0, 6.0, 6.0],
            "next_stage": "3d_cascade_fullres",
        }
    return {
        "dataset_name": "Dataset901_DemoHead",
        "plans_name": "nnUNetPlans",
        "original_median_spacing_after_transp": [2.0, 2.0, 2.0],
        "original_median_shape_after_transp": [91, 91, 109],
        "image_reader_writer": "SimpleITKIO",
        "transpose_forward": list(transpose_forward),
        "transpose_backward": backward,
        "configurations": configurations,
        "experiment_planner_used": "ExperimentPlanner",
        "label_manager": "LabelManager",
        "foreground_intensity_properties_per_channel": {
            "0": {
                "max": 1.0,
                "mean": 0.5,
                "median": 0.5,
                "min": 0.0,
                "percentile_00_5": 0.0,
                "percentile_99_5": 1.0,
                "std": 0.2,
            }
        },
    }


DATASET = {
    "channel_names": {"0": "T1"},
    "labels": {"background": 0, "brain": 1},
    "numTraining": 1,
    "file_ending": ".nii.gz",
}


def nnunet_checkpoint(weights: dict, plans_: dict, configuration: str, fold) -> dict:
    """A checkpoint laid out as nnU-Net's trainer saves it (numpy floats in its log, a
    torch.device in init_args)."""
    return {
        "network_weights": weights,
        "optimizer_state": {"state": {}, "param_groups": [{"lr": 0.01, "params": [0]}]},
        "grad_scaler_state": None,
        "logging": {
            "mean_fg_dice": [np.float64(0.5)],
            "ema_fg_dice": [np.float64(0.5)],
            "dice_per_class_or_region": [[np.float64(0.5)]],
            "train_losses": [np.float64(-0.4)],
            "val_losses": [np.float32(-0.3)],
            "lrs": [0.01],
            "epoch_start_timestamps": [1.0],
            "epoch_end_timestamps": [2.0],
        },
        "_best_ema": np.float64(0.5),
        "current_epoch": 1,
        "init_args": {
            "plans": plans_,
            "configuration": configuration,
            "fold": fold,
            "dataset_json": DATASET,
            "device": torch.device("cuda"),
        },
        "trainer_name": "nnUNetTrainer",
        "inference_allowed_mirroring_axes": (0, 1) if configuration == "2d" else (0, 1, 2),
    }


def write_folder(root: Path, plans_: dict, configuration: str, weights: dict[int, dict]) -> Path:
    """``root/Dataset901_DemoHead/nnUNetTrainer__nnUNetPlans__<configuration>`` with one
    fold_<k>/checkpoint_final.pth per entry of ``weights`` (fold -> state dict)."""
    folder = root / "Dataset901_DemoHead" / f"nnUNetTrainer__nnUNetPlans__{configuration}"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "plans.json").write_text(json.dumps(plans_, indent=2))
    (folder / "dataset.json").write_text(json.dumps(DATASET, indent=2))
    for fold, state in weights.items():
        (folder / f"fold_{fold}").mkdir(exist_ok=True)
        torch.save(
            nnunet_checkpoint(state, plans_, configuration, fold),
            folder / f"fold_{fold}" / "checkpoint_final.pth",
        )
    return folder


def train_folder(
    root: Path,
    image: Volume,
    mask: Volume,
    *,
    configuration: str = "3d_fullres",
    folds: tuple[int, ...] = (0,),
    steps: int = 30,
    **plan_changes,
) -> Path:
    """A trained-model folder whose folds were trained (``steps`` Adam steps each, different
    seeds) on ``image`` / ``mask`` as napari-uda prepares them for the model."""
    plans_ = plans(configuration, **plan_changes)
    config = NnUNetConfiguration.from_plans(plans_, configuration, 1, "test plans")
    weights = {}
    for fold in folds:
        torch.manual_seed(fold)
        weights[fold] = build_network(config, 1, 2, "test plans").state_dict()
    folder = write_folder(root, plans_, configuration, weights)
    for fold in folds:
        model = NnUNetAdapter(read_folder(folder, folds=[fold]), mirroring=False)
        prepared = model.prepare(image)
        labels = prepared.labels_to_inputs(mask)
        fit_network(model.network, prepared.inputs, labels, steps, seed=fold)
        weights[fold] = model.network.folds[0].state_dict()
    return write_folder(root, plans_, configuration, weights)


def fit_network(network, inputs, labels, steps: int, seed: int) -> None:
    """``steps`` Adam steps (lr 1e-2, batches of 4) of cross-entropy on ``inputs`` / ``labels``
    (the tiny nnU-Net and MONAI test models), then eval mode."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-2)
    network.train()
    for _ in range(steps):
        index = torch.randperm(len(inputs), generator=generator)[:4]
        loss = torch.nn.functional.cross_entropy(network(inputs[index]), labels[index])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    network.eval()
