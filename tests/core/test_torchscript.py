"""Generic TorchScript models: the JSON spec, 2D slices and 3D sliding windows on the scan's grid,
capabilities and parameter groups, and adaptation through the engine on a scanner shift."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scripted_factory import TinyNet, base_spec, dice, save_model, synthetic_head, train_tiny

from napari_uda.adaptation.base import get_method
from napari_uda.adaptation.engine import AdaptationError, adapt
from napari_uda.adaptation.plan import recommended_settings
from napari_uda.core.inference import predict_volume
from napari_uda.core.models import BundleError, ModelSaveError, load_model
from napari_uda.core.models.adapter import BATCHNORM, NORM_AFFINE
from napari_uda.core.models.scripted import outputs_to_logits
from napari_uda.core.models.torchscript import ModelSpecError, TorchScriptAdapter
from napari_uda.core.models.volumetric import PatchTiling, VolumetricPrepared, importance_map
from napari_uda.core.volume import Volume

#: The target scanner's look: scalp much darker relative to brain than on the source scanner.
SHIFT = {"brain": 1.0, "scalp": 0.2}
SPEC_3D = {"patch_size": [16, 16, 16], "overlap": 0.25}


@pytest.fixture(scope="module")
def model_2d(tmp_path_factory):
    spec = base_spec(2)
    network = train_tiny(2, spec)
    return save_model(network, spec, tmp_path_factory.mktemp("ts2d"))


@pytest.fixture(scope="module")
def model_3d(tmp_path_factory):
    spec = base_spec(3, **SPEC_3D)
    network = train_tiny(3, spec)
    return save_model(network, spec, tmp_path_factory.mktemp("ts3d"))


@pytest.fixture(scope="module")
def shifted_case():
    return synthetic_head(7, **SHIFT)


# -- loading and prediction ----------------------------------------------------------------------
@pytest.mark.parametrize("which", ["model_2d", "model_3d"])
def test_loads_through_spec_and_predicts_on_the_scans_grid(which, request):
    path = request.getfixturevalue(which)
    model = load_model(path)
    assert isinstance(model, TorchScriptAdapter)
    assert model.spatial_dims == (2 if which == "model_2d" else 3)
    image, mask = synthetic_head(11)
    prepared = model.prepare(image)
    assert isinstance(prepared, VolumetricPrepared)
    assert prepared.inputs.dim() == model.spatial_dims + 2
    prediction = predict_volume(model, image, device="cpu")
    assert prediction.probabilities.shape == (2, *image.shape)
    np.testing.assert_allclose(prediction.probabilities.sum(0), 1.0, atol=1e-4)
    labels = prediction.label_volume()
    np.testing.assert_array_equal(labels.affine, image.affine)
    # Output grid = input grid: the (non-RAS) mask is found where it is, not flipped or shifted.
    assert dice(labels.data, mask.data) > 0.9
    flipped = np.flip(mask.data, axis=0)
    assert dice(labels.data, flipped) < dice(labels.data, mask.data) - 0.05


def test_the_spec_file_itself_opens_the_model(model_2d):
    by_spec = load_model(model_2d.with_suffix(".json"))
    by_file = load_model(model_2d)
    image, _ = synthetic_head(3)
    np.testing.assert_allclose(
        predict_volume(by_spec, image, device="cpu").probabilities,
        predict_volume(by_file, image, device="cpu").probabilities,
    )


def test_orientation_spacing_and_model_affine(tmp_path):
    """A network that works on LPS axes at 3 mm: the spec's orientation and spacing decide its
    grid, and everything comes back onto the scan's grid."""
    spec = base_spec(3, orientation="LPS", spacing=[3.0, 3.0, 3.0], pad_multiple=4)
    path = save_model(TinyNet(3).eval(), spec, tmp_path)
    model = load_model(path)
    image, _ = synthetic_head(1)
    prepared = model.prepare(image)
    assert prepared.model_spacing == pytest.approx((3.0, 3.0, 3.0), rel=0.1)
    # the model grid's first axis points left, the second posterior
    axes = prepared.model_affine[:3, :3]
    assert axes[0, 0] < 0 and axes[1, 1] < 0 and axes[2, 2] > 0
    # inputs -> source grid: the normalised image comes back where it was
    back = prepared.to_source_grid(prepared.inputs)[0]
    normalised = model.normalize(image.data)
    inside = image.data > 0.3
    assert np.corrcoef(back[inside], normalised[inside])[0, 1] > 0.9


