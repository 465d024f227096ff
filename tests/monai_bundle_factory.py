"""Helpers for the MONAI bundle tests: a bundle folder as MONAI's model zoo lays it out
(configs/metadata.json, configs/inference.json with expressions where real bundles have them,
models/model.pt) holding a small MONAI UNet trained for a few seconds on the demo head."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nnunet_factory import fit_network

METADATA = {
    "schema": "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/"
    "0.8.1/meta_schema_20220324.json",
    "version": "0.1.0",
    "name": "Demo brain extraction (test bundle)",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1}},
        "outputs": {
            "pred": {
                "type": "image",
                "num_channels": 2,
                "channel_def": {"0": "background", "1": "brain"},
            }
        },
    },
}


def inference_config(pixdim=(4.0, 4.0, 4.0), roi=(32, 32, 32)) -> dict:
    """An inference.json as bundles write it: expressions for imports, device and the
    evaluation machinery, literal components for the network, preprocessing and inferer."""
    return {
        "imports": ["$import glob", "$import os"],
        "bundle_root": ".",
        "output_dir": "$@bundle_root + '/eval'",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "pixdim": list(pixdim),
        "network_def": {
            "_target_": "UNet",
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [8, 16, 32],
            "strides": [2, 2],
            "num_res_units": 1,
            "norm": "batch",
        },
        "network": "$@network_def.to(@device)",
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "image", "image_only": True},
                {"_target_": "EnsureChannelFirstd", "keys": "image"},
                {"_target_": "Orientationd", "keys": "image", "axcodes": "RAS"},
                {"_target_": "Spacingd", "keys": "image", "pixdim": "@pixdim", "mode": "bilinear"},
                {"_target_": "NormalizeIntensityd", "keys": "image", "nonzero": True},
                {"_target_": "EnsureTyped", "keys": "image"},
            ],
        },
        "inferer": {
            "_target_": "SlidingWindowInferer",
            "roi_size": list(roi),
            "sw_batch_size": 2,
            "overlap": 0.5,
            "mode": "gaussian",
        },
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "Activationsd", "keys": "pred", "softmax": True},
                {
                    "_target_": "Invertd",
                    "keys": "pred",
                    "transform": "@preprocessing",
                    "orig_keys": "image",
                    "nearest_interp": False,
                    "to_tensor": True,
                },
                {"_target_": "AsDiscreted", "keys": "pred", "argmax": True},
            ],
        },
        "run": ["$@evaluator.run()"],
    }


def write_bundle(folder: Path, config: dict, weights: dict) -> Path:
    (folder / "configs").mkdir(parents=True, exist_ok=True)
    (folder / "models").mkdir(exist_ok=True)
    (folder / "configs" / "metadata.json").write_text(json.dumps(METADATA, indent=2))
    (folder / "configs" / "inference.json").write_text(json.dumps(config, indent=2))
    torch.save(weights, folder / "models" / "model.pt")
    return folder


def train_bundle(folder: Path, image, mask, *, steps: int = 25, **config_changes) -> Path:
    """A bundle whose UNet was trained ``steps`` Adam steps on ``image`` / ``mask`` as
    napari-uda prepares them for it."""
    from monai.networks.nets import UNet

    from napari_uda.core.models.monai_bundle import MonaiBundleAdapter

    config = inference_config(**config_changes)
    arguments = {k: v for k, v in config["network_def"].items() if k != "_target_"}
    torch.manual_seed(0)
    write_bundle(folder, config, UNet(**arguments).state_dict())
    model = MonaiBundleAdapter(folder)
    prepared = model.prepare(image)
    inputs, labels = prepared.inputs, prepared.labels_to_inputs(mask)
    fit_network(model.network, inputs, labels, steps, seed=0)
    return write_bundle(folder, config, model.network.folds[0].state_dict())


def bundle_own_prediction(folder: Path, image_path: Path) -> torch.Tensor:
    """The bundle's own inference, with MONAI's ConfigParser evaluating everything (the test
    trusts its own bundle): LoadImaged ... the inferer ... Activationsd, Invertd, AsDiscreted.
    Returns the labels (X, Y, Z) and the probabilities (C, X, Y, Z) on the file's grid."""
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(str(folder / "configs" / "inference.json"))
    parser["bundle_root"] = str(folder)
    network = parser.get_parsed_content("network_def")
    network.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    network.eval()
    preprocessing = parser.get_parsed_content("preprocessing")
    inferer = parser.get_parsed_content("inferer")
    postprocessing = parser.get_parsed_content("postprocessing")
    data = preprocessing({"image": str(image_path)})
    with torch.no_grad():
        data["pred"] = inferer(data["image"][None], network)[0]
    labels = postprocessing(dict(data))["pred"][0]
    probabilities = postprocessing.transforms[1](postprocessing.transforms[0](dict(data)))["pred"]
    return torch.as_tensor(labels), torch.as_tensor(probabilities)
