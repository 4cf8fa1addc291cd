"""`srlib.baselines.registry` is the one list of baseline methods: the CLI's choices, chapter 8's
rows and settings, the benchmarks and `fit_baseline` read it, and no other file of srlib, the
benchmarks or the chapters spells out a list of method names."""

from __future__ import annotations

import argparse
import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from srlib import baselines as B
from srlib.baselines.registry import COMPARISON_METHODS, METHOD_LABELS, METHODS, REGISTRY, TRAINED_METHODS
from srlib.cli import build_parser
from srlib.errors import ConfigError
from srlib.reward import RM_CLASSES, RewardModel

ROOT = Path(__file__).resolve().parents[1]
REGISTRY_FILE = ROOT / "srlib" / "baselines" / "registry.py"


def _code_files() -> dict[str, str]:
    """The Python code of srlib, the benchmarks and the chapters (notebook code cells, magics out)."""
    code = {
        str(p.relative_to(ROOT)): p.read_text()
        for p in [*(ROOT / "srlib").rglob("*.py"), *(ROOT / "benchmarks").glob("*.py")]
        if p != REGISTRY_FILE
    }
    for path in sorted((ROOT / "notebooks").glob("*.ipynb")):
        cells = json.loads(path.read_text())["cells"]
        lines = [line for c in cells if c["cell_type"] == "code" for line in "".join(c["source"]).splitlines()]
        code[str(path.relative_to(ROOT))] = "\n".join(
            line for line in lines if not line.lstrip().startswith(("%", "!"))
        )
    return code


def method_lists(code: str) -> list[int]:
    """Lines of `code` holding a tuple, list, set or dict literal with two or more method names."""
    found = []
    for node in ast.walk(ast.parse(code)):
        items = node.keys if isinstance(node, ast.Dict) else getattr(node, "elts", None)
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)) and items is not None:
            names = [i.value for i in items if isinstance(i, ast.Constant) and i.value in REGISTRY]
            if len(names) >= 2:
                found.append(node.lineno)
    return found


def test_no_file_but_the_registry_lists_methods():
    offenders = {name: lines for name, code in _code_files().items() if (lines := method_lists(code))}
    assert not offenders, f"lists of baseline methods outside srlib/baselines/registry.py: {offenders}"


def test_the_scan_finds_a_list_of_methods():
    assert method_lists('BASELINES = ("standard", "judge")\nif m in ["judge", "logprob"]: pass') == [1, 2]
    assert method_lists('x = {"standard": 1, "logprob": 2}\ny = ("standard",)') == [1]


def _choices(parser: argparse.ArgumentParser, command: str, option: str) -> tuple:
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices[command]
    return tuple(next(a for a in sub._actions if option in a.option_strings).choices)


def test_the_cli_offers_the_registered_methods():
    assert _choices(build_parser(), "fit", "--method") == ("sparserm", *METHODS)


def test_derived_views_follow_the_registry():
    assert METHODS == tuple(REGISTRY) and set(METHOD_LABELS) == set(METHODS)
    assert TRAINED_METHODS == tuple(m for m in METHODS if REGISTRY[m].trained)
    assert set(COMPARISON_METHODS) < set(METHODS)
    settings = B.baseline_settings(64, epochs=2.0)
    assert list(settings) == list(METHODS)
    for name, method in REGISTRY.items():
        assert settings[name]["max_length"] == (128 if method.two_answers else 64)
        assert ("epochs" in settings[name]) == method.trained


@pytest.mark.parametrize("name", METHODS)
def test_each_method_names_a_loadable_reward_model_class(name):
    cls = REGISTRY[name].model_class
    assert issubclass(cls, RewardModel) and RM_CLASSES[cls.__name__] == "srlib.baselines"
    assert getattr(B, cls.__name__) is cls  # what `RewardModel.from_pretrained` looks up
    assert cls.settings_class is not None


def test_an_unknown_method_is_one_line_listing_the_registry():
    with pytest.raises(ConfigError) as error:
        B.get_method("ppo")
    assert str(error.value) == f"unknown baseline method 'ppo'; choose one of: {', '.join(METHODS)}"


def test_the_registry_loads_no_model_library():
    """The CLI builds its parser from the registry: listing the methods (and importing the
    package, whose modules load on first use) must not import torch."""
    code = (
        "import sys, srlib.baselines, srlib.baselines.registry; "
        "print(sorted(m for m in ('torch', 'trl', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
