"""What every adapter around a TorchScript network shares.

* :class:`LogitsNetwork` wraps the scripted module so that it returns *logits* (what the methods
  and the inference code expect of ``adapter.network``) whatever the network ends with
  (softmax, sigmoid or nothing), and runs at most a few inputs at a time without gradients, so
  sliding-window inference stays within memory.
* Normalisation layers are recognised by class name, which TorchScript keeps
  (``original_name``), since ``isinstance`` does not work on scripted modules.
* :class:`ScriptedAdapterMixin`: parameter groups (``all`` / ``first_blocks`` / ``norm``) and
  capabilities (``norm_affine``; ``batchnorm`` when the BatchNorm layers were scripted, not
  traced, see :class:`CumulativeBatchNorm` and :data:`TRACED_BATCHNORM_NOTE`).
"""

from __future__ import annotations

import copy
import functools
import io
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.autograd.function import once_differentiable
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from ..volume import atomic_output
from .adapter import BATCHNORM, NORM_AFFINE
from .bundle import non_finite_weights
from .errors import TORCHSCRIPT_SUFFIXES, ModelLoadError

NORM_NAMES = {
    "BatchNorm1d": "batch",
    "BatchNorm2d": "batch",
    "BatchNorm3d": "batch",
    "SyncBatchNorm": "batch",
    "GroupNorm": "group",
    "InstanceNorm1d": "instance",
    "InstanceNorm2d": "instance",
    "InstanceNorm3d": "instance",
    "LayerNorm": "layer",
}
BATCHNORM_TYPES = ("BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm")
OUTPUT_ACTIVATIONS = ("none", "softmax", "sigmoid")
#: Why a traced TorchScript model does not claim the ``batchnorm`` capability (AdaBN).
TRACED_BATCHNORM_NOTE = (
    "AdaBN does not apply to this model's BatchNorm: the model was traced (torch.jit.trace), "
    "which fixes BatchNorm in evaluation mode, so its statistics cannot be re-estimated on the "
    "target; save the network with torch.jit.script instead"
)
PROBABILITY_FLOOR = 1e-12
#: Most voxels one forward pass takes **with** gradients: two 128^3 windows. Larger training
#: batches go through in chunks of this size with gradient checkpointing, so peak memory stays
#: that of one chunk whatever batch size a method is given (about 5.5 GB for the benchmark's
#: 3D U-Net; see docs/model-adapters.md).
TRAINING_VOXELS = 2 * 128**3
#: Most voxels one forward pass takes without gradients (inference): four 128^3 windows. The
#: spec's ``batch_size`` is clamped to this.
INFERENCE_VOXELS = 4 * 128**3


def module_type(module: nn.Module) -> str:
    """Class name of a module, also for TorchScript modules (their ``original_name``)."""
    return getattr(module, "original_name", None) or type(module).__name__


def norm_kinds(network: nn.Module) -> set[str]:
    """Kinds of normalisation layers in a network: ``batch``, ``group``, ``instance``, ``layer``."""
    return {NORM_NAMES[t] for m in network.modules() if (t := module_type(m)) in NORM_NAMES}


def norm_description(network: nn.Module) -> str:
    """The network's normalisation layers, e.g. ``"instance (no affine)"`` or
    ``"batch (affine)"``; ``"none"`` without any."""
    kinds = sorted(norm_kinds(network))
    if not kinds:
        return "none"
    affine = "affine" if norm_affine_parameters(network) else "no affine"
    return f"{'/'.join(kinds)} ({affine})"


def batchnorm_modules(network: nn.Module) -> list[nn.Module]:
    """BatchNorm layers (eager or TorchScript) that keep running statistics."""
    return [
        m
        for m in network.modules()
        if module_type(m) in BATCHNORM_TYPES
        and getattr(m, "running_mean", None) is not None
        and getattr(m, "running_var", None) is not None
    ]