def test_sliding_window_equals_whole_volume_inference(tmp_path, model_3d):
    """Overlapping windows stitched with Gaussian weights give what the whole volume gives
    (a network with a small receptive field and no batch statistics at inference)."""
    scripted = torch.jit.load(str(model_3d))
    image, _ = synthetic_head(4)
    whole = TorchScriptAdapter(scripted, model_spec(base_spec(3)))
    windows = TorchScriptAdapter(scripted, model_spec(base_spec(3, patch_size=[12, 14, 10])))
    assert windows.prepare(image).num_slices > 8
    p_whole = predict_volume(whole, image, device="cpu").probabilities
    p_windows = predict_volume(windows, image, device="cpu").probabilities
    interior = (slice(3, -3),) * 3
    assert np.abs(p_whole[1][interior] - p_windows[1][interior]).max() < 0.05


def test_patch_tiling_covers_and_stitches_exactly():
    channels = torch.rand(2, 23, 17, 30)
    tiling = PatchTiling.build(channels.shape[1:], (8, 8, 8), overlap=0.5)
    patches = tiling.split(channels)
    assert patches.shape[1:] == (2, 8, 8, 8)
    torch.testing.assert_close(tiling.merge(patches), channels)
    weights = importance_map((8, 8, 8))
    assert weights.min() > 0 and weights[4, 4, 4] > weights[0, 0, 0]


@pytest.mark.parametrize("activation", ["none", "softmax", "sigmoid"])
def test_output_activations_become_the_same_probabilities(activation):
    logit = torch.randn(3, 1, 5, 5)
    reference = torch.cat([1 - torch.sigmoid(logit), torch.sigmoid(logit)], 1)
    raw = {
        "none": logit,
        "softmax": reference,
        "sigmoid": torch.sigmoid(logit),
    }[activation]
    probabilities = torch.softmax(outputs_to_logits(raw, activation), 1)
    torch.testing.assert_close(probabilities, reference, atol=1e-5, rtol=1e-4)


def test_wrong_number_of_output_channels_is_one_line(tmp_path):
    spec = base_spec(2, class_names=["background", "grey", "white"])
    path = save_model(TinyNet(2).eval(), spec, tmp_path)
    image, _ = synthetic_head(0)
    with pytest.raises(BundleError, match="returned 2 channels") as error:
        predict_volume(load_model(path), image, device="cpu")
    assert "\n" not in str(error.value)


# -- the spec -----------------------------------------------------------------------------------
def model_spec(values: dict):
    from napari_uda.core.models.torchscript import TorchScriptSpec

    return TorchScriptSpec.from_dict(values)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"spatial_dims": 4}, "spatial_dims must be one of 2, 3, not 4"),
        ({"spatial_dims": "3"}, "spatial_dims must be one of 2, 3, not '3'"),
        ({"class_names": "brain"}, "class_names must be a list of names, not 'brain'"),
        ({"orientation": "RAA"}, "orientation must be 3 axis codes"),
        ({"overlap": "0.5"}, "overlap must be a finite number, not '0.5'"),
        ({"intensity_scale": float("nan")}, "intensity_scale must be a finite number"),
        ({"file": 3}, "file must be a non-empty string, not 3"),
        ({"patch_size": [100000] * 3}, r"patch_size\[0\] must be a whole number from 1 to 1024"),
        ({"patch_size": [1024] * 3}, "patch_size .* is too large"),
        ({"spacing": [1e-9] * 3}, r"spacing\[0\] must be at least 0.05"),
        ({"batch_size": True}, "batch_size must be a whole number"),
        ({"clip_percentiles": [1, 2, 3]}, "clip_percentiles must be a list of 2 numbers"),
        ({"class_names": ["brain"]}, "at least 2"),
        ({"orientation": "RAX"}, "orientation"),
        ({"spacing": [1, 0, 1]}, r"spacing\[1\] must be at least"),
        ({"normalization": "histogram"}, "normalization must be one of"),
        ({"output_activation": "relu"}, "output_activation"),
        ({"overlap": 1.0}, "overlap"),
        ({"patch_size": [16, 16]}, "patch_size must be a list of 3"),
        ({"trainable": "first_blocks", "first_blocks": []}, "lists no prefix"),
        ({"clip_percentiles": [99, 1]}, "clip_percentiles must be .* low below high"),
        ({"pach_size": [8, 8, 8]}, "unknown key 'pach_size'"),
        ({"output_activation": "sigmoid", "class_names": ["a", "b", "c"]}, "sigmoid"),
    ],
)
def test_bad_specs_give_one_line_errors(tmp_path, change, message):
    spec = {**base_spec(3), **change}
    path = save_model(TinyNet(3).eval(), base_spec(3), tmp_path)
    path.with_suffix(".json").write_text(json.dumps(spec))
    with pytest.raises(ModelSpecError, match=message) as error:
        load_model(path)
    assert "\n" not in str(error.value)
    assert str(path.with_suffix(".json")) in str(error.value)


