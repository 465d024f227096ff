"""Expected volumes: parsing the user's and the model's ranges, and flagging results outside."""

from __future__ import annotations

import numpy as np
import pytest

from napari_uda.core.plausibility import (
    ExpectedVolumeError,
    PlausibilitySettings,
    class_volumes,
    flag_lines,
    format_expected_volumes,
    merge_expected,
    parse_expected_volumes,
    volume_flags,
)
from napari_uda.settings import describe


def test_parses_one_or_several_classes_and_round_trips():
    expected = parse_expected_volumes("brain=1000:1800, csf = 100:300", ["bg", "brain", "csf"])
    assert expected == {"brain": (1000.0, 1800.0), "csf": (100.0, 300.0)}
    assert parse_expected_volumes(format_expected_volumes(expected)) == expected
    assert parse_expected_volumes(["brain=1:2", "csf=3:4"]) == {"brain": (1, 2), "csf": (3, 4)}
    assert parse_expected_volumes({"brain": [1000, 1800]}) == {"brain": (1000.0, 1800.0)}
    assert parse_expected_volumes("") == {}


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("brain", "name=low:high"),
        ("brain=1000", "name=low:high"),
        ("brain=a:b", "two numbers"),
        ("brain=1800:1000", "low < high"),
        ("brain=-5:10", "low < high"),
        ("brain=nan:10", "low < high"),
        ("tumour=1:2", "not a class of the model"),
        ("background=1:2", "not a class of the model"),
    ],
)
def test_bad_ranges_are_one_line_naming_the_problem(text, words):
    with pytest.raises(ExpectedVolumeError) as error:
        parse_expected_volumes(text, ["background", "brain"], where="--expected-volume")
    message = str(error.value)
    assert words in message and "\n" not in message and message.startswith("--expected-volume")


def test_flags_volumes_outside_their_range_loudly():
    labels = np.zeros((10, 10, 10), np.uint8)
    labels[:5] = 1  # 500 voxels of 8 mm^3 = 4 ml
    volumes = class_volumes(labels, (2.0, 2.0, 2.0), ["background", "brain"])
    assert volumes == {"brain": pytest.approx(4.0)}
    assert volume_flags(volumes, {"brain": (3.0, 5.0)}) == []
    [flag] = volume_flags(volumes, {"brain": (10.0, 20.0)})
    assert flag.message == "brain: 4 ml is below the expected 10-20 ml"
    [line] = flag_lines([flag])
    assert line.startswith("implausible volume in the mask: brain: 4 ml is below")
    [above] = volume_flags(volumes, {"brain": (1.0, 2.0)})
    assert "above the expected 1-2 ml" in above.message


def test_user_ranges_replace_the_models_class_by_class():
    model = {"brain": (900.0, 2200.0), "csf": (1.0, 2.0)}
    assert merge_expected(model, {"brain": (1000.0, 1800.0)}) == {
        "brain": (1000.0, 1800.0),
        "csf": (1.0, 2.0),
    }


def test_the_setting_is_documented_for_forms_and_cli():
    [spec] = describe(PlausibilitySettings)
    assert spec.name == "expected_volume" and "brain=1000:1800" in spec.help


def test_models_state_their_range(demo_model):
    from napari_uda.core.models.deepbet import EXPECTED_BRAIN_ML

    # the demo bundle states the range `train` derives from its one training mask (2073 ml)
    assert demo_model.expected_volumes() == {"brain": (1040.0, 3110.0)}
    stated = demo_model.clone()
    stated.bundle.source_statistics["expected_volume_ml"] = {"brain": [1000, 1800]}
    assert stated.expected_volumes() == {"brain": (1000.0, 1800.0)}
    stated.bundle.source_statistics["expected_volume_ml"] = {"brain": [1800, 1000]}
    with pytest.raises(ExpectedVolumeError, match="expected_volume_ml"):
        stated.expected_volumes()
    assert EXPECTED_BRAIN_ML[0] < 1000 and EXPECTED_BRAIN_ML[1] > 1800
