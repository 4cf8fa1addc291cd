"""Exercises whose checks reach the student: in the handout of every real chapter (solutions
removed), each `srlib.checks` call survives, sits after its stub, and fails on the stub."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

import bookbuild as book
from srlib import checks

ROOT = Path(__file__).resolve().parents[1]
CHAPTERS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
CHECK_CALL = re.compile(r"^checks\.(\w+)\((\w+)\)\s*$", re.MULTILINE)


def _tags(cell: dict) -> list[str]:
    return cell.get("metadata", {}).get("tags", [])


def _source(cell: dict) -> str:
    return "".join(cell["source"])


@pytest.mark.parametrize("path", CHAPTERS, ids=lambda p: p.stem)
def test_every_check_survives_in_the_handout_and_fails_on_its_stub(path):
    notebook = json.loads(path.read_text())
    calls = [m for c in notebook["cells"] if c["cell_type"] == "code" for m in CHECK_CALL.findall(_source(c))]
    handout = book.handout_notebook(notebook)["cells"]
    assert not any(book.SOLUTION_TAG in _tags(c) for c in handout)
    survived = [m for c in handout if c["cell_type"] == "code" for m in CHECK_CALL.findall(_source(c))]
    assert survived == calls  # no check left with a solution
    for index, cell in enumerate(handout):
        for check, function in CHECK_CALL.findall(_source(cell)):
            assert book.SOLUTION_TAG not in _tags(cell) and hasattr(checks, check)
            stubs = [c for c in handout[:index] if "exercise" in _tags(c) and f"def {function}(" in _source(c)]
            assert stubs, f"{path.stem}: checks.{check}({function}) has no stub tagged 'exercise' above it"
            namespace = {"torch": torch, "checks": checks}
            exec(_source(stubs[-1]), namespace)
            with pytest.raises(NotImplementedError):
                exec(_source(cell), namespace)


def test_the_chapters_have_checked_exercises():
    with_checks = [
        p.stem for p in CHAPTERS if any(CHECK_CALL.search(_source(c)) for c in json.loads(p.read_text())["cells"])
    ]
    assert len(with_checks) >= 6
