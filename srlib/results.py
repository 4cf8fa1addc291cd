"""A chapter's results file: the tables a notebook hands to the book (the notebook contract).

Every chapter ends with `write_results(RESULTS_PATH, profile=PROFILE, tables={...})`; the book
build (`bookbuild.py`, outside this package) reads the file back with `load_results` and renders
its tables on the results page. The schema::

    {"profile": "cpu",
     "tables": {"<name>": {"caption": "one line",
                           "columns": ["method", "accuracy"],
                           "rows": [["SparseRM", 0.824], ...],
                           "float_format": ".3f"}},      # optional
     "metrics": {...}}                                   # optional, free-form, not rendered

Cells are strings, numbers, booleans or null; every row has one cell per column. The results
page shows floats to 4 significant digits unless the table gives `float_format`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from srlib.errors import DataError
from srlib.paths import atomic_path

_CELL_TYPES = (str, int, float, bool, type(None))


def table(
    columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str, *, float_format: str | None = None
) -> dict:
    """One results table in the book's schema (NaN becomes null); validated."""
    out = {
        "caption": caption,
        "columns": [str(c) for c in columns],
        "rows": [[_json_cell(v) for v in row] for row in rows],
    }
    if float_format is not None:
        out["float_format"] = float_format
    validate_table(out, "table")
    return out


def frame_table(frame: Any, caption: str, *, index: bool = False, float_format: str | None = None) -> dict:
    """A results table from a pandas DataFrame (its index becomes the first column if `index`)."""
    if index:
        frame = frame.reset_index()
    return table(list(frame.columns), frame.itertuples(index=False), caption, float_format=float_format)


def write_results(
    path: str | os.PathLike | None, *, profile: str, tables: dict[str, dict], metrics: dict | None = None
) -> Path | None:
    """Write a notebook's results JSON to `path` (the `RESULTS_PATH` parameter).

    An empty path writes nothing, so a notebook run by hand leaves no file behind.
    """
    if not path:
        return None
    data: dict[str, Any] = {"profile": profile, "tables": tables}
    if metrics:
        data["metrics"] = _jsonable(metrics)
    validate_results(data, str(path))
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=1, allow_nan=False) + "\n")
    return Path(path)


def _jsonable(value: Any) -> Any:
    """`value` with numpy/torch scalars and arrays, tuples and paths made plain JSON; NaN → null."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if hasattr(value, "tolist") and callable(value.tolist):  # numpy / torch arrays and scalars
        return _jsonable(value.tolist())
    return _json_cell(value)


def _json_cell(value: Any) -> Any:
    if hasattr(value, "item") and callable(value.item):  # numpy / torch scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def validate_table(tab: Any, where: str) -> None:
    """Raise DataError unless `tab` is `{caption: str, columns: [str], rows: [[cell]]}`."""
    if not isinstance(tab, dict):
        raise DataError(f"{where}: a table must be an object, got {type(tab).__name__}")
    unknown = set(tab) - {"caption", "columns", "rows", "float_format"}
    if unknown:
        raise DataError(f"{where}: unknown table keys {sorted(unknown)}")
    if not isinstance(tab.get("caption"), str) or not tab["caption"].strip():
        raise DataError(f"{where}: 'caption' must be a non-empty string")
    columns = tab.get("columns")
    if not isinstance(columns, list) or not columns or not all(isinstance(c, str) for c in columns):
        raise DataError(f"{where}: 'columns' must be a non-empty list of strings")
    rows = tab.get("rows")
    if not isinstance(rows, list):
        raise DataError(f"{where}: 'rows' must be a list of rows")
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            raise DataError(f"{where}: row {i} must be a list of {len(columns)} cells")
        for cell in row:
            if not isinstance(cell, _CELL_TYPES):
                raise DataError(
                    f"{where}: row {i} has a {type(cell).__name__} cell; cells are strings, numbers, booleans or null"
                )
    fmt = tab.get("float_format")
    if fmt is not None:
        try:
            format(1.0, fmt)
        except (TypeError, ValueError):
            raise DataError(f"{where}: float_format {fmt!r} is not a format spec") from None


def validate_results(data: Any, where: str) -> dict:
    """Check a results object against the schema; return it."""
    if not isinstance(data, dict):
        raise DataError(f"{where}: results must be a JSON object")
    if not isinstance(data.get("profile"), str):
        raise DataError(f"{where}: 'profile' must be the PROFILE the notebook ran")
    tables = data.get("tables")
    if not isinstance(tables, dict):
        raise DataError(f"{where}: 'tables' must be an object of name → table")
    for name, tab in tables.items():
        validate_table(tab, f"{where}: table {name!r}")
    return data


def load_results(path: Path) -> dict:
    """Read and validate a results JSON file."""
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
    return validate_results(data, str(path))
