"""The NIfTI reader and writers: placement from the affine, labels detection, exact round trips."""

from __future__ import annotations

import math
import warnings

import nibabel as nib
import numpy as np
import pytest

from napari_uda._reader import napari_get_reader, placement_from_affine, read_nifti
from napari_uda._writer import LayerWriteError, write_image, write_labels


def _save(path, data, affine, **header_fields):
    image = nib.Nifti1Image(data, affine)
    for key, value in header_fields.items():
        image.header[key] = value
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, str(path))
    return path


def _world(affine, voxel):
    return (affine @ np.append(voxel, 1.0))[:3]


def _oblique_affine(degrees=15.0, spacing=(1.0, 1.2, 3.0)):
    angle = math.radians(degrees)
    rotation = np.array(
        [[1, 0, 0], [0, math.cos(angle), -math.sin(angle)], [0, math.sin(angle), math.cos(angle)]]
    )
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag(spacing)
    affine[:3, 3] = (-20.0, 15.0, 40.0)
    return affine


@pytest.fixture
def image_path(tmp_path):
    rng = np.random.default_rng(0)
    data = rng.normal(100, 30, (12, 10, 8)).astype(np.float32)
    affine = np.array(
        [[-2.0, 0, 0, 90.0], [0, 2.5, 0, -120.0], [0, 0, 3.0, -70.0], [0, 0, 0, 1]]
    )  # LAS, anisotropic
    return _save(tmp_path / "head.nii.gz", data, affine, descrip=b"scanner X")


def test_reader_only_claims_nifti(tmp_path):
    assert napari_get_reader(str(tmp_path / "a.nii.gz")) is read_nifti
    assert napari_get_reader(str(tmp_path / "a.nii")) is read_nifti
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.nii.gz")]) is read_nifti
    assert napari_get_reader(str(tmp_path / "a.tif")) is None
    assert napari_get_reader([str(tmp_path / "a.nii"), str(tmp_path / "b.png")]) is None


def test_image_is_placed_in_mm_from_the_affine(image_path):
    [(data, kwargs, kind)] = read_nifti(str(image_path))
    affine = nib.load(str(image_path)).affine
    assert kind == "image" and data.shape == (12, 10, 8)
    assert kwargs["name"] == "head"
    assert kwargs["scale"] == pytest.approx((2.0, 2.5, 3.0))
    np.testing.assert_allclose(kwargs["metadata"]["affine"], affine)
    assert kwargs["metadata"]["axcodes"] == "LAS"
    assert kwargs["metadata"]["nifti_header"]["descrip"].tobytes().startswith(b"scanner X")
    # distances between any two voxels in napari equal the distances in the scanner (mm)
    napari_position = lambda v: np.array(kwargs["translate"]) + np.array(kwargs["scale"]) * v  # noqa: E731
    first, second = np.array([0, 0, 0]), np.array([11, 3, 7])
    assert np.linalg.norm(napari_position(second) - napari_position(first)) == pytest.approx(
        np.linalg.norm(_world(affine, second) - _world(affine, first))
    )
    # a RAS+ file lands exactly on scanner coordinates
    ras = affine.copy()
    ras[0, 0] = 2.0
    scale, translate, obliquity = placement_from_affine(ras)
    assert obliquity == 0
    np.testing.assert_allclose(np.array(translate) + np.array(scale) * second, _world(ras, second))


def test_integer_mask_opens_as_labels_and_image_as_image(tmp_path):
    mask = np.zeros((8, 8, 4), np.uint8)
    mask[2:6, 2:6, 1:3] = 1
    labels_path = _save(tmp_path / "mask.nii", mask, np.eye(4))
    ramp = np.arange(256, dtype=np.int16).reshape(8, 8, 4) * 10
    image_path = _save(tmp_path / "t1.nii.gz", ramp, np.eye(4))
    [(labels, _, kind)] = read_nifti(str(labels_path))
    assert kind == "labels" and np.issubdtype(labels.dtype, np.integer)
    np.testing.assert_array_equal(labels, mask)
    assert read_nifti(str(image_path))[0][2] == "image"


