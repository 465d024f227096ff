"""NIfTI volumes: round trips keep grid and header; canonical orientation; atomic writes."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from volume_factory import ANISOTROPIC, ORIENTATIONS, affine_for, head_like

from napari_uda.core.volume import (
    Volume,
    VolumeError,
    atomic_output,
    load_volume,
    looks_like_labels,
    output_dtype,
    save_volume,
)

SHAPE = (14, 16, 12)


def write_nifti(path: Path, data: np.ndarray, affine: np.ndarray, **header_fields) -> Path:
    image = nib.Nifti1Image(data, affine)
    for key, value in header_fields.items():
        image.header[key] = value
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=2)
    nib.save(image, path)
    return path


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("axcodes", ORIENTATIONS)
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_round_trip_keeps_grid_data_and_header(tmp_path, axcodes, suffix):
    image, _ = head_like(SHAPE)
    affine = affine_for(axcodes)
    source = write_nifti(tmp_path / f"scan{suffix}", image, affine, descrip=b"test scan")
    before = digest(source)

    volume = load_volume(source)
    assert volume.shape == SHAPE
    assert volume.axcodes == axcodes
    assert volume.spacing == pytest.approx(ANISOTROPIC)
    np.testing.assert_array_equal(volume.data, image)
    np.testing.assert_allclose(volume.affine, affine)

    written = save_volume(volume, tmp_path / f"copy{suffix}")
    again = nib.load(written)
    assert again.shape == SHAPE
    np.testing.assert_allclose(again.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(again.dataobj), image)
    assert again.get_data_dtype() == np.float32
    assert again.header["descrip"].tobytes().rstrip(b"\0") == b"test scan"
    assert again.header.get_xyzt_units() == ("mm", "sec")
    assert int(again.header["qform_code"]) == 1
    assert int(again.header["sform_code"]) == 2
    assert digest(source) == before, "reading and writing must never modify the input"


def test_label_volume_written_on_the_image_grid_with_a_chosen_dtype(tmp_path):
    image, mask = head_like(SHAPE)
    affine = affine_for(("L", "S", "A"))
    volume = load_volume(write_nifti(tmp_path / "scan.nii.gz", image, affine))

    labels = volume.with_data(mask.astype(np.int64))
    written = nib.load(save_volume(labels, tmp_path / "mask.nii.gz", dtype=np.int16))
    assert written.get_data_dtype() == np.int16
    assert float(written.header["cal_max"]) == 0.0  # the image's display range is not kept
    np.testing.assert_allclose(written.affine, affine, atol=1e-5)
    np.testing.assert_array_equal(np.asanyarray(written.dataobj), mask)

    default = nib.load(save_volume(labels, tmp_path / "default.nii.gz"))
    assert default.get_data_dtype() == np.uint8


def test_output_dtype_avoids_types_readers_handle_badly():
    assert output_dtype(np.zeros(3, bool)) == np.uint8
    assert output_dtype(np.array([0, 4], np.int64)) == np.uint8
    assert output_dtype(np.array([-1, 300], np.int64)) == np.int16
    assert output_dtype(np.zeros(3, np.float16)) == np.float32
    assert output_dtype(np.zeros(3, np.float64)) == np.float64
    assert output_dtype(np.zeros(3, np.uint16)) == np.uint16


def test_new_volume_without_header_is_written_with_scanner_codes(tmp_path):
    affine = affine_for(("R", "A", "S"), (1.0, 1.0, 1.0))
    written = nib.load(save_volume(Volume(np.ones((3, 4, 5), bool), affine), tmp_path / "m.nii"))
    assert written.get_data_dtype() == np.uint8
    assert int(written.header["qform_code"]) == 1 and int(written.header["sform_code"]) == 1
    np.testing.assert_allclose(written.affine, affine)


@pytest.mark.parametrize("axcodes", [*ORIENTATIONS, ("P", "I", "R")])
def test_canonical_orientation_and_back(axcodes):
    image, _ = head_like(SHAPE)
    volume = Volume(image, affine_for(axcodes))

    canonical = volume.to_canonical()
    assert canonical.axcodes == ("R", "A", "S")
    assert canonical.shape == volume.canonical_shape
    np.testing.assert_allclose(canonical.affine, volume.canonical_affine)
    # the same voxel sits at the same place in the world on both grids
    index = np.array([2, 5, 7, 1])
    world = volume.affine @ index
    canonical_index = np.linalg.solve(canonical.affine, world)
    value = canonical.data[tuple(np.round(canonical_index[:3]).astype(int))]
    assert value == image[tuple(index[:3])]

    np.testing.assert_array_equal(volume.from_canonical(canonical.data).data, image)
    with_classes = np.stack([canonical.data, -canonical.data], axis=-1)
    back = volume.from_canonical(with_classes).data
    np.testing.assert_array_equal(back[..., 1], -image)
    with pytest.raises(VolumeError, match="does not fit"):
        volume.from_canonical(np.zeros((1, 2, 3)))


def test_with_data_keeps_the_grid_and_checks_the_shape():
    volume = Volume(np.zeros(SHAPE, np.float32), affine_for(("L", "A", "S")))
    labels = volume.with_data(np.ones(SHAPE, np.uint8))
    np.testing.assert_array_equal(labels.affine, volume.affine)
    with pytest.raises(VolumeError):
        volume.with_data(np.zeros((2, 2, 2)))


def test_failed_write_leaves_existing_file_untouched_and_no_partial_file(tmp_path, monkeypatch):
    target = tmp_path / "out.nii.gz"
    target.write_bytes(b"previous result")
    volume = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))

    def broken_save(image, filename):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(nib, "save", broken_save)
    with pytest.raises(VolumeError, match=r"out\.nii\.gz: cannot be written .*disk full"):
        save_volume(volume, target)
    with pytest.raises(VolumeError):
        save_volume(volume, tmp_path / "new.nii")
    assert target.read_bytes() == b"previous result"
    assert files_in(tmp_path) == ["out.nii.gz"]


def test_atomic_output_replaces_only_on_success_with_normal_permissions(tmp_path):
    target = tmp_path / "sub" / "result.json"
    with atomic_output(target) as temporary:
        temporary.write_text("{}")
        assert not target.exists()
    assert target.read_text() == "{}"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~umask

    with pytest.raises(RuntimeError), atomic_output(target) as temporary:
        temporary.write_text("partial")
        raise RuntimeError("interrupted")
    assert target.read_text() == "{}"
    assert files_in(target.parent) == ["result.json"]


def test_overwrite_can_be_refused_and_output_must_be_nifti(tmp_path):
    volume = Volume(np.zeros((4, 4, 4), np.float32), np.eye(4))
    path = save_volume(volume, tmp_path / "a.nii")
    with pytest.raises(VolumeError, match="exists already"):
        save_volume(volume, path, overwrite=False)
    with pytest.raises(VolumeError, match=r"must end in \.nii"):
        save_volume(volume, tmp_path / "a.png")


def bad_inputs(folder: Path) -> dict[str, tuple[Path, str]]:
    """Each bad input file with a word its error message must contain."""
    affine = np.eye(4)
    nan = np.ones((4, 4, 4), np.float32)
    nan[1, 2, 3] = np.nan
    inf = np.ones((4, 4, 4), np.float32)
    inf[0, 0, 0] = np.inf
    (folder / "folder.nii").mkdir()
    (folder / "garbage.nii.gz").write_bytes(os.urandom(300))
    (folder / "text.nii").write_text("not an image\nat all\n")
    (folder / "scan.png").write_bytes(b"\x89PNG\r\n")
    cases = {
        "missing": (folder / "missing.nii.gz", "no such file"),
        "folder": (folder / "folder.nii", "folder"),
        "suffix": (folder / "scan.png", "not a NIfTI"),
        "garbage": (folder / "garbage.nii.gz", "cannot be read"),
        "text": (folder / "text.nii", "cannot be read"),
        "4D": (write_nifti(folder / "4d.nii", np.ones((4, 4, 4, 3), np.float32), affine), "4D"),
        "2D": (write_nifti(folder / "2d.nii", np.ones((4, 4), np.float32), affine), "2D"),
        "NaN": (write_nifti(folder / "nan.nii.gz", nan, affine), "NaN"),
        "inf": (write_nifti(folder / "inf.nii.gz", inf, affine), "infinite"),
        "complex": (
            write_nifti(folder / "complex.nii", np.ones((4, 4, 4), np.complex64), affine),
            "complex",
        ),
    }
    return cases


def test_bad_inputs_give_one_line_naming_the_file(tmp_path):
    for name, (path, words) in bad_inputs(tmp_path).items():
        with pytest.raises(VolumeError) as caught:
            load_volume(path)
        message = str(caught.value)
        assert "\n" not in message, name
        assert str(path) in message, name
        assert words in message, (name, message)


def test_single_volume_4d_file_is_read_as_3d(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6, 1)
    volume = load_volume(write_nifti(tmp_path / "one.nii", data, np.eye(4)))
    assert volume.shape == (4, 5, 6)
    np.testing.assert_array_equal(volume.data, data[..., 0])
    with pytest.raises(VolumeError, match="4D"):
        load_volume(tmp_path / "one.nii", allow_4d_singleton=False)


def test_loaded_data_is_not_tied_to_the_file(tmp_path):
    path = write_nifti(tmp_path / "scan.nii", np.ones((4, 4, 4), np.float32), np.eye(4))
    before = digest(path)
    volume = load_volume(path)
    volume.data[...] = 7
    assert not isinstance(volume.data, np.memmap)
    assert digest(path) == before


def test_looks_like_labels():
    assert looks_like_labels(np.array([[0, 1], [2, 1]], np.int32))
    assert looks_like_labels(np.array([0.0, 1.0, 2.0]))
    assert looks_like_labels(np.zeros(3, bool))
    assert not looks_like_labels(np.array([0.5, 1.0]))
    assert not looks_like_labels(np.arange(100))
    assert not looks_like_labels(np.array([-1, 0, 1]))


def test_a_volume_larger_than_the_available_memory_is_refused_before_reading(tmp_path, monkeypatch):
    from napari_uda.core import volume as volume_module

    path = tmp_path / "scan.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((20, 20, 20), np.float32), np.eye(4)), str(path))
    monkeypatch.setattr(volume_module, "available_memory", lambda: 10_000)

    def must_not_read(*_args, **_kwargs):
        raise AssertionError("the data was read before the size check")

    monkeypatch.setattr(volume_module.np, "asanyarray", must_not_read)
    with pytest.raises(VolumeError, match=r"needs 32\.0 kB of memory but only 10\.0 kB"):
        load_volume(path)


def test_a_model_grid_too_large_for_memory_is_refused_before_resampling():
    from napari_uda.core.models.volumetric import prepare_on_grid

    rng = np.random.default_rng(0)
    data = rng.random((40, 40, 40)).astype(np.float32)
    vast = Volume(data, np.diag([60.0, 60.0, 60.0, 1.0]), path=Path("vast.nii.gz"))
    with pytest.raises(VolumeError, match=r"vast.nii.gz: resampled to the model's 1x1x1 mm "):
        prepare_on_grid(vast, normalize=lambda a: a, spacing=(1.0, 1.0, 1.0))
    coarse = prepare_on_grid(vast, normalize=lambda a: a, spacing=(120.0, 120.0, 120.0))
    assert tuple(coarse.model_shape) == (20, 20, 20)  # a grid that fits is made as before