def test_missing_spec_broken_json_and_non_torchscript_files(tmp_path):
    pt = tmp_path / "net.pt"
    torch.jit.save(torch.jit.script(TinyNet(2).eval()), str(pt))
    with pytest.raises(ModelSpecError, match="no model spec"):
        load_model(pt)
    pt.with_suffix(".json").write_text("{not json")
    with pytest.raises(ModelSpecError, match="not valid JSON"):
        load_model(pt)
    state = tmp_path / "weights.pt"
    torch.save(TinyNet(2).state_dict(), state)
    state.with_suffix(".json").write_text(json.dumps(base_spec(2)))
    with pytest.raises(BundleError, match="not a TorchScript model") as error:
        load_model(state)
    assert "\n" not in str(error.value)
    base = base_spec(2, first_blocks=["encoder."])
    pt.with_suffix(".json").write_text(json.dumps(base))
    with pytest.raises(ModelSpecError, match="first_blocks"):
        load_model(pt)


# -- capabilities and parameter groups ---------------------------------------------------------
def test_capabilities_follow_the_normalisation_layers(tmp_path):
    scripted_bn = load_model(save_model(TinyNet(2).eval(), base_spec(2), tmp_path / "a"))
    # scripted BatchNorm: its statistics can be re-estimated (AdaBN)
    assert scripted_bn.capabilities == {NORM_AFFINE, BATCHNORM}
    assert scripted_bn.info().details["notes"] == ""
    assert not get_method("adabn").unmet_needs(scripted_bn.capabilities)
    # a trace fixed BatchNorm in evaluation mode: AdaBN cannot use it, and the model says why
    traced_bn = load_model(save_model(TinyNet(2).eval(), base_spec(2), tmp_path / "b", trace=True))
    assert traced_bn.capabilities == {NORM_AFFINE}
    assert "traced" in traced_bn.info().details["notes"]
    assert get_method("adabn").unmet_needs(traced_bn.capabilities)
    assert len(traced_bn.parameter_groups()["norm"]) == 4  # two BatchNorm layers' scale, shift
    instance = load_model(
        save_model(TinyNet(2, norm="instance").eval(), base_spec(2), tmp_path / "c")
    )
    assert instance.capabilities == set()
    assert instance.info().norm_type == "instance (no affine)"
    assert "norm" not in instance.parameter_groups()
    reasons = get_method("tent").unmet_needs(instance.capabilities)
    assert reasons and "affine" in reasons[0]
    assert get_method("udas").unmet_needs(scripted_bn.capabilities)  # no early head
    assert not get_method("adaent").unmet_needs(instance.capabilities)
    # AdaEnt's default trains norm parameters, which the instance-norm model lacks
    adaent = get_method("adaent")
    assert recommended_settings(instance, adaent) == {"parameters": "all"}
    assert recommended_settings(scripted_bn, adaent) == {}


def test_first_blocks_setting_limits_what_methods_train(model_2d, shifted_case):
    model = load_model(model_2d, trainable="first_blocks")
    groups = model.parameter_groups()
    names = dict(model.scripted.named_parameters())
    first = {id(p) for n, p in names.items() if n.startswith("stem.")}
    assert {id(p) for p in groups["all"]} == first
    assert len(groups["every"]) == len(names) > len(groups["all"])
    image, _ = shifted_case
    # AdaEnt updates only norm layers by default; "all" means the adapter's trainable set
    result = adapt(model, image, "adaent", {"epochs": 1, "parameters": "all"}, device="cpu", seed=0)
    before = dict(model.scripted.named_parameters())
    after = dict(result.model.scripted.named_parameters())
    changed = {n for n in names if not torch.equal(before[n], after[n])}
    assert changed and all(n.startswith("stem.") for n in changed)


