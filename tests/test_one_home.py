"""One home for every size: no chapter and no srlib module other than `srlib/profiles.py` picks
a value by a profile's name (issue "One home"). Banners such as `if PROFILE == "smoke":
display(...)` are fine; an assignment, a conditional expression or a dict keyed by a profile
name is a size chosen outside the profile."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from srlib.profiles import PROFILES

ROOT = Path(__file__).resolve().parents[1]
NAMES = set(PROFILES)
EXEMPT_MODULES = {"profiles.py"}


def _is_profile_name(node: ast.AST) -> bool:
    """`PROFILE`, `profile.name` or `<anything>.profile.name`: the expression a chapter tests."""
    return (isinstance(node, ast.Name) and node.id == "PROFILE") or (
        isinstance(node, ast.Attribute)
        and node.attr == "name"
        and isinstance(node.value, (ast.Name, ast.Attribute))
        and getattr(node.value, "id", getattr(node.value, "attr", "")) == "profile"
    )


def _names_a_profile(test: ast.AST) -> bool:
    """Whether `test` compares a profile's name with a profile name."""
    for node in ast.walk(test):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any(_is_profile_name(s) for s in sides) and any(
                isinstance(c, ast.Constant) and c.value in NAMES for s in sides for c in ast.walk(s)
            ):
                return True
    return False


def size_choices_by_name(code: str) -> list[str]:
    """The lines of `code` that choose a value by a profile name."""
    found = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.IfExp) and _names_a_profile(node.test):
            found.append(f"line {node.lineno}: a conditional value on a profile name")
        elif (
            isinstance(node, ast.Dict) and sum(isinstance(k, ast.Constant) and k.value in NAMES for k in node.keys) > 1
        ):
            found.append(f"line {node.lineno}: a dict keyed by profile names")
        elif (
            isinstance(node, ast.If)
            and _names_a_profile(node.test)
            and any(isinstance(n, (ast.Assign, ast.AugAssign, ast.AnnAssign)) for b in node.body for n in ast.walk(b))
        ):
            found.append(f"line {node.lineno}: an assignment under a test of a profile name")
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Compare) and _names_a_profile(node.value):
            found.append(f"line {node.lineno}: a flag that stands for a profile name")
    return found


def _notebook_code(path: Path) -> str:
    cells = json.loads(path.read_text())["cells"]
    return "\n".join(
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code"
        and "parameters" not in c.get("metadata", {}).get("tags", [])
        and not "".join(c["source"]).lstrip().startswith(("%", "!"))
    )


@pytest.mark.parametrize("path", sorted((ROOT / "notebooks").glob("*.ipynb")), ids=lambda p: p.stem)
def test_no_chapter_picks_a_size_by_profile_name(path):
    assert size_choices_by_name(_notebook_code(path)) == []


@pytest.mark.parametrize(
    "path", [p for p in sorted((ROOT / "srlib").glob("*.py")) if p.name not in EXEMPT_MODULES], ids=lambda p: p.stem
)
def test_no_module_picks_a_size_by_profile_name(path):
    assert size_choices_by_name(path.read_text()) == []


def test_the_scanner_finds_each_kind_of_size_choice():
    assert size_choices_by_name('K = 8 if PROFILE == "smoke" else 64') != []
    assert size_choices_by_name('N = {"smoke": 6, "cpu": 96}.get(PROFILE, 1000)') != []
    assert size_choices_by_name('if profile.name == "cpu":\n    TOKENS = 300_000') != []
    assert size_choices_by_name('smoke = profile.name == "smoke"') != []
    assert size_choices_by_name('if PROFILE == "smoke":\n    display("numbers are meaningless")') == []
    assert size_choices_by_name('dtype = 32 if device.type == "cpu" else 16') == []  # a device, not a profile
