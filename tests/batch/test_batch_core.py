"""The headless core of a batch without a cluster: case planning, the manifest (resume,
reconciling with the case folders, refusing another batch's folder), atomic case folders, one
case run directly, and the report's order."""

from __future__ import annotations

import json

import numpy as np
import pytest

from napari_uda.batch.case_task import process_case
from napari_uda.batch.cases import Case, CaseError, choose_site_cases, plan_cases
from napari_uda.batch.commit import remove_stale_staging, staged_folder
from napari_uda.batch.job import BatchJob
from napari_uda.batch.manifest import Manifest, ManifestError, read_manifest
from napari_uda.batch.report import case_flags, report_rows, write_report
from napari_uda.core.corrections import NOT_CORRECTED
from napari_uda.core.volume import load_volume, save_volume


def job_for(tmp_path, model="model.safetensors", **changes) -> BatchJob:
    values = dict(model=str(model), method="adabn", out_dir=str(tmp_path / "out"), device="cpu")
    values.update(changes)
    return BatchJob(**values)


# -- planning ------------------------------------------------------------------------------------
def test_cases_from_a_glob_a_folder_and_a_csv(scans, scans_csv):
    from_glob = plan_cases(str(scans[0].parent / "scan_*.nii.gz"))
    assert [case.case_id for case in from_glob] == ["scan_a", "scan_b", "scan_c"]
    assert all(case.reference is None for case in from_glob)
    from_folder = plan_cases(scans[0].parent)
    assert len(from_folder) == 7  # three scans, three references, the corrupt file
    from_csv = plan_cases(scans_csv)
    assert [case.case_id for case in from_csv] == ["scan_a", "corrupt", "scan_b", "scan_c"]
    assert from_csv[0].reference.endswith("ref_a.nii.gz") and from_csv[3].reference is None
    assert all(case.image.startswith("/") for case in from_csv)  # absolute for remote workers


