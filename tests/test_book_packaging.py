"""The book build is tooling beside the package, not part of it: `import srlib` and every srlib
module leave `bookbuild` unimported, and the wheel that pyproject.toml's setuptools config builds
ships `srlib` alone (no `bookbuild`, no `srlib/book.py`)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUILD_MODULE = "bookbuild"

IMPORT_EVERY_MODULE = f"""
import importlib, pkgutil, sys
import srlib
after_package = {BUILD_MODULE!r} in sys.modules
names = [m.name for m in pkgutil.walk_packages(srlib.__path__, "srlib.") if m.name != "srlib.__main__"]
for name in names:
    importlib.import_module(name)
print(after_package, {BUILD_MODULE!r} in sys.modules, len(names))
"""


def _tracked(*paths: str) -> list[str]:
    """The files git tracks under `paths` (the checkout as committed, not stray local files)."""
    out = subprocess.run(["git", "ls-files", "-z", "--", *paths], cwd=ROOT, check=True, capture_output=True).stdout
    return [name for name in out.decode().split("\0") if name]


def test_no_srlib_module_imports_the_build_module():
    """Statically: no import statement in srlib names bookbuild (a lazy import inside a function
    included, which importing the modules would not reveal)."""
    offenders = []
    for path in sorted((ROOT / "srlib").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            offenders += [f"{path.name}: {n}" for n in names if n.split(".")[0] == BUILD_MODULE]
    assert not offenders


def test_importing_srlib_and_every_submodule_leaves_the_build_module_out():
    """At run time, in a fresh interpreter whose path can reach bookbuild (the repository root)."""
    done = subprocess.run(
        [sys.executable, "-c", IMPORT_EVERY_MODULE], cwd=ROOT, check=True, capture_output=True, text=True
    )
    after_package, after_all, count = done.stdout.split()[-3:]
    assert (after_package, after_all) == ("False", "False")
    assert int(count) >= 20  # every module was imported, not an empty walk


def test_the_wheel_ships_srlib_and_not_the_book_build(tmp_path):
    """Build the wheel from the tracked files with pyproject.toml's setuptools config (offline:
    no build isolation, no dependencies) and list what it holds."""
    for name in _tracked("pyproject.toml", "README.md", "srlib", f"{BUILD_MODULE}.py"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, tmp_path / name)
    assert (tmp_path / f"{BUILD_MODULE}.py").is_file()  # beside the package, where setuptools could see it
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--quiet", "-w", "dist"],
        cwd=tmp_path,
        check=True,
        capture_output=True,
    )
    (wheel,) = (tmp_path / "dist").glob("srlib-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "srlib/results.py" in names and "srlib/__init__.py" in names
    assert "srlib/book.py" not in names
    assert all(n.startswith(("srlib/", "srlib-")) for n in names), [n for n in names if "srlib" not in n]