# -- adaptation on a scanner shift --------------------------------------------------------------
@pytest.mark.parametrize(
    ("which", "method"),
    [
        ("model_2d", "adaent"),
        ("model_2d", "distillation"),
        ("model_3d", "mean_teacher"),
        ("model_3d", "distillation"),
    ],
)
def test_adaptation_raises_dice_on_a_scanner_shift(which, method, request, shifted_case):
    model = load_model(request.getfixturevalue(which))
    image, mask = shifted_case
    result = adapt(model, image, method, {"epochs": 2}, reference=mask, device="cpu", seed=0)
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after > before + 0.02, (before, after)
    assert dice(result.prediction.labels, mask.data) == pytest.approx(after, abs=1e-6)
    # the user's model is untouched
    again = predict_volume(model, image, device="cpu")
    assert dice(again.labels, mask.data) == pytest.approx(before, abs=1e-6)


@pytest.mark.parametrize("method", ["adabn", "st"])
def test_scripted_batchnorm_is_reestimated_on_the_target(method, model_2d, shifted_case):
    """AdaBN, and ST's target statistics, re-estimate a TorchScript model's BatchNorm."""
    model = load_model(model_2d)
    image, mask = shifted_case
    settings = {"epochs": 1} if method == "st" else {}
    result = adapt(model, image, method, settings, reference=mask, device="cpu", seed=0)
    before, after = result.reference_dice_before[0], result.reference_dice_after[0]
    assert after > before + 0.1, (before, after)
    buffers = dict(model.scripted.named_buffers())
    changed = [
        name
        for name, value in result.model.scripted.named_buffers()
        if not torch.equal(value, buffers[name])
    ]
    assert any(name.endswith("running_mean") for name in changed)
    if method == "adabn":  # only statistics change, and the model stops tracking afterwards
        assert result.extra["batchnorm_layers_reestimated"] == 2
        parameters = dict(model.scripted.named_parameters())
        assert all(
            torch.equal(value, parameters[name])
            for name, value in result.model.scripted.named_parameters()
        )
    assert result.model.network.batchnorm_statistics is None
    again = predict_volume(model, image, device="cpu")  # the user's model is untouched
    assert dice(again.labels, mask.data) == pytest.approx(before, abs=1e-6)


def test_methods_that_cannot_apply_are_refused_with_the_reason(tmp_path, shifted_case):
    model = load_model(save_model(TinyNet(3, norm="instance").eval(), base_spec(3), tmp_path))
    with pytest.raises(AdaptationError, match="affine"):
        adapt(model, shifted_case[0], "tent", device="cpu")


def test_save_writes_a_model_that_loads_back(tmp_path, model_2d, shifted_case):
    image, _ = shifted_case
    adapted = adapt(load_model(model_2d), image, "adaent", {"epochs": 1}, device="cpu").model
    saved = adapted.save(tmp_path / "out" / "adapted.pt")
    assert saved.exists() and saved.with_suffix(".json").exists()
    reopened = load_model(saved)
    np.testing.assert_allclose(
        predict_volume(reopened, image, device="cpu").probabilities,
        predict_volume(adapted, image, device="cpu").probabilities,
        atol=1e-5,
    )


def test_save_never_writes_over_the_input_model(tmp_path, model_2d):
    model = load_model(model_2d)
    before = model_2d.read_bytes(), model_2d.with_suffix(".json").read_text()
    with pytest.raises(ModelSaveError, match="never overwritten"):
        model.save(model_2d)
    by_spec = load_model(model_2d.with_suffix(".json"))  # the .pt it names is an input too
    with pytest.raises(ModelSaveError, match="never overwritten"):
        by_spec.save(model_2d)
    with pytest.raises(ModelSaveError, match=r"saved as TorchScript"):
        model.save(tmp_path / "adapted.safetensors")
    assert (model_2d.read_bytes(), model_2d.with_suffix(".json").read_text()) == before
    assert [p.name for p in model.saved_files(tmp_path / "a.pt")] == ["a.pt", "a.json"]