def test_oblique_scan_warns_and_keeps_spacing(tmp_path):
    affine = _oblique_affine(15.0)
    path = _save(tmp_path / "oblique.nii.gz", np.ones((6, 6, 6), np.float32), affine)
    with pytest.warns(UserWarning, match=r"oblique \(tilted 15\.0°"):
        [(_, kwargs, _)] = read_nifti(str(path))
    assert kwargs["scale"] == pytest.approx((1.0, 1.2, 3.0))
    np.testing.assert_allclose(kwargs["metadata"]["affine"], affine)


def _meta(kwargs):
    return {
        "metadata": kwargs["metadata"],
        "scale": kwargs["scale"],
        "translate": kwargs["translate"],
    }


def test_writers_restore_the_source_affine_and_header(image_path, tmp_path):
    [(data, kwargs, _)] = read_nifti(str(image_path))
    source = nib.load(str(image_path))
    mask = (data > 100).astype(np.int32)
    [written_mask] = write_labels(str(tmp_path / "out" / "mask.nii.gz"), mask, _meta(kwargs))
    [written_image] = write_image(
        str(tmp_path / "image.nii"), data.astype(np.float64), _meta(kwargs)
    )
    for path, expected, dtype in (
        (written_mask, mask, np.uint8),
        (written_image, data, np.float32),
    ):
        saved = nib.load(path)
        np.testing.assert_allclose(saved.affine, source.affine)
        assert saved.header["descrip"] == source.header["descrip"]
        assert saved.get_data_dtype() == dtype
        np.testing.assert_allclose(np.asanyarray(saved.dataobj), expected)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["mask.nii.gz"]  # no temp left


def test_oblique_round_trip_is_exact(tmp_path):
    affine = _oblique_affine(30.0)
    labels = np.zeros((6, 7, 5), np.uint8)
    labels[1:4, 2:5, 1:3] = 2
    path = _save(tmp_path / "oblique_mask.nii.gz", labels, affine)
    with pytest.warns(UserWarning):
        [(data, kwargs, kind)] = read_nifti(str(path))
    assert kind == "labels"
    [written] = write_labels(str(tmp_path / "again.nii.gz"), data, _meta(kwargs))
    saved = nib.load(written)
    np.testing.assert_allclose(saved.affine, affine, atol=1e-6)
    np.testing.assert_array_equal(np.asanyarray(saved.dataobj), labels)


def test_layer_without_metadata_is_written_from_scale_and_translate(tmp_path):
    data = np.zeros((4, 5, 6), np.uint16)
    data[1, 2, 3] = 300
    meta = {"metadata": {}, "scale": (1.0, 2.0, 3.0), "translate": (10.0, -5.0, 2.0)}
    [written] = write_labels(str(tmp_path / "plain.nii.gz"), data, meta)
    saved = nib.load(written)
    np.testing.assert_allclose(saved.affine[:3, :3], np.diag([1.0, 2.0, 3.0]))
    np.testing.assert_allclose(saved.affine[:3, 3], [10.0, -5.0, 2.0])
    assert saved.get_data_dtype() == np.uint16


def test_writers_reject_bad_input(tmp_path):
    with pytest.raises(LayerWriteError, match="3D"):
        write_image(str(tmp_path / "flat.nii.gz"), np.zeros((4, 4)), {"metadata": {}})
    with pytest.raises(ValueError, match=r"\.nii"):
        write_labels(str(tmp_path / "mask.tif"), np.zeros((2, 2, 2), np.uint8), {"metadata": {}})


