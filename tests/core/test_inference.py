"""Inference: read -> prepare -> predict -> write -> read again, probabilities, entropy, devices."""

from __future__ import annotations

import math
from typing import ClassVar

import nibabel as nib
import numpy as np
import pytest
import torch
from torch import nn
from volume_factory import ANISOTROPIC, ORIENTATIONS, affine_for, head_like

from napari_uda.core.device import DeviceError, available_devices, resolve_device
from napari_uda.core.inference import (
    Prediction,
    class_labels,
    normalized_entropy,
    predict_batches,
    predict_prepared,
    predict_volume,
)
from napari_uda.core.metrics import dice_per_class
from napari_uda.core.models.adapter import ModelAdapter, ModelInfo, UNetBundleAdapter
from napari_uda.core.models.bundle import ModelBundle
from napari_uda.core.models.unet import UNet2D, UNetConfig
from napari_uda.core.preprocessing import PreparedVolume, PreprocessingConfig, prepare_volume
from napari_uda.core.volume import Volume, load_volume, save_volume

SHAPE = (14, 16, 12)
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")


class ThresholdAdapter(ModelAdapter):
    """A "model" that segments voxels brighter than half the (min-max normalised) range.

    Its answer is known in advance, so the whole path from file to file can be checked.
    """

    class_names: ClassVar[list[str]] = ["background", "box"]

    def __init__(self, target_spacing=None):
        self.config = PreprocessingConfig(
            normalization="minmax", target_spacing=target_spacing, pad_multiple=8
        )
        self.network = nn.Conv2d(1, 2, 1)
        with torch.no_grad():
            self.network.weight.copy_(torch.tensor([0.0, 40.0]).view(2, 1, 1, 1))
            self.network.bias.copy_(torch.tensor([0.0, -20.0]))

    def prepare(self, volume: Volume) -> PreparedVolume:
        return prepare_volume(volume, self.config)

    def info(self) -> ModelInfo:
        return ModelInfo("threshold", self.class_names, 2, "none", None)


def tiny_unet_adapter(norm: str = "batch") -> UNetBundleAdapter:
    torch.manual_seed(0)
    model = UNet2D(UNetConfig(base_channels=4, depth=2, norm=norm, groups=2, dropout=0.2))
    with torch.no_grad():  # non-trivial BatchNorm statistics, as after training
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.running_mean.uniform_(-0.2, 0.2)
                module.running_var.uniform_(0.5, 1.5)
    preprocessing = PreprocessingConfig(target_spacing=(3.0, 3.0, 3.0), pad_multiple=4)
    bundle = ModelBundle.from_model(model, ["background", "brain"], preprocessing)
    return UNetBundleAdapter(bundle)


def write_scan(folder, axcodes, spacing=ANISOTROPIC):
    image, mask = head_like(SHAPE)
    affine = affine_for(axcodes, spacing)
    path = folder / f"scan_{''.join(axcodes)}.nii.gz"
    nifti = nib.Nifti1Image(image, affine)
    nifti.set_qform(affine, code=1)
    nifti.set_sform(affine, code=1)
    nib.save(nifti, path)
    return path, mask, affine


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_file_to_file_prediction_overlays_the_source(tmp_path, axcodes):
    source_path, mask, affine = write_scan(tmp_path, axcodes)

    volume = load_volume(source_path)
    prediction = predict_volume(ThresholdAdapter(), volume, device="cpu")
    label_path = save_volume(prediction.label_volume(), tmp_path / "seg.nii.gz")
    entropy_path = save_volume(prediction.entropy_volume(), tmp_path / "entropy.nii.gz")

    for path, dtype in [(label_path, np.uint8), (entropy_path, np.float32)]:
        written = nib.load(path)
        assert written.shape == SHAPE
        assert written.get_data_dtype() == dtype
        np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(load_volume(label_path).data, mask)


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
def test_prediction_through_a_resampled_model_grid_comes_back_in_place(axcodes):
    source = Volume(*[head_like(SHAPE)[0], affine_for(axcodes)])
    mask = head_like(SHAPE)[1]
    prediction = predict_volume(ThresholdAdapter(target_spacing=(1.5, 1.5, 1.5)), source)
    assert prediction.labels.shape == SHAPE
    assert dice_per_class(prediction.labels, mask, 2)[1] > 0.97


def test_probabilities_entropy_and_labels():
    adapter = tiny_unet_adapter()
    volume = Volume(head_like(SHAPE)[0], affine_for(("L", "S", "A")))
    prediction = predict_volume(adapter, volume, device="auto", batch_size=4)

    assert isinstance(prediction, Prediction)
    assert prediction.probabilities.shape == (2, *SHAPE)
    assert prediction.probabilities.dtype == np.float32
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-5)
    assert prediction.probabilities.min() >= 0.0
    assert prediction.entropy.shape == SHAPE
    assert prediction.entropy.min() >= 0.0 and prediction.entropy.max() <= 1.0 + 1e-6
    assert prediction.entropy.std() > 0  # a real map, not a constant
    np.testing.assert_array_equal(prediction.labels, prediction.probabilities.argmax(0))
    assert prediction.labels.dtype == np.uint8
    np.testing.assert_array_equal(prediction.label_volume().affine, volume.affine)