def test_cli_adapt_saves_an_adapted_torchscript_model(tmp_path, model_2d, shifted_case):
    """``napari-uda adapt --save-model`` on a TorchScript model writes TorchScript + spec that
    reopen to the same prediction as the mask the command wrote."""
    from napari_uda.cli import main
    from napari_uda.core.volume import load_volume, save_volume

    image, _ = shifted_case
    scan = save_volume(image, tmp_path / "scan.nii.gz")
    out, saved = tmp_path / "seg.nii.gz", tmp_path / "models" / "adapted.pt"
    args = ["adapt", "--model", str(model_2d), "--image", str(scan), "--method", "adaent"]
    args += ["--set", "epochs=1", "--out", str(out), "--device", "cpu", "--quiet"]
    # one AdaEnt epoch on this tiny model does not look better to the gate, which would save
    # the unadapted weights (tested below); --no-gate keeps what the adaptation made
    assert main([*args, "--no-gate", "--save-model", str(saved)]) == 0
    spec = json.loads(saved.with_suffix(".json").read_text())
    assert spec["provenance"]["adapted"]["method"] == "adaent"
    assert spec["provenance"]["adapted"]["gate"]["kept"] == "adapted"
    assert spec["provenance"]["adapted"]["from"] == str(model_2d)
    reopened = load_model(saved)
    labels = predict_volume(reopened, load_volume(scan), device="cpu").labels
    np.testing.assert_array_equal(labels, load_volume(out).data)
    original = predict_volume(load_model(model_2d), load_volume(scan), device="cpu").labels
    assert not np.array_equal(labels, original)  # it is the adapted model, not a copy
    # wrong suffix, the input model, or a spec that is another output: refused, nothing written
    before = model_2d.read_bytes()
    for bad in (str(tmp_path / "x.safetensors"), str(model_2d)):
        assert main([*args, "--save-model", bad]) == 2
    report = ["--report", str(tmp_path / "y.json")]
    assert main([*args, "--save-model", str(tmp_path / "y.pt"), *report]) == 2
    assert model_2d.read_bytes() == before
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "y.pt").exists()
    # gated (the default): the saved model's provenance says which weights it holds
    gated = tmp_path / "gated" / "model.pt"
    assert main([*args, "--save-model", str(gated)]) == 0
    kept = json.loads(gated.with_suffix(".json").read_text())["provenance"]["adapted"]["gate"]
    gated_labels = predict_volume(load_model(gated), load_volume(scan), device="cpu").labels
    assert np.array_equal(gated_labels, original) == (kept["kept"] == "source")


# -- memory: 3D batches are clamped, whole volumes of different shapes stack -------------------
def test_training_batches_go_through_in_checkpointed_chunks(monkeypatch):
    """However many windows a method puts in a batch, one forward pass with gradients takes at
    most TRAINING_VOXELS voxels; the chunks are checkpointed, and give the same gradients."""
    from napari_uda.core.models import scripted
    from napari_uda.core.models.scripted import LogitsNetwork

    network = LogitsNetwork(torch.jit.script(TinyNet(3).eval()), "none", 2, 8)
    window = torch.zeros(1, 1, 128, 128, 128)
    assert network.chunk_size(window, training=True) == 2  # 3D windows: 2 per pass
    assert network.chunk_size(window, training=False) == 4  # spec batch 8, clamped to 4
    assert network.chunk_size(torch.zeros(1, 1, 256, 256), training=True) == 64  # 2D slices
    inputs = torch.randn(5, 1, 8, 8, 8)
    whole = network(inputs)
    whole.square().mean().backward()
    expected = [p.grad.clone() for p in network.parameters()]
    network.zero_grad()
    monkeypatch.setattr(scripted, "TRAINING_VOXELS", 2 * 8**3)
    sizes = []
    run = network._run
    monkeypatch.setattr(network, "_run", lambda x, **kw: sizes.append(len(x)) or run(x, **kw))
    chunked = network(inputs)
    assert sizes == [2, 2, 1]
    torch.testing.assert_close(chunked, whole)
    chunked.square().mean().backward()
    for parameter, gradient in zip(network.parameters(), expected):
        torch.testing.assert_close(parameter.grad, gradient, rtol=1e-4, atol=1e-6)
    assert sorted(sizes[3:]) == [1, 2, 2]  # each chunk recomputed in the backward pass
    with torch.no_grad():
        network(inputs)
    assert sizes[6:] == [5]  # without gradients: the spec's batch size (8) fits 5 small inputs


