"""Benchmark the keep-or-roll-back gate on the methods and deepbet benchmarks' cases.

For every case (a model, a real head under a simulated scanner, a method) the engine adapts a
copy one-shot with the method's defaults; then the gate (:mod:`napari_uda.adaptation.gate`)
measures the unadapted and the adapted model with label-free signals and decides. Recorded per
case: Dice and brain volume (ml) of the reference, the unadapted and the adapted mask, both
models' signals, the gate's decision and its seconds (with the machine's load average).

Case sets:

* ``methods``: the methods benchmark's cases (demo model; heads ``robex`` and ``mni152`` at
  2 mm; profiles t2_like, bias_noise, thick_slices; every method);
* ``failures``: the demo model on the deepbet benchmark's native-resolution heads (ROBEX
  1.5 mm, MNI152 1 mm) under its strong shifts (``severe``, ``new_scanner``) with TENT and
  UDAS, where adaptation inflates the mask (the issue's whole-head painting);
* ``deepbet``: the deepbet benchmark's adaptation cases (deepbet, heads mni152 and robex,
  profiles t2_like and severe, methods adaent and mean_teacher);
* ``blind``: cases no rule or threshold was chosen on: the methods set's heads and methods
  under the ``new_scanner`` and ``motion`` profiles, and deepbet's adaptation cases on the
  clean heads.

The signals are stored, so ``--decide-only`` re-applies the current :class:`GateOptions` to
the stored rows without running anything (the decision is a pure function of them).

Usage::

    .venv/bin/python benchmarks/gate_benchmark.py --sets methods failures deepbet
    .venv/bin/python benchmarks/gate_benchmark.py --decide-only

Writes ``benchmarks/results/gate.json`` and the gate table in ``docs/reliability.md`` (between
the ``gate-table`` markers); both come from a run, never by hand.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from _report import ROOT, machine, replace_marked_block, write_json

RESULTS = ROOT / "benchmarks" / "results" / "gate.json"
DOCS = ROOT / "docs" / "reliability.md"
#: A run "ends worse than the source" when its Dice drops by more than this.
WORSE_BY = 0.005
#: A volume "far off" differs from the reference's by more than this fraction.
FAR_OFF = 0.25
#: The cases the gate's rules and thresholds were chosen on; the rest are held out: the
#: methods set's thick_slices cases (run before the intensity rule existed) and the blind set
#: (run after), each decided once with every threshold fixed.
TUNED_ON = "every case but the methods set's thick_slices ones and the blind set"


def tuned(row: dict) -> bool:
    return row["profile"] != "thick_slices" and row["set"] != "blind"


def _load() -> float:
    return os.getloadavg()[0]


def methods_cases() -> list[dict]:
    from methods_benchmark import DEFAULT_HEADS, DEFAULT_PROFILES

    from napari_uda.adaptation import available_methods

    return [
        {"set": "methods", "model": "demo", "head": h, "profile": p, "method": m}
        for h in DEFAULT_HEADS
        for p in DEFAULT_PROFILES
        for m in sorted(available_methods())
        if m != "corrections"  # needs the user's corrections: not a label-free method
    ]


def failure_cases() -> list[dict]:
    return [
        {"set": "failures", "model": "demo", "head": f"{h}_native", "profile": p, "method": m}
        for h in ("robex", "mni152")
        for p in ("severe", "new_scanner")
        for m in ("tent", "udas")
    ]


def deepbet_cases() -> list[dict]:
    return [
        {"set": "deepbet", "model": "deepbet", "head": h, "profile": p, "method": m}
        for h in ("mni152", "robex")
        for p in ("t2_like", "severe")
        for m in ("adaent", "mean_teacher")
    ]


#: Scanner profiles of the blind set: never used while the rules were chosen.
BLIND_PROFILES = ("new_scanner", "motion")


def blind_cases() -> list[dict]:
    """Cases no rule was chosen on: the methods set's heads and methods under other profiles,
    and deepbet's adaptation cases on the clean heads."""
    demo = [
        dict(case, set="blind", profile=p)
        for p in BLIND_PROFILES
        for case in methods_cases()
        if case["profile"] == "t2_like"
    ]
    clean = [
        dict(c, set="blind", profile="clean") for c in deepbet_cases() if c["profile"] == "severe"
    ]
    return demo + clean


