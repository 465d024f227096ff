"""A blank or constant scan is refused before adaptation (napari's Adapt widget and the CLI both
go through TargetSet), instead of being adapted to and called mostly foreground."""

from __future__ import annotations

import numpy as np
import pytest

from napari_uda.adaptation.targets import TargetSet
from napari_uda.core.volume import VolumeError


@pytest.mark.parametrize("value", [0.0, 37.0])
def test_a_constant_scan_is_refused_with_one_line(tiny_model, tiny_target, value):
    blank = tiny_target.with_data(np.full(tiny_target.shape, value, np.float32))
    with pytest.raises(VolumeError) as caught:
        TargetSet.prepare(tiny_model, [tiny_target, blank])
    message = str(caught.value)
    assert "\n" not in message and f"every voxel is {value:g}" in message
    assert len(TargetSet.prepare(tiny_model, tiny_target)) == 1  # a real scan still prepares
