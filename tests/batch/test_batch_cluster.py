"""Batches on a real ``LocalCluster`` of worker processes: a run finishes with a manifest and a
report, a corrupt scan in the middle is reported while the others finish, a rerun skips finished
cases, a stopped or interrupted (Ctrl-C) run leaves a consistent manifest and resumes; and the
``napari-uda batch`` command end to end, in both modes."""

from __future__ import annotations

import csv

import pytest

from napari_uda.batch.cases import plan_cases
from napari_uda.batch.job import BatchJob
from napari_uda.batch.manifest import read_manifest
from napari_uda.batch.report import write_report
from napari_uda.batch.run import open_client, run_batch
from napari_uda.cli import main

pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def client():
    """Two worker processes, one thread each, shared by this module's tests."""
    with open_client(workers=2) as client:
        yield client


def make_job(tiny_model_path, tmp_path, **changes) -> BatchJob:
    values = dict(
        model=str(tiny_model_path),
        method="adabn",
        out_dir=str(tmp_path / "out"),
        device="cpu",
        torch_threads=1,
    )
    return BatchJob(**{**values, **changes})


def states(out_dir) -> dict[str, str]:
    return {k: v["state"] for k, v in read_manifest(out_dir)["cases"].items()}


def test_a_batch_with_a_corrupt_scan_finishes_the_others_and_reruns_skip_them(
    client, tiny_model_path, scans_csv, tmp_path
):
    cases = plan_cases(scans_csv)
    job = make_job(tiny_model_path, tmp_path)
    seen = []
    outcome = run_batch(client, job, cases, on_progress=lambda p: seen.append(p.finished))
    assert states(job.out_dir) == {
        "scan_a": "done",
        "corrupt": "failed",
        "scan_b": "done",
        "scan_c": "done",
    }
    manifest = read_manifest(job.out_dir)
    reason = manifest["cases"]["corrupt"]["reason"]
    assert "corrupt.nii.gz" in reason and "\n" not in reason
    assert (outcome.progress.done, outcome.progress.failed) == (3, 1)
    assert seen[-1] == 4 and seen == sorted(seen)
    for case_id in ("scan_a", "scan_b", "scan_c"):
        assert (job.case_dir(case_id) / "labels.nii.gz").is_file()
    paths = write_report(job.out_dir)
    rows = list(csv.DictReader(paths["csv"].open()))
    assert rows[0]["case"] == "corrupt" and rows[0]["error"] == reason
    assert {row["case"] for row in rows[1:]} == {"scan_a", "scan_b", "scan_c"}
    assert float(next(r for r in rows if r["case"] == "scan_a")["dice_after"]) > 0

    stamps = {c: (job.case_dir(c) / "case.json").stat().st_mtime_ns for c in ("scan_a", "scan_b")}
    again = run_batch(client, job, cases)
    assert again.progress.skipped == 3 and again.progress.done == 0
    assert again.progress.failed == 1  # the corrupt scan is tried again, and fails again
    for case_id, stamp in stamps.items():
        assert (job.case_dir(case_id) / "case.json").stat().st_mtime_ns == stamp


def test_a_stopped_run_leaves_pending_cases_and_resumes(client, tiny_model_path, scans, tmp_path):
    cases = plan_cases(scans)
    job = make_job(tiny_model_path, tmp_path)
    finished = []
    outcome = run_batch(
        client,
        job,
        cases,
        on_progress=lambda p: finished.append(p.finished),
        should_stop=lambda: finished[-1] >= 1,  # stop once the first case is finished
    )
    assert outcome.progress.stopped
    first = states(job.out_dir)
    assert "running" not in first.values() and list(first.values()).count("done") >= 1
    assert "pending" in first.values()
    resumed = run_batch(client, job, cases)
    assert set(states(job.out_dir).values()) == {"done"}
    assert resumed.progress.skipped + resumed.progress.done == 3
    assert resumed.progress.skipped >= 1


def test_ctrl_c_leaves_a_consistent_manifest(client, tiny_model_path, scans, tmp_path):
    cases = plan_cases(scans)
    job = make_job(tiny_model_path, tmp_path)

    def interrupt(progress):
        if progress.finished:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(client, job, cases, on_progress=interrupt)
    after = states(job.out_dir)
    assert "running" not in after.values() and "done" in after.values()
    for case_id, state in after.items():
        assert job.case_dir(case_id).exists() == (state == "done") or state == "pending"
    run_batch(client, job, cases)
    assert set(states(job.out_dir).values()) == {"done"}


def test_the_batch_command_per_scan_and_site(client, tiny_model_path, scans, tmp_path, capsys):
    """Through ``--scheduler`` on the module's cluster (the other tests start local clusters)."""
    out = tmp_path / "per_scan"
    pattern = str(scans[0].parent / "scan_*")
    argv = ["batch", "--model", str(tiny_model_path), "--images", pattern, "--method", "adabn"]
    argv += ["--device", "cpu", "--scheduler", client.scheduler.address, "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    assert (out / "report.html").is_file() and set(states(out).values()) == {"done"}
    site = tmp_path / "site"
    code = main([*argv, "--out", str(site), "--mode", "site", "--site-scans", "scan_b"])
    assert code == 0, capsys.readouterr().err
    manifest = read_manifest(site)
    assert manifest["site"]["scans"] == ["scan_b"] and (site / manifest["site"]["model"]).is_file()
    assert set(states(site).values()) == {"done"}
    # the folder now holds a per-scan batch: another method is refused with one line
    assert main([*argv[:6], "tent", *argv[7:], "--out", str(out)]) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and "another method" in error[0]
