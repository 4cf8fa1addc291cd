"""Every chapter notebook: clean source, a documented parameters cell, listed in the book,
and executed under the smoke profile with papermill (by `make book-smoke`, which `make test`
runs first; a notebook the smoke build did not execute is executed here)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from bookbuild import BuildPaths, chapter_stems, read_toc
from srlib.results import load_results

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _parameters_cell(path: Path) -> dict:
    cells = [c for c in _cells(path) if "parameters" in c.get("metadata", {}).get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged parameters, found {len(cells)}"
    return cells[0]


def test_there_are_chapters_and_all_are_in_the_toc():
    assert len(NOTEBOOKS) >= 6
    listed = set(chapter_stems(read_toc(ROOT / "_toc.yml")))
    assert {p.stem for p in NOTEBOOKS} <= listed


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_source_notebook_is_clean_and_documents_its_parameters(path):
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert not cell.get("outputs") and cell.get("execution_count") is None, f"{path.name} has committed outputs"
    source = "".join(_parameters_cell(path)["source"])
    names = [t.id for node in ast.parse(source).body if isinstance(node, ast.Assign) for t in node.targets]
    assert names[:2] == ["PROFILE", "RESULTS_PATH"]
    assert 'PROFILE = "cpu"' in source
    for line in source.splitlines():
        if line and not line.startswith("#") and "=" in line:
            assert "#" in line, f"{path.name}: parameter line without a comment: {line!r}"


@pytest.mark.notebook
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_under_the_smoke_profile(path, tmp_path):
    paths = BuildPaths(ROOT, "smoke")
    executed, results = paths.executed(path.stem), paths.results(path.stem)
    if not (executed.is_file() and results.is_file() and executed.stat().st_mtime >= path.stat().st_mtime):
        from bookbuild import execute_notebook

        executed, results = tmp_path / path.name, tmp_path / (path.stem + ".results.json")
        execute_notebook(path, executed, results, "smoke")
    cells = json.loads(executed.read_text())["cells"]
    errors = [o for c in cells for o in c.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    assert sum(1 for c in cells if c.get("outputs")) >= 3
    data = load_results(results)
    assert data["profile"] == "smoke" and data["tables"]
