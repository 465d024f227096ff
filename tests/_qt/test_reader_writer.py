"""The NIfTI reader and writers: placement from the affine, labels detection, exact round trips."""

from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest

from napari_uda._reader import napari_get_reader, placement_from_affine, read_nifti
from napari_uda._writer import write_image, write_labels


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
    with pytest.raises(ValueError, match="3D"):
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
