"""How much of the CPU the demo U-Net gets: steps per second and GFLOP/s against the measured peak.

Measured here, in one process, with ``--threads`` PyTorch threads (default 1, so that the numbers
mean something on a shared machine):

* the machine's peak: a 1024^2 float32 matmul and a representative 3x3 convolution (16 slices,
  32 -> 32 channels, 96 x 112) in the default and the channels-last layout, and in bfloat16
  when the CPU has native bfloat16 (``torch.ops.mkldnn._is_mkldnn_bf16_supported``);
* the demo model (``napari-uda demo``'s U-Net on the demo head's 96 x 112 slices): a TENT
  training step (16 slices, forward and backward, norm parameters trainable) and a no-grad pass
  (32 slices), in the configurations ``before`` (default layout, ``torch.no_grad``, early head
  computed: napari-uda before this change), ``now`` (channels-last, ``torch.inference_mode``,
  no early head: what runs now) and ``now + bf16`` (bfloat16 autocast on top; *not* enabled in
  napari-uda: see the label agreement column).

FLOPs come from :class:`torch.utils.flop_counter.FlopCounterMode` (a multiply-add is 2 FLOPs).
Each time is the best of ``--repeats`` alternating repetitions (the best is the least disturbed
by other work); the 1-minute load average is recorded with them.

Usage::

    .venv/bin/python benchmarks/compute_benchmark.py [--threads 1] [--repeats 5]

Writes ``benchmarks/results/compute.json`` and the ``compute-table`` block of
``docs/performance.md``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from _report import ROOT, machine, publish

RESULTS = ROOT / "benchmarks" / "results" / "compute.json"
DOCS = ROOT / "docs" / "performance.md"


def _best(function, repeats: int) -> float:
    function()  # warm-up (oneDNN primitive creation, allocator)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        function()
        times.append(time.perf_counter() - started)
    return min(times)


def _flops(function) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        function()
    return float(counter.get_total_flops())


def bf16_supported() -> bool:
    import torch

    check = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", None)
    return bool(check()) if check is not None else False


def peak(repeats: int) -> dict[str, float]:
    """GFLOP/s of a matmul and a 3x3 convolution (default and channels-last layout, bf16)."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(0)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(16, 32, 96, 112), torch.randn(32, 32, 3, 3)
    x_cl, w_cl = (t.contiguous(memory_format=torch.channels_last) for t in (x, w))
    cases = {
        "matmul fp32": (lambda: a @ b, 2 * 1024**3),
        "conv3x3 fp32": (lambda: F.conv2d(x, w, padding=1), None),
        "conv3x3 fp32 channels-last": (lambda: F.conv2d(x_cl, w_cl, padding=1), None),
    }
    if bf16_supported():
        a16, b16 = a.bfloat16(), b.bfloat16()
        x16, w16 = x_cl.bfloat16(), w_cl.bfloat16()
        cases["matmul bf16"] = (lambda: a16 @ b16, 2 * 1024**3)
        cases["conv3x3 bf16 channels-last"] = (lambda: F.conv2d(x16, w16, padding=1), None)
    results = {}
    with torch.inference_mode():
        for name, (function, flops) in cases.items():
            flops = flops or _flops(function)
            results[name] = flops / _best(function, repeats) / 1e9
    return results


def _demo():
    from napari_uda.core.models import load_model
    from napari_uda.core.volume import load_volume
    from napari_uda.data import demo_files

    files = demo_files(require_model=True)
    model = load_model(files.model)
    return model, model.prepare(load_volume(files.target_image)).inputs


