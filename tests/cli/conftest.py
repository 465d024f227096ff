"""Fixtures the CLI tests share."""

from __future__ import annotations

import pytest

from napari_uda.core.volume import save_volume


@pytest.fixture(scope="module")
def files(tmp_path_factory, tiny_model, tiny_target, tiny_reference):
    """The tiny model as a bundle file, the target and its reference as NIfTI files."""
    folder = tmp_path_factory.mktemp("cli_adapt")
    model = tiny_model.bundle.save(folder / "model.safetensors")
    image = save_volume(tiny_target, folder / "target.nii.gz")
    reference = save_volume(tiny_reference, folder / "reference.nii.gz")
    return {"model": str(model), "image": str(image), "reference": str(reference)}