CASE_SETS = {
    "methods": methods_cases,
    "failures": failure_cases,
    "deepbet": deepbet_cases,
    "blind": blind_cases,
}


def _target(case: dict, seed: int):
    """The shifted image and the boolean reference mask of a case."""
    from napari_uda.core.volume import load_volume
    from napari_uda.simulation import custom_profile, simulate_scanner

    head = case["head"]
    if case["model"] == "demo" and not head.endswith("_native"):
        from methods_benchmark import head_files

        image_path, mask_path = head_files(head)
    else:
        from deepbet_benchmark import HEADS

        image_path, mask_path = HEADS[head.removesuffix("_native")]()
    image = load_volume(image_path)
    reference = np.asarray(load_volume(mask_path).data) > 0
    from deepbet_benchmark import EXTRA_PROFILES

    if case["profile"] == "clean":
        pass  # the head as it is: adapting must not make a scan the model gets right worse
    elif case["profile"] in EXTRA_PROFILES:
        base, changes = EXTRA_PROFILES[case["profile"]]
        image = simulate_scanner(image, custom_profile(base, **changes), seed=seed)
    else:
        image = simulate_scanner(image, case["profile"], seed=seed)
    return image, reference


def cache_path(cache: Path, case: dict, seed: int) -> Path:
    """Where a case's probabilities are stored (``.npz``; the adapted weights beside, ``.pt``)."""
    return cache / f"{case['set']}-{case['head']}-{case['profile']}-{case['method']}-{seed}.npz"


