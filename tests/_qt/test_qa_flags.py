"""The QA widget flags an implausible volume loudly and says the entropy map is no error map."""

from __future__ import annotations

import numpy as np

from napari_uda._qt.layers import show_entropy, show_labels
from napari_uda._qt.qa_widget import ENTROPY_NOTE


def test_qa_flags_an_implausible_volume_and_explains_entropy(docked, demo_model):
    viewer, widgets = docked
    model = demo_model.clone()
    model.bundle.source_statistics["expected_volume_ml"] = {"brain": [10, 20]}
    state = widgets["QA"].state
    state.model = model
    shape = (10, 10, 10)
    before = np.zeros(shape, np.uint8)
    before[2:4, 2:8, 2:8] = 1  # 72 voxels of 27 mm^3: 1.9 ml, below the range
    after = np.zeros(shape, np.uint8)
    after[1:9, 1:9, 1:9] = 1  # 512 voxels: 13.8 ml, inside
    entropy = np.full(shape, 0.1, np.float32)
    target = viewer.add_image(entropy, name="scan", scale=(3.0, 3.0, 3.0))
    show_labels(viewer, "segmentation (before)", before, target)
    show_labels(viewer, "segmentation (after)", after, target)
    show_entropy(viewer, "entropy (before)", entropy, target)
    show_entropy(viewer, "entropy (after)", entropy, target)
    qa = widgets["QA"]
    qa.refresh_button.click()

    assert qa.flags.isVisibleTo(qa), (qa.flags.text(), qa.message.text())
    assert qa.flags.text() == (
        "⚠ implausible volume in before: brain: 2 ml is below the expected 10-20 ml"
    )
    assert qa.entropy_note.text() == ENTROPY_NOTE and qa.entropy_note.isVisibleTo(qa)
    assert "not an error map" in ENTROPY_NOTE

    after[:] = 1  # the whole volume painted: 27 ml, above the range
    viewer.layers["segmentation (after)"].data = after
    qa.refresh_button.click()
    assert "implausible volume in after: brain: 27 ml is above the expected 10-20 ml" in (
        qa.flags.text()
    )