def updates_in_training_mode(layer: nn.Module) -> bool:
    """Whether a forward pass in training mode updates this BatchNorm's running statistics.

    Eager and scripted (``torch.jit.script``) BatchNorm do; a traced one does not: the trace
    recorded ``batch_norm(..., training=False, ...)`` with the mode as a constant.
    """
    if not isinstance(layer, torch.jit.ScriptModule):
        return True
    try:
        return "self.training" in layer.code
    except (RuntimeError, AttributeError):
        return False


def batchnorm_reestimable(network: nn.Module) -> bool:
    """Whether the network has BatchNorm layers with running statistics and a forward pass in
    training mode updates all of them (not a traced model)."""
    layers = batchnorm_modules(network)
    return bool(layers) and all(updates_in_training_mode(m) for m in layers)


def reestimable_batchnorm(network: nn.Module) -> list[nn.Module]:
    """TorchScript BatchNorm layers whose statistics :class:`CumulativeBatchNorm` re-estimates
    (eager layers do it themselves); empty when any BatchNorm layer cannot be re-estimated."""
    if not batchnorm_reestimable(network):
        return []
    return [m for m in batchnorm_modules(network) if isinstance(m, torch.jit.ScriptModule)]


class CumulativeBatchNorm:
    """Running statistics of TorchScript BatchNorm layers as the average over every forward
    pass in training mode since :meth:`restart`.

    Eager BatchNorm does this by itself with ``momentum=None``; TorchScript compiles the
    momentum into the graph as a constant, so it cannot be switched. Instead, around each
    forward pass (:meth:`before`, :meth:`after`; :class:`LogitsNetwork` calls them while it
    tracks), the batch's statistics are recovered from the momentum update
    ``new = (1 - m) old + m batch`` and the buffers are set to the cumulative average
    ``old + (batch - old) / k`` of the k batches seen, which simplifies to
    ``old + (new - old) / (m k)``. With the model's own ``momentum=None`` the factor m is
    ``1 / num_batches_tracked``. Layers in evaluation mode, or not run, are left alone.
    """

    def __init__(self, layers: list[nn.Module]):
        self.layers = list(layers)
        self.counts = [0] * len(self.layers)
        self._before: list[tuple[torch.Tensor, torch.Tensor] | None] = []

    def __len__(self) -> int:
        return len(self.layers)

    @torch.no_grad()
    def restart(self) -> None:
        """Forget the running statistics; the next forward passes estimate them afresh."""
        for layer in self.layers:
            layer.running_mean.data.zero_()
            layer.running_var.data.fill_(1.0)
            if getattr(layer, "num_batches_tracked", None) is not None:
                layer.num_batches_tracked.data.zero_()
        self.counts = [0] * len(self.layers)

    @torch.no_grad()
    def before(self) -> None:
        self._before = [
            (layer.running_mean.detach().clone(), layer.running_var.detach().clone())
            if layer.training
            else None
            for layer in self.layers
        ]

    @torch.no_grad()
    def after(self) -> None:
        for index, (layer, old) in enumerate(zip(self.layers, self._before)):
            if old is None:
                continue
            old_mean, old_var = old
            new_mean, new_var = layer.running_mean.detach(), layer.running_var.detach()
            if torch.equal(new_mean, old_mean) and torch.equal(new_var, old_var):
                continue  # not run in this pass
            momentum = getattr(layer, "momentum", 0.1)
            if momentum is None:
                factor = 1.0 / max(float(layer.num_batches_tracked), 1.0)
            else:
                factor = float(momentum)
            self.counts[index] += 1
            scale = 1.0 / (factor * self.counts[index])
            # .data: the buffers are not part of any gradient computation in training mode
            layer.running_mean.data.copy_(old_mean + (new_mean - old_mean) * scale)
            layer.running_var.data.copy_(old_var + (new_var - old_var) * scale)
        self._before = []


def norm_affine_parameters(network: nn.Module) -> list[nn.Parameter]:
    """Scale and shift parameters of every normalisation layer (eager or TorchScript)."""
    params = []
    for module in network.modules():
        if module_type(module) in NORM_NAMES:
            params += [p for _, p in module.named_parameters(recurse=False)]
    return params


