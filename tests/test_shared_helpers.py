"""The one home of length-sorted batching (`srlib.activations.length_batches`) and of the
"mean ± sd" label (`srlib.evaluate.mean_sd`): what they return, and that no other srlib module
or benchmark writes its own copy."""

from __future__ import annotations

import math
import re
from pathlib import Path

import pytest

from srlib.activations import length_batches
from srlib.errors import ConfigError
from srlib.evaluate import mean_sd

ROOT = Path(__file__).resolve().parents[1]


def test_length_batches_sort_stably_and_cover_every_index_once():
    lengths = [5, 1, 3, 1, 5, 2, 3]
    batches = length_batches(lengths, 3)
    assert batches == [[1, 3, 5], [2, 6, 0], [4]]
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert length_batches(lengths, 3, longest_first=True) == [[0, 4, 2], [6, 5, 1], [3]]
    assert length_batches([], 4) == []


def test_equal_length_batches_never_mix_two_lengths():
    lengths = [64, 32, 64, 32, 32, 96]
    batches = length_batches(lengths, 2, longest_first=True, equal_lengths=True)
    assert batches == [[5], [0, 2], [1, 3], [4]]
    assert all(len({lengths[i] for i in b}) == 1 for b in batches)


def test_a_batch_size_below_one_is_refused():
    with pytest.raises(ConfigError, match="batch_size"):
        length_batches([1, 2], 0)


@pytest.mark.parametrize(
    ("mean", "sd", "digits", "label"),
    [
        (71.04, 1.25, 1, "71.0 ± 1.2"),
        (71.04, None, 1, "71.0"),
        (71.04, math.nan, 1, "71.0"),
        (math.nan, 1.0, 1, "–"),
        (0.5, 0.25, 3, "0.500 ± 0.250"),
        (12.6, 3.4, 0, "13 ± 3"),
    ],
)
def test_mean_sd_labels(mean, sd, digits, label):
    assert mean_sd(mean, sd, digits=digits) == label


def _sources() -> dict[Path, str]:
    files = [*sorted((ROOT / "srlib").rglob("*.py")), *sorted((ROOT / "benchmarks").glob("*.py"))]
    return {path: path.read_text() for path in files}


def test_no_module_sorts_by_length_for_batches_or_formats_mean_sd_itself():
    """A second copy of either helper is what this test exists to catch."""
    by_length = re.compile(r"sorted\(range\(len\(\w+\)\),\s*key=lambda \w+: len\(")
    plus_minus = re.compile(r"\}\s*±\s*\{")  # an f-string "{mean} ± {sd}"
    found = [
        f"{path.relative_to(ROOT)}: {pattern.pattern}"
        for path, text in _sources().items()
        for pattern in (by_length, plus_minus)
        if pattern.search(text) and not (path.name == "evaluate.py" and pattern is plus_minus)
    ]
    assert not found
