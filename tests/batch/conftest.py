"""Batch fixtures: a tiny model saved as a bundle and a folder of small synthetic scans (with
references), so a batch runs in seconds on worker processes."""

from __future__ import annotations

import pytest

from napari_uda.core.volume import save_volume


@pytest.fixture(scope="session")
def tiny_model_path(tiny_model, tmp_path_factory):
    path = tmp_path_factory.mktemp("model") / "tiny.safetensors"
    tiny_model.save(path)
    return path


@pytest.fixture
def scans(tmp_path, make_synthetic_head):
    """Three small synthetic scans ``scan_a`` .. ``scan_c`` with references in ``tmp_path/scans``
    (different contrasts: three new-scanner looks)."""
    folder = tmp_path / "scans"
    folder.mkdir()
    paths = []
    for index, (brain, scalp) in enumerate([(0.8, 0.6), (0.75, 0.55), (0.85, 0.5)]):
        image, mask = make_synthetic_head(brain=brain, scalp=scalp, seed=10 + index)
        name = "abc"[index]
        save_volume(image, folder / f"scan_{name}.nii.gz")
        save_volume(mask, folder / f"ref_{name}.nii.gz")
        paths.append(folder / f"scan_{name}.nii.gz")
    return paths


def write_csv(path, rows) -> None:
    """A batch CSV with ``image`` and ``reference`` columns."""
    lines = ["image,reference"] + [f"{image},{reference or ''}" for image, reference in rows]
    path.write_text("\n".join(lines) + "\n")


@pytest.fixture
def scans_csv(scans, tmp_path):
    """The three scans and, in the middle, a corrupt one, as a CSV with references."""
    corrupt = scans[0].parent / "corrupt.nii.gz"
    corrupt.write_bytes(b"\x1f\x8b\x08 truncated")
    rows = [(scans[0], scans[0].parent / "ref_a.nii.gz"), (corrupt, None)]
    rows += [(scans[1], scans[0].parent / "ref_b.nii.gz"), (scans[2], None)]
    path = tmp_path / "scans.csv"
    write_csv(path, rows)
    return path
