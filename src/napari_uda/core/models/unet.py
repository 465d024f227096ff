"""The 2D U-Net of the papers, with an early-feature segmentation head and a bottleneck tap.

* Mean Teacher (Perone et al. 2019) uses a U-Net with GroupNorm and dropout.
* UDAS (Sheikh & Schultz) adds an *early segmentation head* on the features of the first
  resolution level; during adaptation only the layers shared by both heads (the first encoder
  block) update.
* AIVA aligns *bottleneck* features between sites.

:meth:`UNet2D.forward` returns logits; :meth:`UNet2D.forward_features` returns logits, early
logits and bottleneck features in one pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Literal, NamedTuple

import torch
from torch import nn

from ..fields import known_keys, mapping, one_of, real_number, whole_number

NormType = Literal["batch", "group", "instance"]
#: The deepest U-Net (slices are padded to a multiple of 2**depth: 256 pixels at 8).
MAX_DEPTH = 8


@dataclass
class UNetConfig:
    """Architecture of :class:`UNet2D`.

    Attributes:
        in_channels: image channels. Default 1.
        num_classes: output classes including background (softmax). Default 2.
        base_channels: features of the first level, doubled at each level. Default 16.
        depth: number of down-sampling steps (input sides must be multiples of 2**depth).
            Default 4.
        norm: ``"batch"`` (default; lets AdaBN re-estimate statistics), ``"group"`` (Perone et
            al.) or ``"instance"``.
        groups: groups for GroupNorm. Default 8.
        dropout: dropout rate in every block. Default 0.1.
        early_head: add the UDAS early segmentation head. Default True.
        early_head_layers: 3 (default) for the head of Sheikh & Schultz's code (three 3x3
            convolutions, first-level features -> 12 -> 8 -> classes, with ReLU); 1 for a
            single 1x1 convolution, which cannot see enough context to separate brain from
            scalp (bundles saved before this option have it).
    """

    in_channels: int = 1
    num_classes: int = 2
    base_channels: int = 16
    depth: int = 4
    norm: NormType = "batch"
    groups: int = 8
    dropout: float = 0.1
    early_head: bool = True
    early_head_layers: int = 3

    def __post_init__(self) -> None:
        """Every field's type and range (a bundle header is data from someone else); a bad
        one raises :class:`~napari_uda.core.fields.FieldError` naming it."""
        self.in_channels = whole_number(self.in_channels, "in_channels", minimum=1, maximum=64)
        self.num_classes = whole_number(self.num_classes, "num_classes", minimum=2, maximum=1000)
        self.base_channels = whole_number(
            self.base_channels, "base_channels", minimum=1, maximum=1024
        )
        self.depth = whole_number(self.depth, "depth", minimum=1, maximum=MAX_DEPTH)
        self.norm = one_of(self.norm, "norm", ("batch", "group", "instance"))
        self.groups = whole_number(self.groups, "groups", minimum=1, maximum=1024)
        self.dropout = real_number(self.dropout, "dropout", minimum=0.0, below=1.0)
        self.early_head = one_of(self.early_head, "early_head", (True, False))
        self.early_head_layers = one_of(self.early_head_layers, "early_head_layers", (1, 3))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> UNetConfig:
        values = mapping(values, "architecture")
        values.setdefault("early_head_layers", 1)  # bundles made before the option existed
        known_keys(values, "architecture", {f.name for f in fields(cls)})
        return cls(**values)


class UNetOutputs(NamedTuple):
    logits: torch.Tensor
    early_logits: torch.Tensor | None
    bottleneck: torch.Tensor


def make_norm(kind: NormType, channels: int, groups: int) -> nn.Module:
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "group":
        groups = min(groups, channels)
        if channels % groups:
            raise ValueError(
                f"GroupNorm needs the channels ({channels}) to be a multiple of the groups "
                f"({groups}); change base_channels or groups"
            )
        return nn.GroupNorm(groups, channels)
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    raise ValueError(f"unknown norm type {kind!r}; choose batch, group or instance")


class ConvBlock(nn.Sequential):
    """Two 3x3 convolutions, each followed by normalisation and ReLU, then dropout."""

    def __init__(self, cin: int, cout: int, norm: NormType, groups: int, dropout: float):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            make_norm(norm, cout, groups),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            make_norm(norm, cout, groups),
            nn.ReLU(inplace=True),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
        )


def make_early_head(channels: int, num_classes: int, layers: int) -> nn.Module:
    """The UDAS early segmentation head on the first level's ``channels`` features."""
    if layers == 1:
        return nn.Conv2d(channels, num_classes, 1)
    if layers == 3:
        return nn.Sequential(
            nn.Conv2d(channels, 12, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(12, 8, 3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(8, num_classes, 3, padding=1),
        )
    raise ValueError(f"early_head_layers must be 1 or 3, not {layers}")


class UNet2D(nn.Module):
    """2D U-Net. ``encoders[0]`` is the *early* block shared by the final and the early head."""

    def __init__(self, config: UNetConfig | None = None):
        super().__init__()
        self.config = config = config or UNetConfig()
        widths = [config.base_channels * 2**level for level in range(config.depth + 1)]
        block = lambda cin, cout: ConvBlock(cin, cout, config.norm, config.groups, config.dropout)  # noqa: E731
        self.encoders = nn.ModuleList(
            [block(config.in_channels, widths[0])]
            + [block(widths[i - 1], widths[i]) for i in range(1, config.depth)]
        )
        self.pool = nn.MaxPool2d(2)
        self.bottleneck = block(widths[config.depth - 1], widths[config.depth])
        self.upsamples = nn.ModuleList(
            nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2)
            for i in reversed(range(config.depth))
        )
        self.decoders = nn.ModuleList(
            block(2 * widths[i], widths[i]) for i in reversed(range(config.depth))
        )
        self.head = nn.Conv2d(widths[0], config.num_classes, 1)
        self.early_head = (
            make_early_head(widths[0], config.num_classes, config.early_head_layers)
            if config.early_head
            else None
        )

    @property
    def num_classes(self) -> int:
        return self.config.num_classes

    def early_parameters(self) -> list[nn.Parameter]:
        """Parameters of the early block shared by both heads (what UDAS updates)."""
        return list(self.encoders[0].parameters())

    def forward_features(self, x: torch.Tensor, early: bool = True) -> UNetOutputs:
        """Logits, early logits (None without an early head, or when ``early`` is False: it
        costs about 5 % of a pass) and the bottleneck features, in one pass."""
        multiple = 2**self.config.depth
        if x.shape[-1] % multiple or x.shape[-2] % multiple:
            raise ValueError(
                f"input of size {tuple(x.shape[-2:])} is not a multiple of {multiple} "
                f"(2 ** depth); pad it (PreprocessingConfig.pad_multiple)"
            )
        skips = []
        for encoder in self.encoders:
            x = encoder(x)
            skips.append(x)
            x = self.pool(x)
        bottleneck = self.bottleneck(x)
        x = bottleneck
        for upsample, decoder, skip in zip(self.upsamples, self.decoders, reversed(skips)):
            x = decoder(torch.cat([upsample(x), skip], dim=1))
        early_logits = self.early_head(skips[0]) if early and self.early_head is not None else None
        return UNetOutputs(self.head(x), early_logits, bottleneck)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits only (the early head is not computed)."""
        return self.forward_features(x, early=False).logits