def test_same_names_get_distinct_ids_and_bad_lists_fail_with_one_line(scans, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    (other / "scan_a.nii.gz").write_bytes(scans[0].read_bytes())
    cases = plan_cases([scans[0], other / "scan_a.nii.gz"])
    assert [case.case_id for case in cases] == ["scan_a", "scan_a_2"]
    with pytest.raises(CaseError, match="matches no"):
        plan_cases(str(tmp_path / "nothing" / "*.nii.gz"))
    with pytest.raises(CaseError, match="listed twice"):
        plan_cases([scans[0], scans[0]])
    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("path\nscan.nii.gz\n")
    with pytest.raises(CaseError, match="'image' column"):
        plan_cases(bad_csv)
    missing = tmp_path / "missing.csv"
    missing.write_text("image,reference\nscans/scan_a.nii.gz,scans/nope.nii.gz\n")
    with pytest.raises(CaseError, match=r"nope\.nii\.gz: no such file"):
        plan_cases(missing)


def test_site_scans_are_named_or_a_seeded_sample(scans):
    cases = plan_cases(scans)
    assert choose_site_cases(cases, ["scan_b.nii.gz"]) == [cases[1]]
    sample = choose_site_cases(cases, count=2, seed=3)
    assert len(sample) == 2 and sample == choose_site_cases(cases, count=2, seed=3)
    assert len(choose_site_cases(cases, count=10)) == 3
    with pytest.raises(CaseError, match="not one of"):
        choose_site_cases(cases, ["elsewhere.nii.gz"])


# -- manifest ------------------------------------------------------------------------------------
def test_manifest_resumes_and_trusts_the_case_folders(scans, tmp_path):
    cases = plan_cases(scans)
    job = job_for(tmp_path)
    manifest = Manifest.open(job, cases)
    assert manifest.counts()["pending"] == 3
    manifest.mark("scan_a", "done", seconds=1.0)
    manifest.mark("scan_b", "running")
    manifest.mark("scan_c", "failed", reason="scan_c.nii.gz: broken")
    # scan_a says done but its folder is gone; scan_c's folder appeared after the last save
    with staged_folder(job.case_dir("scan_c")) as stage:
        (stage / "case.json").write_text(json.dumps({"seconds": 2.0, "metrics": {}}))
    resumed = Manifest.open(job, cases)
    states = {case_id: record["state"] for case_id, record in resumed.cases.items()}
    assert states == {"scan_a": "pending", "scan_b": "pending", "scan_c": "done"}
    assert resumed.cases["scan_b"]["reason"] == "interrupted"
    assert read_manifest(job.out_dir)["counts"]["done"] == 1  # the saved snapshot


def test_a_folder_of_another_batch_is_refused(scans, tmp_path):
    cases = plan_cases(scans)
    Manifest.open(job_for(tmp_path), cases).save()
    with pytest.raises(ManifestError, match="another method"):
        Manifest.open(job_for(tmp_path, method="tent"), cases)
    Manifest.open(job_for(tmp_path, torch_threads=4), cases)  # threads may change


def test_a_staged_folder_appears_whole_or_not_at_all(tmp_path):
    final = tmp_path / "cases" / "one"
    with pytest.raises(RuntimeError), staged_folder(final) as stage:
        (stage / "labels.nii.gz").write_text("half")
        raise RuntimeError("worker died")
    assert not final.exists() and not list((tmp_path / "cases").iterdir())
    with staged_folder(final) as stage:
        (stage / "labels.nii.gz").write_text("whole")
    assert (final / "labels.nii.gz").read_text() == "whole"
    (tmp_path / "cases" / ".staging-two-x").mkdir()  # left by a killed worker
    assert remove_stale_staging(tmp_path / "cases") == 1
    assert [p.name for p in (tmp_path / "cases").iterdir()] == ["one"]


# -- one case, directly --------------------------------------------------------------------------
def test_a_case_runs_and_commits_its_outputs(tiny_model_path, scans_csv, tmp_path):
    cases = plan_cases(scans_csv)
    job = job_for(tmp_path, tiny_model_path, torch_threads=1)
    record = process_case(cases[0], job)
    assert record["state"] == "done", record
    folder = job.case_dir("scan_a")
    assert sorted(p.name for p in folder.iterdir()) == [
        "case.json",
        "entropy.nii.gz",
        "labels.nii.gz",
        "montage.png",
    ]
    metrics = record["metrics"]
    assert 0 <= metrics["dice_before"] <= 1 and 0 <= metrics["dice_after"] <= 1
    assert metrics["volume_ml_before"] > 0
    assert record["gate"]["decision"] in ("keep", "roll back") and record["gate"]["reason"]
    failed = process_case(cases[1], job)
    assert failed["state"] == "failed" and "corrupt.nii.gz" in failed["reason"]
    assert "\n" not in failed["reason"] and not job.case_dir("corrupt").exists()


def test_a_case_with_corrections_and_an_expected_volume(tiny_model_path, scans, tmp_path):
    """The corrections reach the engine; a brain of a few ml is out of a 1000-1800 ml range and
    the report flags it."""
    reference = load_volume(scans[0].parent / "ref_a.nii.gz")
    corrections = np.full(reference.shape, NOT_CORRECTED, dtype=np.int16)
    corrections[:, :, 10] = reference.data[:, :, 10]  # one corrected axial slice
    save_volume(reference.with_data(corrections), tmp_path / "corr_a.nii.gz")
    case = Case("scan_a", str(scans[0]), corrections=str(tmp_path / "corr_a.nii.gz"))
    job = job_for(tmp_path, tiny_model_path, torch_threads=1, expected_volume=("brain=1000:1800",))
    record = process_case(case, job)
    assert record["state"] == "done", record
    assert record["corrections"]["voxels"] == corrections[:, :, 10].size
    assert record["gate"]["volume_check"].startswith("out of range: brain")
    assert "volume out of range" in case_flags(record)


# -- report --------------------------------------------------------------------------------------
def test_report_lists_the_cases_to_check_first(scans, tmp_path):
    cases = plan_cases(scans)
    job = job_for(tmp_path)
    manifest = Manifest.open(job, cases)
    fine = {"volume_change": 0.05, "change_dice": 0.95, "volume_ml_before": 1.0}
    manifest.mark("scan_a", "done", metrics=fine, gate={"decision": "keep"})
    manifest.mark("scan_b", "done", metrics={**fine, "volume_change": 0.5}, gate={})
    manifest.mark("scan_c", "failed", reason="scan_c.nii.gz: broken")
    rows = report_rows(read_manifest(job.out_dir))
    assert [row["case"] for row in rows] == ["scan_c", "scan_b", "scan_a"]
    assert case_flags(manifest.cases["scan_a"]) == []
    assert rows[1]["flags"] == "large change"
    paths = write_report(job.out_dir)
    html = paths["html"].read_text()
    assert html.index("scan_c") < html.index("scan_b") < html.index("scan_a")
    assert "2 to check" in html
    assert paths["csv"].read_text().splitlines()[1].startswith("scan_c,failed,failed")


def test_ctrl_c_in_the_command_says_what_is_kept(
    monkeypatch, tiny_model_path, scans, tmp_path, capsys
):
    """Exit 130 and one line saying finished cases are kept and how to resume (not the other
    commands' 'nothing was written', which would be false here)."""
    import napari_uda.batch.run as run_module
    from napari_uda.cli import main

    def interrupted(job, cases, **kwargs):
        manifest = Manifest.open(job, cases)
        manifest.mark(cases[0].case_id, "done")
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_archive", interrupted)
    argv = ["batch", "--model", str(tiny_model_path), "--images", str(scans[0].parent / "scan_*")]
    code = main([*argv, "--method", "adabn", "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 130
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "1 case(s) done are kept, 2 pending" in lines[0]
    assert "rerun the same command" in lines[0]