def test_whole_volumes_of_different_shapes_adapt_together(tmp_path):
    """Whole-volume 3D inputs of two heads of different sizes are padded to a common shape with
    a valid mask; each prediction is the adapted model's on its own head."""
    spec = base_spec(3, pad_multiple=4)
    model = load_model(save_model(train_tiny(3, spec, steps=30), spec, tmp_path))
    small, small_mask = synthetic_head(7, **SHIFT)
    large, _ = synthetic_head(8, **SHIFT)
    large = Volume(np.pad(large.data, ((0, 6), (0, 0), (0, 9)), mode="edge"), large.affine)
    prepared = [model.prepare(v) for v in (small, large)]
    assert prepared[0].inputs.shape != prepared[1].inputs.shape
    own_shapes = [p.inputs.shape for p in prepared]
    from napari_uda.adaptation.targets import TargetSet

    targets = TargetSet(prepared)
    inputs, mask, ranges = targets.inputs, targets.valid_mask, targets.ranges
    assert [p.inputs.shape for p in prepared] == own_shapes  # nothing modified in place
    assert inputs.shape[0] == 2 and ranges == [(0, 1), (1, 2)]
    assert mask is not None and mask.shape == (2, 1, *inputs.shape[2:])
    assert int(mask[0].sum()) == np.prod(prepared[0].model_shape)  # padding is not valid
    result = adapt(
        model, [small, large], "adaent", {"epochs": 1, "parameters": "all"},
        reference=small_mask, device="cpu", seed=0,
    )  # fmt: skip
    assert [p.labels.shape for p in result.predictions] == [small.shape, large.shape]
    interior = (slice(None), *(slice(3, -3),) * 3)  # the padding differs only at the edges
    for volume, prediction in zip((small, large), result.predictions):
        own = predict_volume(result.model, volume, device="cpu").probabilities
        np.testing.assert_allclose(prediction.probabilities[interior], own[interior], atol=1e-4)
    assert result.reference_dice_after[0] == pytest.approx(
        dice(result.predictions[0].labels, small_mask.data), abs=1e-6
    )


def test_cpu_bfloat16_runs_the_network_in_bfloat16_and_survives_copies(tmp_path):
    import copy
    import pickle

    from napari_uda.core.models.scripted import LogitsNetwork

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.conv3d(x, torch.ones(2, 1, 1, 1, 1))
            return y + (y.dtype == torch.bfloat16)  # marks a bfloat16 computation with +1

    scripted = torch.jit.script(Probe())
    inputs = torch.full((1, 1, 2, 2, 2), 0.5)
    plain = LogitsNetwork(scripted, "none", 2)
    fast = LogitsNetwork(scripted, "none", 2, cpu_bfloat16=True)
    assert torch.equal(plain(inputs), torch.full((1, 2, 2, 2, 2), 0.5))
    logits = fast(inputs)
    assert logits.dtype == torch.float32 and torch.equal(logits, torch.full_like(logits, 1.5))
    for twin in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert twin.cpu_bfloat16 and torch.equal(twin(inputs), logits)


def test_cpu_bfloat16_training_only_in_passes_with_gradients():
    """cpu_bfloat16_training: the passes with gradients (training steps) compute in bfloat16,
    the passes without (predictions, evaluations) in float32; it survives copies."""
    import copy
    import pickle

    from napari_uda.core.models.scripted import LogitsNetwork

    class Probe(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(2, 1, 1, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = torch.nn.functional.conv3d(x, self.weight)
            return y + (y.dtype == torch.bfloat16)  # marks a bfloat16 computation with +1

    inputs = torch.full((1, 1, 2, 2, 2), 0.5)
    network = LogitsNetwork(torch.jit.script(Probe()), "none", 2, cpu_bfloat16_training=True)
    for twin in (network, copy.deepcopy(network), pickle.loads(pickle.dumps(network))):
        with torch.no_grad():
            assert torch.equal(twin(inputs), torch.full((1, 2, 2, 2, 2), 0.5))
        trained = twin(inputs)
        assert trained.requires_grad and torch.equal(trained, torch.full_like(trained, 1.5))
        trained.sum().backward()
        assert twin.scripted.weight.grad is not None
    assert not network.uses_bfloat16(torch.device("cuda"), training=True)  # CPU only


def test_deepbet_bfloat16_is_opt_in():
    from napari_uda.core.device import cpu_bfloat16_supported
    from napari_uda.core.models.deepbet import deepbet_missing_reason

    if deepbet_missing_reason():
        pytest.skip(deepbet_missing_reason())
    assert not load_model("deepbet").network.cpu_bfloat16  # float32: deepbet's own result
    assert load_model("deepbet", bfloat16=True).network.cpu_bfloat16
    supported = cpu_bfloat16_supported()
    assert load_model("deepbet", bfloat16=None).network.cpu_bfloat16 == supported
    assert not load_model("deepbet").network.cpu_bfloat16_training
    assert load_model("deepbet", bfloat16_training=True).network.cpu_bfloat16_training
    assert load_model("deepbet", bfloat16_training=None).network.cpu_bfloat16_training == supported