def test_napari_opens_and_saves_through_the_plugin(make_napari_viewer, image_path, tmp_path):
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(image_path), plugin="napari-uda")
    assert layer.name == "head"
    np.testing.assert_allclose(layer.scale, (2.0, 2.5, 3.0))
    mask = viewer.add_labels(
        (np.asarray(layer.data) > 100).astype(np.uint8),
        scale=layer.scale,
        translate=layer.translate,
        metadata=dict(layer.metadata),
        name="mask",
    )
    out = tmp_path / "saved_mask.nii.gz"
    viewer.layers.selection = {mask}
    written = viewer.layers.save(str(out), selected=True, plugin="napari-uda")
    assert [str(out)] == [str(p) for p in written]
    np.testing.assert_allclose(nib.load(str(out)).affine, nib.load(str(image_path)).affine)
    [reopened] = viewer.open(str(out), plugin="napari-uda")
    assert reopened.__class__.__name__ == "Labels"
    np.testing.assert_array_equal(reopened.data, mask.data)


def test_writer_never_replaces_the_layers_own_file(make_napari_viewer, image_path):
    """Saving a layer (or a mask made from the scan, which carries its source_path) over the
    file it came from is refused; the scan stays as it was."""
    before = image_path.read_bytes()
    [(data, kwargs, _)] = read_nifti(str(image_path))
    meta = {"metadata": kwargs["metadata"], "scale": kwargs["scale"]}
    with pytest.raises(LayerWriteError, match="is the file this layer was read from"):
        write_image(str(image_path), data, meta)
    with pytest.raises(LayerWriteError, match="is the file this layer was read from"):
        write_labels(str(image_path), (data > 100).astype(np.uint8), meta)
    assert image_path.read_bytes() == before
    mask_path = _save(image_path.parent / "mask.nii.gz", (data > 100).astype(np.uint8), np.eye(4))
    mask_before = mask_path.read_bytes()
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(mask_path), plugin="napari-uda")
    layer.data[0, 0, 0] = 1 - layer.data[0, 0, 0]  # an edit the user might save in place
    viewer.layers.selection = {layer}
    with pytest.raises(Exception, match="is the file this layer was read from"):
        viewer.layers.save(str(mask_path), selected=True, plugin="napari-uda")
    assert mask_path.read_bytes() == mask_before


@pytest.mark.parametrize(
    ("low", "high", "dtype"),
    [(0, 255, np.uint8), (-5, 300, np.int16), (0, 60000, np.uint16), (0, 2**31 - 1, np.int32)],
)
def test_labels_are_written_in_a_type_that_holds_them(tmp_path, low, high, dtype):
    data = np.zeros((3, 3, 3), np.int64)
    data[0, 0, 0], data[1, 1, 1] = low, high
    out = tmp_path / "labels.nii.gz"
    write_labels(str(out), data, {"metadata": {}})
    saved = nib.load(str(out))
    assert saved.get_data_dtype() == dtype
    np.testing.assert_array_equal(np.asarray(saved.dataobj), data)


@pytest.mark.parametrize("label", [2**31, -(2**31) - 1, 2**40])
def test_labels_beyond_32_bits_are_refused_not_written_as_zero(tmp_path, label):
    data = np.zeros((3, 3, 3), np.int64)
    data[1, 1, 1] = label
    out = tmp_path / "labels.nii.gz"
    with pytest.raises(LayerWriteError, match="do not fit in a 32-bit label map"):
        write_labels(str(out), data, {"metadata": {}})
    assert not out.exists()


@pytest.mark.parametrize("broken", ["zero column", "singular"])
def test_broken_affines_are_one_line_in_the_reader_and_the_writer(tmp_path, broken):
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    if broken == "zero column":
        affine[:3, 2] = 0
    else:
        affine[:3, 2] = affine[:3, 1]
    image = nib.Nifti1Image(np.random.default_rng(0).random((6, 6, 6)).astype(np.float32), None)
    image.header.set_sform(affine, code=1)  # as a broken file has it (nibabel would not make it)
    path = tmp_path / "broken.nii"
    nib.save(image, str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "oblique 90°" warning on the way to the error
        with pytest.raises(ValueError) as caught:
            read_nifti(str(path))
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert ("zero size" if broken == "zero column" else "singular") in message
    with pytest.raises(LayerWriteError, match="zero size"):
        meta = {"metadata": {}, "scale": (1, 0, 1)}
        write_image(str(tmp_path / "out.nii.gz"), np.ones((4, 4, 4)), meta)