def prefix_parameters(network: nn.Module, prefixes: list[str]) -> list[nn.Parameter]:
    """Parameters whose qualified names start with any of ``prefixes``."""
    if not prefixes:
        return []
    return [p for name, p in network.named_parameters() if name.startswith(tuple(prefixes))]


class _FlooredLog(torch.autograd.Function):
    """``log(max(p, PROBABILITY_FLOOR))`` that keeps only ``p`` for the backward pass (the
    network's softmax keeps the same tensor anyway), not the floored copy autograd would keep:
    one tensor of the output's size less per training step (134 MB for deepbet at 256^3)."""

    @staticmethod
    def forward(ctx, probabilities: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(probabilities)
        return probabilities.clamp_min(PROBABILITY_FLOOR).log()

    @staticmethod
    @once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (probabilities,) = ctx.saved_tensors
        floored = probabilities < PROBABILITY_FLOOR  # clamped: no gradient, as clamp_min
        return (grad / probabilities.clamp_min(PROBABILITY_FLOOR)).masked_fill_(floored, 0.0)


def outputs_to_logits(outputs: torch.Tensor, activation: str) -> torch.Tensor:
    """Network outputs -> logits whose softmax is the class probabilities.

    ``none`` with C > 1 channels: already logits. ``none`` with one channel (a binary logit z):
    [0, z]. ``softmax``: log of the probabilities. ``sigmoid`` (one channel p): [log(1-p), log(p)],
    i.e. two-class probabilities [1 - p, p].
    """
    outputs = outputs.float()
    if activation == "none":
        if outputs.shape[1] == 1:
            return torch.cat([torch.zeros_like(outputs), outputs], dim=1)
        return outputs
    if activation == "softmax":
        return _FlooredLog.apply(outputs)
    probability = outputs.clamp(PROBABILITY_FLOOR, 1 - 1e-7)
    return torch.cat([torch.log1p(-probability), probability.log()], dim=1)


class LogitsNetwork(nn.Module):
    """A TorchScript network that returns logits (N, C, ...) for the product's softmax.

    Args:
        scripted: the TorchScript module (kept as the submodule ``scripted``).
        activation: what the network applies last: ``"none"``, ``"softmax"`` or ``"sigmoid"``.
        num_classes: classes the output must describe.
        inference_batch_size: without gradients, inputs go through at most this many at a time.
            Default 1.
        name: used in error messages.
        cpu_bfloat16: on the CPU, run the network under bfloat16 autocast (logits come back
            float32) in every pass. Default False (deepbet's ``bfloat16`` option sets it;
            faster per pass on a CPU with native bfloat16; docs/performance.md).
        cpu_bfloat16_training: on the CPU, bfloat16 autocast in the passes *with gradients*
            only (adaptation's training steps), so predictions stay float32. Default False
            (deepbet's ``bfloat16_training`` option sets it).
    """

    def __init__(
        self,
        scripted: nn.Module,
        activation: str,
        num_classes: int,
        inference_batch_size: int = 1,
        name: str = "model",
        cpu_bfloat16: bool = False,
        cpu_bfloat16_training: bool = False,
    ):
        super().__init__()
        if activation not in OUTPUT_ACTIVATIONS:
            raise ModelLoadError(f"output activation must be one of {OUTPUT_ACTIVATIONS}")
        self.scripted = scripted
        self.activation = activation
        self.num_classes = num_classes
        self.inference_batch_size = max(1, int(inference_batch_size))
        self.name = name
        self.cpu_bfloat16 = bool(cpu_bfloat16)
        self.cpu_bfloat16_training = bool(cpu_bfloat16_training)
        #: While set (:meth:`track_batchnorm`), BatchNorm statistics are cumulative averages.
        self.batchnorm_statistics: CumulativeBatchNorm | None = None

    def track_batchnorm(self) -> CumulativeBatchNorm | None:
        """Make the scripted BatchNorm layers' running statistics the average over forward
        passes in training mode (AdaBN, target statistics); None if there are none to
        re-estimate. :meth:`untrack_batchnorm` ends it."""
        layers = reestimable_batchnorm(self.scripted)
        self.batchnorm_statistics = CumulativeBatchNorm(layers) if layers else None
        return self.batchnorm_statistics

    def untrack_batchnorm(self) -> None:
        self.batchnorm_statistics = None

    def __deepcopy__(self, memo: dict) -> LogitsNetwork:
        # Deep-copying a ScriptModule with gradients enabled clones its parameters into
        # non-leaf tensors (whose requires_grad cannot be switched off); copy without them.
        with torch.no_grad():
            scripted = copy.deepcopy(self.scripted, memo)
        for new, old in zip(scripted.parameters(), self.scripted.parameters()):
            new.requires_grad_(old.requires_grad)
        twin = LogitsNetwork(scripted, *self._arguments())
        memo[id(self)] = twin
        return twin.train(self.training)

    def __reduce__(self):
        # ScriptModules do not pickle: the network crosses processes as TorchScript bytes
        # (the engine can run in a separate process, see adaptation/worker_process.py).
        arguments = self._arguments()
        return _unpickle_logits_network, (ScriptBytes.of(self.scripted), arguments, self.training)

    def _arguments(self) -> tuple:
        """The constructor's arguments after ``scripted``."""
        return (
            self.activation,
            self.num_classes,
            self.inference_batch_size,
            self.name,
            self.cpu_bfloat16,
            self.cpu_bfloat16_training,
        )

    def _expected_channels(self) -> set[int]:
        if self.activation == "sigmoid":
            return {1}
        if self.activation == "none" and self.num_classes == 2:
            return {1, 2}  # one binary logit or two class logits
        return {self.num_classes}

    def uses_bfloat16(self, device: torch.device, training: bool) -> bool:
        """Whether a pass on ``device`` (with gradients when ``training``) runs under bfloat16
        autocast: on the CPU only, always with :attr:`cpu_bfloat16`, in passes with gradients
        with :attr:`cpu_bfloat16_training`."""
        wanted = self.cpu_bfloat16 or (training and self.cpu_bfloat16_training)
        return wanted and device.type == "cpu"

    def _run(self, inputs: torch.Tensor, training: bool = False) -> torch.Tensor:
        tracker = self.batchnorm_statistics
        if tracker is not None:
            tracker.before()
        bfloat16 = self.uses_bfloat16(inputs.device, training)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bfloat16):
            outputs = self.scripted(inputs)
        if tracker is not None:
            tracker.after()
        if not isinstance(outputs, torch.Tensor) or outputs.shape[2:] != inputs.shape[2:]:
            shape = tuple(outputs.shape) if isinstance(outputs, torch.Tensor) else type(outputs)
            raise ModelLoadError(
                f"{self.name}: the network returned {shape} for input {tuple(inputs.shape)}; "
                "it must return (N, C, same spatial size)"
            )
        if outputs.shape[1] not in self._expected_channels():
            raise ModelLoadError(
                f"{self.name}: the network returned {outputs.shape[1]} channels but "
                f"{self.num_classes} classes with output activation {self.activation!r} "
                f"need {' or '.join(map(str, sorted(self._expected_channels())))}"
            )
        return outputs_to_logits(outputs, self.activation)

    def chunk_size(self, inputs: torch.Tensor, training: bool) -> int:
        """See :func:`chunk_size`, with the spec's batch size."""
        return chunk_size(inputs, training, self.inference_batch_size)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        training = torch.is_grad_enabled() and (
            inputs.requires_grad or any(p.requires_grad for p in self.scripted.parameters())
        )
        run = functools.partial(self._run, training=training)
        return forward_in_chunks(run, inputs, self.chunk_size(inputs, training), training)