def _store(cache: Path, case, seed, targets, reference, source_probs, adapted_probs, adapted):
    """Store what a new signal needs without adapting again: both models' probabilities on the
    network inputs (float16), the valid mask, the reference on the inputs, the adapted weights."""
    import torch

    path = cache_path(cache, case, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    valid = (
        targets.valid
        if targets.valid_mask is not None
        else torch.ones((source_probs.shape[0], *source_probs.shape[2:]), dtype=torch.bool)
    )
    np.savez_compressed(
        path,
        source=source_probs.numpy().astype(np.float16),
        adapted=adapted_probs.numpy().astype(np.float16),
        valid=valid.numpy(),
        reference=targets.labels_on_inputs(reference.astype(np.int64)).numpy().astype(np.uint8),
    )
    torch.save(adapted.network.state_dict(), path.with_suffix(".pt"))


def run_case(case: dict, seed: int, cache: Path | None = None) -> dict:
    """Adapt, then measure both models with the gate's signals (no decision: see decide)."""
    import torch

    from napari_uda.adaptation.engine import adapt
    from napari_uda.adaptation.gate import (
        GateOptions,
        _chosen_inputs,
        left_right_dim,
        mask_change,
        model_signals,
    )
    from napari_uda.adaptation.targets import TargetSet
    from napari_uda.core.inference import predict_batches
    from napari_uda.core.metrics import compute_metrics
    from napari_uda.core.models import load_model
    from napari_uda.core.plausibility import class_volumes
    from napari_uda.data import demo_files

    torch.set_num_threads(int(os.environ.get("GATE_BENCHMARK_THREADS", "1")))
    image, reference = _target(case, seed)
    model = load_model(demo_files().model if case["model"] == "demo" else "deepbet")
    settings = model.recommended_settings(case["method"])
    load_before = _load()
    started = time.perf_counter()
    result = adapt(model, image, case["method"], settings or None, seed=seed, device="cpu")
    run_seconds = time.perf_counter() - started

    started = time.perf_counter()
    targets = TargetSet.prepare(model, image)
    prepared, inputs = targets.prepared[0], targets.inputs
    valid = None if targets.valid_mask is None else targets.valid
    source_probs = predict_batches(model, inputs, device="cpu", batch_size=16)
    adapted_probs = predict_batches(result.model, inputs, device="cpu", batch_size=16)
    prediction_seconds = time.perf_counter() - started
    options = GateOptions()
    started = time.perf_counter()
    chosen = _chosen_inputs([source_probs, adapted_probs], options.max_inputs)
    common = dict(chosen=chosen, valid=valid, lr_dim=left_right_dim(prepared), options=options)
    signals = {
        "source": model_signals(model, inputs, source_probs, **common).__dict__,
        "adapted": model_signals(result.model, inputs, adapted_probs, **common).__dict__,
    }
    signals["change"] = mask_change(
        source_probs, adapted_probs, valid, confident=options.confident, inputs=inputs
    ).__dict__
    gate_seconds = time.perf_counter() - started
    if cache is not None:
        _store(cache, case, seed, targets, reference, source_probs, adapted_probs, result.model)
    names = list(model.class_names)
    row = dict(case, seed=seed, stop_reason=result.stop_reason)
    for stage, labels in (
        ("before", result.initial_prediction.labels),
        ("after", result.prediction.labels),
    ):
        row[f"dice_{stage}"] = compute_metrics(labels, reference, image.spacing)[1]["dice"]
        row[f"volume_{stage}_ml"] = class_volumes(labels, image.spacing, names)
    row["volume_reference_ml"] = float(reference.sum() * np.prod(image.spacing) / 1000)
    row.update(
        signals=signals,
        class_names=names,
        model_expected_ml={k: list(v) for k, v in model.expected_volumes().items()},
        run_seconds=run_seconds,
        gate_seconds=gate_seconds,
        prediction_seconds=prediction_seconds,
        load_average=[load_before, _load()],
    )
    return row


@functools.cache
def _model(model_name: str):
    from napari_uda.core.models import load_model
    from napari_uda.data import demo_files

    return load_model(demo_files().model if model_name == "demo" else model_name)


def case_inputs(row: dict):
    """A case's network inputs, prepared again from its shifted scan (the same seed)."""
    from napari_uda.adaptation.targets import TargetSet

    image, _ = _target(row, row["seed"])
    return TargetSet.prepare(_model(row["model"]), image).inputs


@functools.cache
def model_expected(model_name: str) -> dict:
    """The expected volumes the model states now (a row stores the ones of its run)."""
    return {k: list(v) for k, v in _model(model_name).expected_volumes().items()}


def change_from_cache(row: dict, cache: Path) -> dict | None:
    """The change signals of a row from its stored probabilities (None when not stored)."""
    import torch

    from napari_uda.adaptation.gate import GateOptions, mask_change

    path = cache_path(cache, row, row["seed"])
    if not path.exists():
        return None
    stored = np.load(path)
    source, adapted = (
        torch.from_numpy(stored[k].astype(np.float32)) for k in ("source", "adapted")
    )
    valid = torch.from_numpy(stored["valid"])
    return mask_change(
        source, adapted, valid, confident=GateOptions().confident, inputs=case_inputs(row)
    ).__dict__


def decide_row(row: dict, expected_text: str | None) -> dict:
    """The gate's decision on a stored row, and what it means against the reference."""
    from napari_uda.adaptation.gate import ChangeSignals, GateOptions, ModelSignals, decide
    from napari_uda.core.plausibility import merge_expected, parse_expected_volumes

    expected = merge_expected(
        parse_expected_volumes(model_expected(row["model"])),
        parse_expected_volumes(expected_text or "", row["class_names"]),
    )
    signals = {k: ModelSignals(**row["signals"][k]) for k in ("source", "adapted")}
    change = row["signals"].get("change")
    volumes = [{"source": row["volume_before_ml"], "adapted": row["volume_after_ml"]}]
    decision = decide(
        signals["source"],
        signals["adapted"],
        volumes,
        expected,
        GateOptions(),
        ChangeSignals(**change) if change else None,
    )
    keep_adapted = decision.keep == "adapted"
    final_dice = row["dice_after"] if keep_adapted else row["dice_before"]
    final_volume = sum(
        (row["volume_after_ml"] if keep_adapted else row["volume_before_ml"]).values()
    )
    truth = row["volume_reference_ml"]
    return {
        "keep": decision.keep,
        "reasons": decision.reasons,
        "warnings": decision.warnings,
        "final_dice": final_dice,
        "final_volume_ml": final_volume,
        "far_off": abs(final_volume - truth) > FAR_OFF * truth,
        "warned": bool(decision.warnings),
    }


def fractions(rows: list[dict]) -> dict:
    """The issue's three numbers for some rows, without and with the gate."""
    done = [r for r in rows if "error" not in r]
    if not done:
        return {"cases": 0}
    gains = [r["dice_after"] - r["dice_before"] for r in done]
    kept = [r["gate"]["final_dice"] - r["dice_before"] for r in done]
    after_far = [
        abs(sum(r["volume_after_ml"].values()) - r["volume_reference_ml"])
        > FAR_OFF * r["volume_reference_ml"]
        for r in done
    ]
    mean_gain = float(np.mean(gains))
    return {
        "cases": len(done),
        "worse_without_gate": float(np.mean([g < -WORSE_BY for g in gains])),
        "worse_with_gate": float(np.mean([k < -WORSE_BY for k in kept])),
        "far_off_unwarned_without_gate": float(np.mean(after_far)),
        "far_off_unwarned_with_gate": float(
            np.mean([r["gate"]["far_off"] and not r["gate"]["warned"] for r in done])
        ),
        "mean_gain_without_gate": mean_gain,
        "mean_gain_with_gate": float(np.mean(kept)),
        "gain_kept": float(np.mean(kept) / mean_gain) if mean_gain > 0 else None,
        "rolled_back": float(np.mean([r["gate"]["keep"] == "source" for r in done])),
        "warned": float(np.mean([r["gate"]["warned"] for r in done])),
        "gate_seconds_mean": float(np.mean([r["gate_seconds"] for r in done])),
        "run_seconds_mean": float(np.mean([r["run_seconds"] for r in done])),
    }


def _percent(value) -> str:
    return "–" if value is None else f"{100 * value:.0f} %"


def summary_table(groups: dict[str, dict]) -> str:
    lines = [
        "| cases | n | worse than source by > 0.005 (no gate → gate) | volume > 25 % off, "
        "no warning (no gate → gate) | mean Dice gain (no gate → gate) | gain kept | "
        "rolled back | gate s / run s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, f in groups.items():
        if not f.get("cases"):
            continue
        lines.append(
            f"| {name} | {f['cases']} | {_percent(f['worse_without_gate'])} → "
            f"**{_percent(f['worse_with_gate'])}** | "
            f"{_percent(f['far_off_unwarned_without_gate'])} → "
            f"**{_percent(f['far_off_unwarned_with_gate'])}** | "
            f"{f['mean_gain_without_gate']:+.3f} → {f['mean_gain_with_gate']:+.3f} | "
            f"**{_percent(f['gain_kept'])}** | {_percent(f['rolled_back'])} | "
            f"{f['gate_seconds_mean']:.1f} / {f['run_seconds_mean']:.1f} |"
        )
    return "\n".join(lines)


def case_table(rows: list[dict]) -> str:
    from napari_uda.adaptation.gate import ModelSignals

    lines = [
        "| set | head | scanner | method | Dice before → after | volume ml: reference, before → "
        "after | agreement before → after | masks' agreement, sure brain dropped | intensity "
        "support | gate | warnings | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = f"| {r['set']} | {r['head']} | {r['profile']} | {r['method']} |"
        if "error" in r:
            lines.append(f"{case} not run: {r['error']} | | | | | | | |")
            continue
        s, a = r["signals"]["source"], r["signals"]["adapted"]
        agreement = [ModelSignals(**x).agreement for x in (s, a)]  # the one the gate decides on
        g, change = r["gate"], r["signals"].get("change")
        moved = f"{change['agreement']:.2f}, {100 * change['dropped']:.0f} %" if change else "–"
        support = (change or {}).get("intensity_support")
        support = "–" if support is None else f"{support:+.2f}"
        lines.append(
            f"{case} {r['dice_before']:.3f} → {r['dice_after']:.3f} | "
            f"{r['volume_reference_ml']:.0f}, {sum(r['volume_before_ml'].values()):.0f} → "
            f"{sum(r['volume_after_ml'].values()):.0f} | {agreement[0]:.3f} → {agreement[1]:.3f} "
            f"| {moved} | {support} | {'**rolled back**' if g['keep'] == 'source' else 'kept'} | "
            f"{len(g['warnings'])} | {r['load_average'][0]:.1f} |"
        )
    return "\n".join(lines)


def summarise(payload: dict, cache: Path | None = None, resignal: bool = False) -> dict:
    rows = payload["rows"]
    for row in rows:
        if "error" in row:
            continue
        if cache is not None and (resignal or "change" not in row["signals"]):
            change = change_from_cache(row, cache)
            if change is not None:
                row["signals"]["change"] = change
        row["gate"] = decide_row(row, payload.get("expected_volume"))
    groups = {"all": fractions(rows)}
    for name in CASE_SETS:
        groups[name] = fractions([r for r in rows if r["set"] == name])
    groups["tuned on"] = fractions([r for r in rows if tuned(r)])
    groups["held out"] = fractions([r for r in rows if not tuned(r)])
    payload["summary"] = groups
    return payload


def write_docs(payload: dict) -> None:
    body = (
        f"_Generated by `benchmarks/gate_benchmark.py` on {payload['date']} "
        f"({payload['machine']}, shared with other work: load average "
        f"{payload['load_range'][0]:.1f}-{payload['load_range'][1]:.1f}, so seconds are noisy); "
        f"seed {payload['seed']}; expected volume from the model"
        f"{' and ' + payload['expected_volume'] if payload.get('expected_volume') else ''}; "
        f"thresholds tuned on {TUNED_ON}, the rest held out._\n\n"
        f"{summary_table(payload['summary'])}\n\n### Every case\n\n{case_table(payload['rows'])}"
    )
    replace_marked_block(DOCS, "gate-table", body, title="Reliability")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", nargs="*", default=list(CASE_SETS), choices=list(CASE_SETS))
    parser.add_argument("--heads", nargs="*", help="only the cases of these heads")
    parser.add_argument("--profiles", nargs="*", help="only the cases of these scanner profiles")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--decide-only", action="store_true", help="re-decide stored rows")
    parser.add_argument(
        "--resignal",
        action="store_true",
        help="recompute the change signals from the cache (after changing how they are measured)",
    )
    parser.add_argument(
        "--expected-volume", default="", help="the user's expected volume, e.g. brain=1000:1800"
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--cache",
        type=Path,
        default=Path("/tmp/gate_cache"),
        help="folder for each case's probabilities and adapted weights (outside the repository)",
    )
    parser.add_argument(
        "--merge", nargs="*", type=Path, default=[], help="also take the rows of these results"
    )
    args = parser.parse_args(argv)

    previous = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    rows = previous["rows"]
    for path in args.merge:
        rows = _merged(rows, json.loads(path.read_text())["rows"])
    if not args.decide_only:
        done = {_key(r) for r in rows if "error" not in r}
        for case_set in args.sets:
            for case in CASE_SETS[case_set]():
                key = _key(case)
                if key in done or (args.heads and case["head"] not in args.heads):
                    continue
                if args.profiles and case["profile"] not in args.profiles:
                    continue
                try:
                    row = run_case(case, args.seed, args.cache)
                except Exception as error:  # report and go on with the next case
                    row = dict(case, error=str(error).splitlines()[0])
                rows = _merged(rows, [row])
                print(
                    json.dumps(
                        {
                            k: row.get(k)
                            for k in (
                                "head",
                                "profile",
                                "method",
                                "dice_before",
                                "dice_after",
                                "gate_seconds",
                                "run_seconds",
                                "error",
                            )
                        }
                    ),
                    flush=True,
                )
                save(args, rows)
    save(args, rows)
    print(json.dumps(json.loads(args.out.read_text())["summary"], indent=1))
    return 0


def _key(row: dict) -> tuple:
    return (row["set"], row["head"], row["profile"], row["method"])


def _merged(rows: list[dict], more: list[dict]) -> list[dict]:
    """``rows`` with ``more`` added (a row of ``more`` replaces one of the same case)."""
    keys = {_key(r) for r in more}
    return [r for r in rows if _key(r) not in keys] + more


def save(args, rows: list[dict]) -> None:
    loads = [x for r in rows if "load_average" in r for x in r["load_average"]] or [0.0]
    payload = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": machine(),
        "seed": args.seed,
        "expected_volume": args.expected_volume,
        "load_range": [min(loads), max(loads)],
        "rows": rows,
    }
    write_json(args.out, summarise(payload, args.cache, args.resignal))
    write_docs(payload)


if __name__ == "__main__":
    sys.exit(main())
