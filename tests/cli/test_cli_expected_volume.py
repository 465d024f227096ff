"""``--expected-volume`` and the gate in the CLI: a mask outside its expected range is written
and flagged with a loud line (exit 0); a bad range is one line (exit 2) before any work."""

from __future__ import annotations

import json

from napari_uda.cli import main


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def test_predict_flags_an_implausible_volume_loudly_and_exits_0(demo_paths, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    code, err = run_cli(
        capsys, "predict", "--model", demo_paths.model, "--image", demo_paths.target_image,
        "--out", out, "--device", "cpu", "--expected-volume", "brain=10:20",
    )  # fmt: skip
    assert code == 0 and out.exists()
    [line] = [line for line in err.splitlines() if "WARNING" in line]
    assert line.startswith("napari-uda predict: WARNING: implausible volume in ")
    assert "ml is above the expected 10-20 ml" in line and str(out) in line


def test_predict_with_a_plausible_volume_says_nothing(demo_paths, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    code, err = run_cli(
        capsys, "predict", "--model", demo_paths.model, "--image", demo_paths.target_image,
        "--out", out, "--device", "cpu", "--expected-volume", "brain=500:3000",
    )  # fmt: skip
    assert code == 0 and "WARNING" not in err


def test_a_bad_expected_volume_is_one_line_before_any_work(demo_paths, tmp_path, capsys):
    out = tmp_path / "mask.nii.gz"
    code, err = run_cli(
        capsys, "predict", "--model", demo_paths.model, "--image", demo_paths.target_image,
        "--out", out, "--expected-volume", "tumour=1:2",
    )  # fmt: skip
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and not out.exists()
    assert "--expected-volume" in lines[0] and "'tumour' is not a class" in lines[0]


def test_train_refuses_a_bad_expected_volume_before_training(demo_paths, tmp_path, capsys):
    out = tmp_path / "model.safetensors"
    for bad, words in (("tumour=1:2", "'tumour' is not a class"), ("brain=9:3", "low < high")):
        code, err = run_cli(
            capsys, "train", "--images", demo_paths.source_image,
            "--masks", demo_paths.source_mask, "--out", out, "--classes", "background", "brain",
            "--expected-volume", bad,
        )  # fmt: skip
        lines = [line for line in err.splitlines() if line.strip()]
        assert code == 2 and len(lines) == 1 and not out.exists()
        assert "--expected-volume" in lines[0] and words in lines[0], lines


def test_adapt_states_the_gate_decision_and_flags_the_volume(
    demo_paths, demo_target_slab, tmp_path, capsys
):
    from napari_uda.core.volume import save_volume

    image = save_volume(demo_target_slab, tmp_path / "slab.nii.gz")
    out, report = tmp_path / "mask.nii.gz", tmp_path / "report.json"
    code, err = run_cli(
        capsys, "adapt", "--model", demo_paths.model, "--image", image, "--method", "tent",
        "--set", "epochs=1", "--out", out, "--report", report, "--device", "cpu", "--quiet",
        "--expected-volume", "brain=1:2",
    )  # fmt: skip
    assert code == 0 and out.exists()
    [decision] = [line for line in err.splitlines() if line.startswith("napari-uda adapt: gate:")]
    assert "kept the" in decision
    warnings = [line for line in err.splitlines() if "WARNING: implausible volume" in line]
    assert len(warnings) == 1 and "above the expected 1-2 ml" in warnings[0]
    gate = json.loads(report.read_text())["gate"]
    assert gate["keep"] in ("adapted", "source") and gate["summary"] in decision
    assert (
        gate["expected_ml"] == {"brain": [1.0, 2.0]} and gate["flags"][0]["class_name"] == "brain"
    )
    assert gate["seconds"] > 0 and gate["source"]["tta_agreement"] is not None