def demo_model(repeats: int) -> list[dict]:
    """Training-step and no-grad-pass rates of the demo U-Net in three configurations."""
    import torch

    from napari_uda.adaptation.losses import entropy_loss

    model, inputs = _demo()
    network = model.network
    step_batch, pass_batch = inputs[:16].contiguous(), inputs[:32].contiguous()
    network.requires_grad_(False)
    for module in network.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.requires_grad_(True)

    def configure(layout: str) -> None:
        network.to(memory_format=layout)

    def forward(x, channels_last: bool, early: bool):
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return network.forward_features(x, early=early).logits.contiguous()

    configs = {
        "before": (torch.contiguous_format, False, torch.no_grad, True),
        "now": (torch.channels_last, True, torch.inference_mode, False),
    }
    if bf16_supported():
        configs["now + bf16"] = (torch.channels_last, True, torch.inference_mode, False)
    rows, reference_labels = [], None
    weights = {k: v.clone() for k, v in network.state_dict().items()}
    for name, (layout, channels_last, no_grad, early) in configs.items():
        bf16 = name.endswith("bf16")

        def train_step(bf16=bf16, channels_last=channels_last, early=early):
            network.train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                logits = forward(step_batch, channels_last, early)
            entropy_loss(logits.float()).backward()

        def no_grad_pass(bf16=bf16, channels_last=channels_last, early=early, no_grad=no_grad):
            network.eval()
            with no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return torch.softmax(forward(pass_batch, channels_last, early).float(), 1)

        network.load_state_dict(weights)  # training steps move BatchNorm statistics
        configure(layout)
        labels = no_grad_pass().max(1).indices
        reference_labels = labels if reference_labels is None else reference_labels
        agreement = float((labels == reference_labels).float().mean())
        step_flops, pass_flops = _flops(train_step), _flops(no_grad_pass)
        step_seconds = _best(train_step, repeats)
        pass_seconds = _best(no_grad_pass, repeats)
        rows.append(
            {
                "config": name,
                "train_step_seconds": step_seconds,
                "steps_per_second": 1 / step_seconds,
                "train_gflops_per_second": step_flops / step_seconds / 1e9,
                "train_gflop_per_step": step_flops / 1e9,
                "pass_seconds": pass_seconds,
                "pass_gflops_per_second": pass_flops / pass_seconds / 1e9,
                "pass_gflop": pass_flops / 1e9,
                "label_agreement_with_before": agreement,
                "load_1min": os.getloadavg()[0],
            }
        )
    network.to(memory_format=torch.contiguous_format)
    return rows


def table(payload: dict) -> str:
    peaks = payload["peak_gflops_per_second"]
    best_fp32 = max(v for k, v in peaks.items() if "fp32" in k)
    lines = [
        f"Measured on {payload['machine']} ({payload['cpu']}), {payload['date']}, "
        f"{payload['threads']} PyTorch thread(s), best of {payload['repeats']}; 1-minute load "
        f"average {payload['load_before']:.1f} before and {payload['load_after']:.1f} after "
        "(a shared machine: the best of several repetitions is the least disturbed one).",
        "",
        "Peak (GFLOP/s): "
        + ", ".join(f"{name} {value:.1f}" for name, value in peaks.items())
        + ".",
        "",
        "| demo U-Net | TENT step s (16 slices) | steps/s | train GFLOP/s | % of fp32 peak | "
        "no-grad pass s (32 slices) | pass GFLOP/s | labels equal to *before* |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in payload["demo_model"]:
        lines.append(
            f"| {row['config']} | {row['train_step_seconds']:.2f} | "
            f"{row['steps_per_second']:.2f} | {row['train_gflops_per_second']:.1f} | "
            f"{100 * row['train_gflops_per_second'] / best_fp32:.0f} % | "
            f"{row['pass_seconds']:.2f} | {row['pass_gflops_per_second']:.1f} | "
            f"{100 * row['label_agreement_with_before']:.2f} % |"
        )
    step = payload["demo_model"][0]
    lines += [
        "",
        f"One TENT step is {step['train_gflop_per_step']:.1f} GFLOP, one no-grad pass over 32 "
        f"slices {step['pass_gflop']:.1f} GFLOP (*before* includes the early head). *now + "
        "bf16* is measured only: bfloat16 changes some labels, so it is not enabled.",
    ]
    return "\n".join(lines)


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()[0]
    payload = {
        "machine": machine(),
        "cpu": cpu_name(),
        "bf16_supported": bf16_supported(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "threads": args.threads,
        "repeats": args.repeats,
        "load_before": load_before,
        "peak_gflops_per_second": peak(args.repeats),
        "demo_model": demo_model(args.repeats),
    }
    payload["load_after"] = os.getloadavg()[0]
    publish(RESULTS, payload, DOCS, "compute-table", table(payload))
    return 0


if __name__ == "__main__":
    sys.exit(main())