def chunk_size(inputs: torch.Tensor, training: bool, inference_batch_size: int = 1) -> int:
    """How many of ``inputs`` go through one forward pass: with gradients at most
    :data:`TRAINING_VOXELS`, without at most :data:`INFERENCE_VOXELS` voxels and
    ``inference_batch_size``; never less than one input."""
    voxels = max(1, math.prod(inputs.shape[2:]))
    if training:
        return max(1, TRAINING_VOXELS // voxels)
    return max(1, min(inference_batch_size, INFERENCE_VOXELS // voxels))


def forward_in_chunks(run, inputs: torch.Tensor, chunk: int, training: bool) -> torch.Tensor:
    """``run`` on ``inputs`` at most ``chunk`` at a time (the memory clamp of networks brought
    by users; :func:`chunk_size`), the outputs concatenated.

    With gradients (``training``), each chunk goes through gradient checkpointing: its
    activations are recomputed during the backward pass instead of kept, so memory is one
    chunk's. BatchNorm in training mode normalises each chunk with its own statistics and sees
    it again in the backward pass (the same statistics: re-estimated averages,
    CumulativeBatchNorm's or momentum None, keep them). (Early stop off: it stops the
    recomputation with an exception, which the TorchScript interpreter turns into an error.)
    """
    if inputs.shape[0] <= chunk:
        return run(inputs)
    parts = range(0, len(inputs), chunk)
    if not training:
        return torch.cat([run(inputs[i : i + chunk]) for i in parts])
    with set_checkpoint_early_stop(False):
        return torch.cat(
            [checkpoint(run, inputs[i : i + chunk], use_reentrant=False) for i in parts]
        )


class ScriptedAdapterMixin:
    """Parameter groups and capabilities of an adapter whose ``network`` is a
    :class:`LogitsNetwork`. Subclasses set ``network``, ``first_block_prefixes`` (module-name
    prefixes inside the scripted module) and ``trainable``."""

    network: LogitsNetwork
    first_block_prefixes: list[str]
    trainable: str = "all"
    save_suffix = ".pt"
    save_description = "TorchScript model (.pt with its .json spec)"

    def __getstate__(self) -> dict[str, Any]:
        # other TorchScript modules the adapter holds (deepbet's localiser) pickle as bytes
        state = self.__dict__.copy()
        for key, value in state.items():
            if isinstance(value, torch.jit.ScriptModule):
                state[key] = ScriptBytes.of(value)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        for key, value in state.items():
            self.__dict__[key] = value.load() if isinstance(value, ScriptBytes) else value

    def saved_files(self, path: str | os.PathLike) -> list[Path]:
        """The TorchScript file and its JSON spec next to it."""
        path = Path(path)
        return [path, path.with_suffix(".json")]

    @property
    def scripted(self) -> nn.Module:
        """The TorchScript module itself (parameter names as in the file)."""
        return self.network.scripted

    def set_trainable(self, trainable: str) -> None:
        """Which parameters methods update as "all": ``"all"`` or ``"first_blocks"``."""
        if trainable not in ("all", "first_blocks"):
            raise ModelLoadError(f"trainable must be all or first_blocks, not {trainable!r}")
        if trainable == "first_blocks" and not self.first_block_params():
            raise ModelLoadError(
                "trainable is first_blocks but no parameter matches the first-block prefixes "
                f"{self.first_block_prefixes}"
            )
        self.trainable = trainable

    def first_block_params(self) -> list[nn.Parameter]:
        return prefix_parameters(self.scripted, self.first_block_prefixes)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``all``: every parameter, or only the first blocks when :attr:`trainable` is
        ``"first_blocks"`` (methods that train "all" then train those); ``every``: every
        parameter; ``early`` / ``first_blocks``: the first blocks, if named; ``norm``: affine
        parameters of normalisation layers, if any."""
        every = list(self.scripted.parameters())
        early = self.first_block_params()
        groups = {"all": early if self.trainable == "first_blocks" else every, "every": every}
        if early:
            groups["early"] = early
            groups["first_blocks"] = early
        norm = norm_affine_parameters(self.scripted)
        if norm:
            groups["norm"] = norm
        return groups

    def scripted_capabilities(self) -> set[str]:
        """``norm_affine`` if normalisation layers have affine parameters (TENT); ``batchnorm``
        if it has BatchNorm layers with running statistics that were scripted, not traced
        (AdaBN; :data:`TRACED_BATCHNORM_NOTE`). Never an early head or a bottleneck."""
        capabilities = {NORM_AFFINE} if norm_affine_parameters(self.scripted) else set()
        if batchnorm_reestimable(self.scripted):
            capabilities.add(BATCHNORM)
        return capabilities

    def capability_notes(self) -> list[str]:
        """Why methods that look applicable are not (shown in the model's details)."""
        traced = batchnorm_modules(self.scripted) and not batchnorm_reestimable(self.scripted)
        return [TRACED_BATCHNORM_NOTE] if traced else []

    def norm_description(self) -> str:
        return norm_description(self.scripted)

    def parameter_counts(self) -> dict[str, int]:
        return {
            "parameters": sum(p.numel() for p in self.scripted.parameters()),
            "first_block_parameters": sum(p.numel() for p in self.first_block_params()),
        }


def load_scripted_network(path: Path) -> torch.jit.ScriptModule:
    """``torch.jit.load`` on the CPU, with a one-line error for files that are not TorchScript."""
    if not path.exists():
        raise ModelLoadError(f"{path}: no such file")
    try:
        network = torch.jit.load(str(path), map_location="cpu")
    except Exception as error:  # torch raises RuntimeError/ValueError with long messages
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelLoadError(f"{path}: not a TorchScript model ({message[:200]})") from None
    problem = non_finite_weights(dict(network.state_dict()))
    if problem:
        raise ModelLoadError(f"{path}: {problem}")
    return network.eval()


def save_scripted(network: nn.Module, spec: dict[str, Any], path: str | os.PathLike) -> Path:
    """Write the TorchScript ``network`` to ``path`` (``.pt``) and ``spec`` to the ``.json`` next
    to it, each atomically (temporary file, then rename). Returns the ``.pt`` path."""
    path = Path(path)
    if path.suffix.lower() not in TORCHSCRIPT_SUFFIXES:
        raise ModelLoadError(f"{path}: a TorchScript model is saved as .pt")
    spec = dict(spec, file=path.name)
    with torch.no_grad():  # see LogitsNetwork.__deepcopy__
        network = copy.deepcopy(network).cpu().eval()
    spec_text = json.dumps(spec, indent=2, default=_json_default)
    with atomic_output(path) as temporary:
        torch.jit.save(network, str(temporary))
    with atomic_output(path.with_suffix(".json")) as temporary:
        temporary.write_text(spec_text)
    return path


def _json_default(value: Any) -> Any:
    """numpy / torch scalars and arrays in a spec's provenance as plain JSON values."""
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


@dataclass
class ScriptBytes:
    """A TorchScript module saved to bytes (with which parameters train and its mode), so that
    objects holding one can be pickled; ScriptModules themselves cannot."""

    data: bytes
    requires_grad: list[bool]
    training: bool

    @classmethod
    def of(cls, module: nn.Module) -> ScriptBytes:
        buffer = io.BytesIO()
        torch.jit.save(module, buffer)
        flags = [parameter.requires_grad for parameter in module.parameters()]
        return cls(buffer.getvalue(), flags, module.training)

    def load(self) -> nn.Module:
        """The module again, on the device it was saved from."""
        module = torch.jit.load(io.BytesIO(self.data))
        for parameter, flag in zip(module.parameters(), self.requires_grad, strict=True):
            parameter.requires_grad_(flag)
        return module.train(self.training)


def _unpickle_logits_network(
    scripted: ScriptBytes, arguments: tuple, training: bool
) -> LogitsNetwork:
    """Rebuild a pickled :class:`LogitsNetwork` (see ``LogitsNetwork.__reduce__``)."""
    return LogitsNetwork(scripted.load(), *arguments).train(training)
