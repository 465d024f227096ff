"""Compare correction recipes for deepbet on a head it breaks: one round, fixed corrected slices.

Where ``corrections_benchmark.py`` plays a user over rounds with the recommended settings, this
script tries *recipes* (which parameters train, learning rate, steps, window, anchor) on one
case, cheaply: deepbet on a real head under the ``inverted`` scanner, the ``--slices`` axial
slices with the most wrong voxels of the unadapted mask (at least 3 apart) corrected fully, one
round of the ``corrections`` method with the recipe's settings over deepbet's recommendation.
Recorded per recipe: Dice and volume ratio of the final mask (corrections kept) and of the
model alone, "just paint" (the same slices pasted into the unadapted mask), carry-over (the
adapted model on the other head under the same scanner), forgetting (on the clean head), the
round's CPU seconds (user + system of this process: the machine is shared) and the load.

``--windows`` measures instead how far deepbet's answer on a window of its input is from the
window of its answer on the whole input (argmax agreement), per window size and centre.

Usage (one recipe per line of JSON: ``settings`` override deepbet's recommendation;
``prefixes``: train the parameters whose names start with these, for groups the model does not
offer; ``slices``, ``head``)::

    .venv/bin/python benchmarks/corrections_recipes.py '{"settings": {"corrections_crop": 0}}'
    .venv/bin/python benchmarks/corrections_recipes.py --windows
    .venv/bin/python benchmarks/corrections_recipes.py --docs-only

Appends to ``benchmarks/results/corrections_recipes.jsonl`` and writes the table in
``docs/corrections.md`` (between the ``corrections-recipes`` markers); both from runs only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import corrections_benchmark as bench
import numpy as np
from _report import ROOT, replace_marked_block

RESULTS = ROOT / "benchmarks" / "results" / "corrections_recipes.jsonl"
DOCS = ROOT / "docs" / "corrections.md"
WINDOW_SIZES = (160, 192, 224)
WINDOW_CENTRES = (96, 128, 160)


def train_prefixes(prefixes: list[str] | None) -> None:
    """Make the correction step train the parameters named ``prefixes*`` (None: its group)."""
    from napari_uda.adaptation import corrections

    if prefixes is None:
        return
    original = corrections.CorrectionStep._parameters

    def chosen(step):
        named = step.context.model.scripted.named_parameters()
        return [p for n, p in named if n.startswith(tuple(prefixes))] or original(step)

    corrections.CorrectionStep._parameters = chosen


def run_recipe(recipe: dict) -> dict:
    """One round of ``recipe`` on its case; the row for the results file."""
    from napari_uda.adaptation.engine import adapt
    from napari_uda.adaptation.rounds import keep_corrections
    from napari_uda.core.corrections import NOT_CORRECTED

    train_prefixes(recipe.get("prefixes"))
    case = bench.load_case(f"deepbet_{recipe.get('head', 'mni152')}")
    target, model = case.target, case.model
    unadapted = bench._predict(model, target)
    axis, taken = bench._axial(target.image), []
    corrections = np.full(target.reference.shape, NOT_CORRECTED, dtype=np.int16)
    for _ in range(recipe.get("slices", 5)):
        corrections = bench.next_corrections(
            "slices", corrections, unadapted, target.reference, axis, taken
        )
    settings = {**model.recommended_settings("corrections"), **recipe.get("settings", {})}
    load, cpu = os.getloadavg()[0], time.process_time()
    given = target.image.with_data(corrections)
    result = adapt(model, target.image, "corrections", settings,
                   corrections=given, seed=1, device="cpu")  # fmt: skip
    cpu = time.process_time() - cpu
    final = bench.scores(keep_corrections(result.prediction.labels, corrections), target)
    checks = {}
    for key, scan in (("carry_over", case.carry_over), ("clean", case.clean)):
        before = bench.scores(bench._predict(model, scan), scan)["dice"]
        checks[key] = [before, bench.scores(bench._predict(result.model, scan), scan)["dice"]]
    return {
        "recipe": recipe,
        "settings": settings,
        "slices": taken,
        "unadapted_dice": bench.scores(unadapted, target)["dice"],
        "dice": final["dice"],
        "volume_ratio": final["volume_ratio"],
        "model_only_dice": bench.scores(result.prediction.labels, target)["dice"],
        "just_paint_dice": bench.scores(keep_corrections(unadapted, corrections), target)["dice"],
        **checks,
        "cpu_seconds": cpu,
        "load": load,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def window_agreement(head: str = "mni152") -> dict:
    """deepbet's answer on windows of its input against the same windows of its whole answer."""
    import torch

    case = bench.load_case(f"deepbet_{head}")
    prepared = case.model.prepare(case.target.image)
    inputs, box = prepared.inputs, prepared.grid.crop
    reference = case.target.image.with_data(case.target.reference.astype(np.uint8))
    brain = np.asarray(reference.to_canonical().data) > 0
    outside = int(brain.sum() - brain[box].sum())  # brain deepbet's localiser left out
    agreement = {}
    with torch.no_grad():
        whole = case.model.forward(inputs).logits.argmax(1)
        for size in WINDOW_SIZES:
            for centre in WINDOW_CENTRES:
                start = max(0, min(centre - size // 2, inputs.shape[-1] - size))
                cut = (slice(None), slice(None), *(slice(start, start + size),) * 3)
                part = case.model.forward(inputs[cut]).logits.argmax(1)
                same = (part == whole[cut[:1] + cut[2:]]).float().mean()
                agreement[f"{size}@{centre}"] = float(same)
    return {
        "windows": agreement,
        "head": head,
        "brain_voxels": int(brain.sum()),
        "brain_outside_box": outside,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


def _recipe_name(row: dict) -> str:
    recipe, settings = row["recipe"], row["settings"]
    trains = "first blocks" if settings.get("corrections_parameters", "auto") == "auto" else ""
    if recipe.get("prefixes") == [""] or settings.get("corrections_parameters") == "every":
        trains = "every weight"
    elif recipe.get("prefixes"):
        trains = "+".join(p.rstrip(".") for p in recipe["prefixes"])
    window = settings.get("corrections_crop") or "whole input"
    extra = {k: v for k, v in recipe.get("settings", {}).items()
             if k not in ("corrections_crop", "corrections_learning_rate", "steps_per_epoch",
                          "corrections_parameters")}  # fmt: skip
    text = (
        f"{trains}, {settings['steps_per_epoch']} steps at "
        f"{settings['corrections_learning_rate']:g}, window {window}"
    )
    return text + "".join(f", {k.removeprefix('corrections_')} {v}" for k, v in extra.items())


def docs_body(rows: list[dict]) -> str:
    recipes = [row for row in rows if "recipe" in row]
    lines = [
        "_Generated by `benchmarks/corrections_recipes.py` (results/corrections_recipes.jsonl): "
        "deepbet, one round, the 5 worst axial slices of the unadapted mask corrected; CPU "
        "seconds of the round on a shared machine (1 thread), load next to them._",
        "",
        "| recipe | head | Dice (model alone) | volume ratio | just paint | carry-over | clean head"
        " | CPU s | load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in recipes:
        carry, clean = row["carry_over"], row["clean"]
        lines.append(
            f"| {_recipe_name(row)} | {row['recipe'].get('head', 'mni152')} | "
            f"{row['unadapted_dice']:.3f} -> **{row['dice']:.3f}** ({row['model_only_dice']:.3f})"
            f" | {row['volume_ratio']:.2f} | {row['just_paint_dice']:.3f} | "
            f"{carry[0]:.3f} -> {carry[1]:.3f} ({carry[1] - carry[0]:+.3f}) | "
            f"{clean[0]:.3f} -> {clean[1]:.3f} ({clean[1] - clean[0]:+.3f}) | "
            f"{row['cpu_seconds']:.0f} | {row['load']:.1f} |"
        )
    for row in (r for r in rows if "windows" in r and "brain_outside_box" in r):
        shares = ", ".join(f"{k}: {v:.2f}" for k, v in row["windows"].items())
        lines += ["", f"deepbet's answer on a window (size@centre, voxels of its 256^3 input) "
                  f"agrees with its whole-input answer there on this share of voxels "
                  f"({row['head']}, inverted): {shares}. deepbet's localiser box leaves "
                  f"{row['brain_outside_box']} of the {row['brain_voxels']} reference brain "
                  f"voxels out ({row['brain_outside_box'] / row['brain_voxels']:.1%}): no "
                  f"update of the main network reaches them."]  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipes", nargs="*", help="recipes as JSON objects")
    parser.add_argument("--windows", action="store_true", help="measure window agreement")
    parser.add_argument("--docs-only", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    rows = [run_recipe(json.loads(text)) for text in args.recipes]
    rows += [window_agreement()] if args.windows else []
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with RESULTS.open("a") as file:
        for row in rows:
            file.write(json.dumps(row) + "\n")
    every = [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()]
    replace_marked_block(DOCS, "corrections-recipes", docs_body(every), title="Correct, then adapt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