@pytest.mark.parametrize("norm", ["batch", "group", "instance"])
def test_batch_size_does_not_change_the_result(norm):
    adapter = tiny_unet_adapter(norm)
    adapter.network.train()  # prediction must switch to eval mode itself (BatchNorm, dropout)
    prepared = adapter.prepare(Volume(head_like(SHAPE)[0], affine_for(("R", "A", "S"))))
    one_by_one = predict_batches(adapter, prepared.inputs, batch_size=1)
    all_at_once = predict_batches(adapter, prepared.inputs, batch_size=64)
    torch.testing.assert_close(one_by_one, all_at_once, rtol=1e-4, atol=1e-5)
    assert adapter.network.training, "the network's mode is restored afterwards"


def test_progress_is_reported_and_stop_is_honoured():
    adapter = tiny_unet_adapter()
    prepared = adapter.prepare(Volume(head_like(SHAPE)[0], affine_for(("R", "A", "S"))))
    total = prepared.num_slices
    reports = []
    predict_batches(adapter, prepared.inputs, batch_size=3, progress=lambda *a: reports.append(a))
    assert reports[-1] == (total, total)
    assert [done for done, _ in reports] == sorted({min(i + 3, total) for i in range(0, total, 3)})

    calls = []

    def stop_after_two_batches():
        calls.append(1)
        return len(calls) > 2

    adapter.network.train()
    with pytest.raises(InterruptedError):
        predict_batches(adapter, prepared.inputs, batch_size=1, should_stop=stop_after_two_batches)
    assert adapter.network.training
    with pytest.raises(ValueError, match="batch_size"):
        predict_batches(adapter, prepared.inputs, batch_size=0)


def test_predict_prepared_equals_predict_volume():
    adapter = tiny_unet_adapter()
    volume = Volume(head_like(SHAPE)[0], affine_for(("L", "A", "S")))
    direct = predict_volume(adapter, volume)
    prepared = predict_prepared(adapter, adapter.prepare(volume))
    np.testing.assert_allclose(direct.probabilities, prepared.probabilities)


def test_normalized_entropy_bounds_for_numpy_and_torch():
    probabilities = np.array([[1.0, 0.5, 1 / 3], [0.0, 0.5, 1 / 3], [0.0, 0.0, 1 / 3]])
    entropy = normalized_entropy(probabilities, axis=0)
    np.testing.assert_allclose(entropy, [0.0, math.log(2) / math.log(3), 1.0], atol=1e-6)
    from_torch = normalized_entropy(torch.tensor(probabilities), axis=0)
    np.testing.assert_allclose(from_torch.numpy(), entropy, atol=1e-6)
    assert normalized_entropy(np.ones((1, 4)), axis=0).tolist() == [0.0] * 4


def test_auto_device_is_the_best_available(monkeypatch):
    assert resolve_device("auto") == torch.device(available_devices()[0])
    assert resolve_device(None) == resolve_device("auto")
    assert resolve_device("CPU") == torch.device("cpu")
    assert available_devices()[-1] == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")


@NO_CUDA
def test_auto_resolves_to_cpu_here():
    if torch.backends.mps.is_available():
        pytest.skip("Apple MPS present")
    assert resolve_device("auto") == torch.device("cpu")


@NO_CUDA
@pytest.mark.parametrize("choice", ["cuda", "cuda:0", torch.device("cuda")])
def test_asking_for_missing_cuda_is_a_clear_error(choice):
    with pytest.raises(DeviceError, match=r"not available here.*no CUDA GPU found"):
        resolve_device(choice)
    adapter = tiny_unet_adapter()
    with pytest.raises(DeviceError):
        predict_batches(adapter, torch.zeros(2, 1, 8, 8), device=choice)


def test_unknown_device_names_are_refused():
    for choice in ("gpu", "cuda:x", "tpu"):
        with pytest.raises(DeviceError, match="unknown device"):
            resolve_device(choice)
    assert issubclass(DeviceError, ValueError)


def _reference_probabilities(adapter, inputs: torch.Tensor) -> torch.Tensor:
    """The plain way: eval mode, no_grad, default memory layout, one batch."""
    network = adapter.network.eval()
    with torch.no_grad():
        return torch.softmax(network(inputs.contiguous()).float(), dim=1)


def test_inference_mode_channels_last_pass_equals_a_plain_no_grad_pass():
    torch.manual_seed(0)
    network = UNet2D(UNetConfig(base_channels=8, depth=2))
    bundle = ModelBundle.from_model(network, ["background", "fg"], PreprocessingConfig())
    inputs = torch.randn(5, 1, 32, 24)
    expected = _reference_probabilities(UNetBundleAdapter(bundle), inputs)
    adapter = UNetBundleAdapter(bundle)
    got = predict_batches(adapter, inputs, device="cpu", batch_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(got.argmax(1), expected.argmax(1))
    # an ordinary tensor: methods may use it in a loss that is back-propagated
    assert not got.is_inference() and got.is_contiguous()
    weights = torch.ones_like(got, requires_grad=True)
    (weights * got).sum().backward()
    # the network computed channels-last on the CPU, and still saves as a contiguous bundle
    conv = adapter.network.encoders[1][0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    assert not any(p.is_inference() for p in adapter.network.parameters())
    adapter.network.requires_grad_(True)  # still trainable after the first pass
    saved = adapter.to_bundle().state_dict
    assert all(t.is_contiguous() for t in saved.values())
    for name, value in network.state_dict().items():
        assert torch.equal(saved[name], value)


@pytest.mark.parametrize("shape", [(4, 2, 6, 5), (3, 4, 2, 3, 3), (2, 3, 7)])
def test_class_labels_equal_argmax_including_ties(shape):
    generator = torch.Generator().manual_seed(1)
    probabilities = torch.randint(0, 3, shape, generator=generator).float()  # many ties
    assert torch.equal(class_labels(probabilities), probabilities.argmax(1))
