"""Build the SparseRM book: execute the chapter notebooks, collect their results, render HTML.

Build tooling, not library: it lives beside the `srlib` package (which never imports it and
whose wheel does not ship it) and runs from the repository root.
`make book PROFILE=cpu` runs `python -m bookbuild --profile cpu`, which

1. checks that every notebook `_toc.yml` lists under `notebooks/` exists;
2. fetches MathJax 3 from npm into `book/_static/mathjax/` if it is missing (math offline);
3. stages a fresh source tree in `_build/<profile>/src/` (`_config.yml`, `_toc.yml`, `book/`);
4. executes each listed notebook with papermill into `_build/<profile>/src/notebooks/`,
   passing the parameters `PROFILE` and `RESULTS_PATH` (see "Notebook contract" below), and
   tells the stages inside each chapter as it runs (its kernel reports them through
   `srlib.progress` to `_build/<profile>/events/<stem>.jsonl`); `build-report.json` keeps
   each chapter's seconds and stages;
5. renders every `<stem>.results.json` as tables into the staged `book/results.md`, and each
   notebook's parameters cell into the staged `book/reproduce.md`;
6. builds HTML with Jupyter Book (which never executes anything) into `_build/<profile>/html/`.

Each profile has its own folder, so a smoke build never clobbers the cpu build.

Notebook contract
-----------------
* One cell tagged `parameters` defines at least `PROFILE = "cpu"` and `RESULTS_PATH = ""`,
  one parameter per line, each with a trailing `# comment` that says what it means (the
  reproduce page shows it).
* When `RESULTS_PATH` is not empty, the notebook writes its results there with
  `srlib.results.write_results(RESULTS_PATH, profile=PROFILE, tables={...})` (the schema is
  in `srlib/results.py`).
* Exercise solutions go in cells tagged `solution`: the book shows them folded, and
  `python -m bookbuild --handout DIR` writes the notebooks without them.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import srlib
from srlib.errors import ConfigError, DataError
from srlib.progress import EVENTS_ENV
from srlib.results import load_results

MATHJAX_VERSION = "3.2.2"
#: The MathJax entry point that `_config.yml` names as `mathjax_path` (relative to `_static`).
MATHJAX_ENTRY = "tex-mml-chtml.js"
# The parts of MathJax's es5/ folder the book needs: the combined TeX+MathML→CommonHTML
# component, the extensions it autoloads, its fonts, menu and accessibility components.
# The speech-rule engine (sre/, 4 MB) and the SVG output are left out.
_MATHJAX_KEEP = (MATHJAX_ENTRY, "input/", "output/chtml/", "output/chtml.js", "a11y/", "ui/", "adaptors/")
NOTEBOOK_DIR = "notebooks"
RESULTS_SUFFIX = ".results.json"
RESULTS_MARKERS = ("<!-- begin results -->", "<!-- end results -->")
PARAMETERS_MARKERS = ("<!-- begin parameters -->", "<!-- end parameters -->")
REPORT_MARKERS = ("<!-- begin build report -->", "<!-- end build report -->")


class BuildError(ConfigError):
    """The book cannot be built as configured (missing notebook, bad results file, ...)."""


class NotebookFailed(BuildError):
    """A chapter notebook raised an error while papermill executed it.

    The message is one line; `details` holds the end of the notebook's traceback.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class BuildPaths:
    """Where one profile's build lives: `_build/<profile>/{src,html,doctrees,screenshots}`."""

    root: Path
    profile: str

    @property
    def base(self) -> Path:
        return self.root / "_build" / self.profile

    @property
    def src(self) -> Path:
        """The staged book source: config, prose pages and the executed notebooks."""
        return self.base / "src"

    @property
    def html(self) -> Path:
        return self.base / "html"

    @property
    def doctrees(self) -> Path:
        return self.base / "doctrees"

    @property
    def screenshots(self) -> Path:
        return self.base / "screenshots"

    @property
    def warnings_log(self) -> Path:
        return self.base / "sphinx-warnings.log"

    @property
    def report(self) -> Path:
        """`build-report.json`: per chapter its seconds, whether it was executed or reused, and
        the stages inside it."""
        return self.base / "build-report.json"

    def executed(self, stem: str) -> Path:
        """The executed copy of `notebooks/<stem>.ipynb`."""
        return self.src / NOTEBOOK_DIR / f"{stem}.ipynb"

    def results(self, stem: str) -> Path:
        """The results JSON that notebook `<stem>` writes beside its executed copy."""
        return self.src / NOTEBOOK_DIR / f"{stem}{RESULTS_SUFFIX}"

    def fingerprint(self, stem: str) -> Path:
        """The inputs digest and running time of the build that executed `<stem>` (reuse)."""
        return self.src / NOTEBOOK_DIR / f"{stem}.inputs.json"

    def events(self, stem: str) -> Path:
        """The progress events (`srlib.progress`) that `<stem>`'s kernel writes while it runs."""
        return self.base / "events" / f"{stem}.jsonl"


# --------------------------------------------------------------------------- table of contents


def toc_files(toc: dict) -> list[str]:
    """Every `file:` entry of a jb-book `_toc.yml` (already parsed), root first, in order."""
    found: list[str] = [toc["root"]] if "root" in toc else []

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            if "file" in node:
                found.append(str(node["file"]))
            for key in ("parts", "chapters", "sections"):
                walk(node.get(key, []))
        elif isinstance(node, list):
            for item in node:
                walk(item)

    walk(toc)
    return [re.sub(r"\.(md|ipynb)$", "", f) for f in found]


def read_toc(path: Path) -> list[str]:
    """The documents listed in the `_toc.yml` at `path`."""
    import yaml

    try:
        toc = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise BuildError(f"{path}: no table of contents found") from None
    if not isinstance(toc, dict) or "root" not in toc:
        raise BuildError(f"{path}: not a jb-book table of contents (no 'root' key)")
    return toc_files(toc)


def chapter_stems(documents: Iterable[str]) -> list[str]:
    """The notebook stems among the toc documents (`notebooks/03_sparserm` → `03_sparserm`)."""
    prefix = NOTEBOOK_DIR + "/"
    return [d[len(prefix) :] for d in documents if d.startswith(prefix)]


def chapter_notebooks(root: Path, stems: Sequence[str]) -> list[Path]:
    """The source notebook of each listed chapter; raise BuildError naming any that is missing."""
    paths = [root / NOTEBOOK_DIR / f"{stem}.ipynb" for stem in stems]
    missing = [p.relative_to(root).as_posix() for p in paths if not p.is_file()]
    if missing:
        raise BuildError(
            f"_toc.yml lists notebooks that do not exist: {', '.join(missing)} "
            "(write them, or comment their entries out of _toc.yml)"
        )
    return paths


def unlisted_notebooks(root: Path, stems: Sequence[str]) -> list[Path]:
    """Chapter notebooks (`notebooks/NN_*.ipynb`) that `_toc.yml` does not list."""
    listed = set(stems)
    return [p for p in sorted((root / NOTEBOOK_DIR).glob("[0-9][0-9]_*.ipynb")) if p.stem not in listed]


# --------------------------------------------------------------------------- Markdown rendering


def format_cell(value: Any, float_format: str | None = None) -> str:
    """One table cell as Markdown text (null → en dash, floats to 4 significant digits)."""
    if value is None:
        return "–"
    if isinstance(value, float):
        text = format(value, float_format or ".4g")
    else:
        text = str(value)
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def slug(text: str) -> str:
    """A label-safe slug: lowercase letters, digits and dashes."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def render_table(label: str, tab: dict) -> str:
    """A results table as a captioned MyST `{table}` holding a pipe table."""
    fmt = tab.get("float_format")
    lines = [
        f"```{{table}} {tab['caption'].strip()}",
        f":name: {label}",
        "",
        "| " + " | ".join(format_cell(c) for c in tab["columns"]) + " |",
        "|" + "---|" * len(tab["columns"]),
    ]
    lines += ["| " + " | ".join(format_cell(v, fmt) for v in row) + " |" for row in tab["rows"]]
    lines.append("```")
    return "\n".join(lines)


def notebook_title(notebook: dict, default: str) -> str:
    """The text of the first level-1 Markdown heading in a notebook, else `default`."""
    for cell in notebook.get("cells", []):
        if cell.get("cell_type") != "markdown":
            continue
        source = "".join(cell.get("source", ""))
        match = re.search(r"^# +(.+?)\s*$", source, flags=re.M)
        if match:
            return match.group(1)
    return default


def render_results(chapters: Sequence[tuple[str, str, dict]]) -> str:
    """The results page body: a section per chapter `(stem, title, results)`, a table per entry."""
    if not chapters:
        return (
            "*No chapter notebook has run in this build yet: every chapter that `_toc.yml` lists adds its tables here.*"
        )
    parts = []
    for stem, title, data in chapters:
        parts.append(f"## {title}\n\nFrom {{doc}}`../{NOTEBOOK_DIR}/{stem}`, profile `{data['profile']}`.")
        if not data["tables"]:
            parts.append("*This chapter reports no tables.*")
        for name, tab in data["tables"].items():
            parts.append(render_table(f"results-{slug(stem)}-{slug(name)}", tab))
    return "\n\n".join(parts)


def write_report(paths: BuildPaths, records: Sequence[dict], *, jobs: int, seconds: float) -> Path:
    """`_build/<profile>/build-report.json`: the chapter records of `execute_chapters`, the
    number of jobs and the wall-clock seconds the execution took."""
    report = {"profile": paths.profile, "jobs": jobs, "execution_seconds": seconds, "chapters": list(records)}
    paths.base.mkdir(parents=True, exist_ok=True)
    paths.report.write_text(json.dumps(report, indent=1) + "\n")
    return paths.report


def render_report(records: Sequence[dict], execution_seconds: float) -> str:
    """The "what this build cost" table of the Reproduce page: per chapter, whether this build
    executed it or reused the copy of an earlier run, and that run's minutes; then a table of
    the stages inside the chapters (`stage_report`), when the records have any."""
    if not records:
        return "*No chapter notebook is listed in `_toc.yml` yet.*"
    rows = ["| chapter | this build | minutes |", "|---|---|---|"]
    rows += [
        f"| `{r['chapter']}` | {'reused' if r['reused'] else 'executed'} | {r['seconds'] / 60:.1f} |" for r in records
    ]
    executed = [r for r in records if not r["reused"]]
    summary = (
        f"This build executed {len(executed)} of {len(records)} chapters in "
        f"{execution_seconds / 60:.1f} minutes of wall-clock time"
        + (
            f" (their running times add up to {sum(r['seconds'] for r in executed) / 60:.1f} minutes: "
            "chapters ran side by side)."
            if len(executed) > 1
            else "."
        )
    )
    text = "\n".join(rows) + "\n\n" + summary
    stages = [(r["chapter"], s) for r in records for s in r.get("stages", [])]
    if stages:
        text += (
            "\n\nThe stages inside each chapter, from the run that made its copy (a stage's runs "
            "add up; a stage inside another counts in both):\n\n"
            + "\n".join(
                ["| chapter | stage | runs | units done | seconds |", "|---|---|---|---|---|"]
                + [
                    f"| `{chapter}` | {format_cell(s['name'])} | {s['runs']} | "
                    f"{_amount(s['done'])} {format_cell(s['unit'])} | {s['seconds']:.1f} |"
                    for chapter, s in stages
                ]
            )
        )
    return text


def render_parameters(chapters: Sequence[tuple[str, str, dict]]) -> str:
    """A table of papermill parameters per chapter `(stem, title, inspect_notebook(...))`."""
    if not chapters:
        return "*No chapter notebook is listed in `_toc.yml` yet.*"
    parts = []
    for stem, title, params in chapters:
        parts.append(f"### {title}\n\n`{NOTEBOOK_DIR}/{stem}.ipynb`")
        if not params:
            parts.append("*No cell tagged `parameters`.*")
            continue
        rows = ["| parameter | default | meaning |", "|---|---|---|"]
        for p in params.values():
            rows.append(f"| `{p['name']}` | `{format_cell(p['default'])}` | {format_cell(p.get('help') or '')} |")
        parts.append("\n".join(rows))
    return "\n\n".join(parts)


def fill_between(text: str, markers: tuple[str, str], body: str) -> str:
    """Replace what lies between the two marker comments in `text` with `body`."""
    begin, end = markers
    start, stop = text.find(begin), text.find(end)
    if start < 0 or stop < start:
        raise BuildError(f"page is missing the markers {begin} ... {end}")
    return text[: start + len(begin)] + "\n" + body + "\n" + text[stop:]


# --------------------------------------------------------------------------- exercises

SOLUTION_TAG = "solution"


def fold_solutions(notebook: dict) -> int:
    """Tag every `solution` cell `hide-input`, so the book shows it folded; return how many."""
    count = 0
    for cell in notebook.get("cells", []):
        tags = cell.setdefault("metadata", {}).setdefault("tags", [])
        if SOLUTION_TAG in tags:
            count += 1
            if "hide-input" not in tags:
                tags.append("hide-input")
    return count


def handout_notebook(notebook: dict) -> dict:
    """A student's copy: the cells tagged `solution` removed, every output cleared."""
    cells = []
    for cell in notebook.get("cells", []):
        if SOLUTION_TAG in cell.get("metadata", {}).get("tags", []):
            continue
        cell = dict(cell)
        if cell.get("cell_type") == "code":
            cell["outputs"], cell["execution_count"] = [], None
        cells.append(cell)
    return {**notebook, "cells": cells}


def write_handouts(root: Path, out_dir: Path) -> list[Path]:
    """Write a handout copy of every chapter notebook (`notebooks/NN_*.ipynb`) to `out_dir`."""
    sources = sorted((root / NOTEBOOK_DIR).glob("[0-9][0-9]_*.ipynb"))
    if not sources:
        raise BuildError(f"no chapter notebooks in {root / NOTEBOOK_DIR}")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for source in sources:
        target = out_dir / source.name
        target.write_text(
            json.dumps(handout_notebook(json.loads(source.read_text())), indent=1, ensure_ascii=False) + "\n"
        )
        written.append(target)
    return written


# --------------------------------------------------------------------------- MathJax


def ensure_mathjax(static_dir: Path) -> Path:
    """Vendor MathJax 3 into `static_dir/mathjax` from npm unless it is already there."""
    target = static_dir / "mathjax"
    if (target / MATHJAX_ENTRY).is_file():
        return target
    npm = shutil.which("npm")
    if npm is None:
        raise BuildError(
            f"MathJax is missing from {target} and npm is not installed: install "
            f"Node.js (npm), or unpack es5/ of mathjax@{MATHJAX_VERSION} there"
        )
    print(f"fetching mathjax@{MATHJAX_VERSION} from npm into {target}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run(
            [npm, "pack", f"mathjax@{MATHJAX_VERSION}", "--silent", "--pack-destination", tmp],
            capture_output=True,
            text=True,
        )
        tarballs = list(Path(tmp).glob("mathjax-*.tgz"))
        if done.returncode != 0 or not tarballs:
            raise BuildError(
                f"npm pack mathjax@{MATHJAX_VERSION} failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
            )
        staging = Path(tmp) / "mathjax"
        with tarfile.open(tarballs[0]) as tar:
            for member in tar.getmembers():
                name = member.name.removeprefix("package/")
                inner = name.removeprefix("es5/")
                if name == "LICENSE" or (name.startswith("es5/") and inner.startswith(_MATHJAX_KEEP)):
                    if member.isfile():
                        member.name = inner if name.startswith("es5/") else name
                        tar.extract(member, staging, filter="data")
        target.parent.mkdir(parents=True, exist_ok=True)
        if target.exists():
            shutil.rmtree(target)
        shutil.move(str(staging), str(target))
    return target


# --------------------------------------------------------------------------- execution


def kernel_python(argv: Sequence[str], executable: str) -> str:
    """The Python that jupyter_client launches for a kernelspec `argv` from `executable`.

    jupyter_client swaps a bare `python`/`python3`/`python3.X` for the launching interpreter.
    """
    bare = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    return executable if argv and argv[0] in bare else (argv[0] if argv else "")


def check_kernel(name: str = "python3") -> None:
    """Make sure kernel `name` runs this interpreter (the venv's ipykernel), not another one."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        spec = KernelSpecManager().get_kernel_spec(name)
    except NoSuchKernel:
        raise BuildError(
            f"no Jupyter kernel {name!r}: install ipykernel into this "
            f"environment ({sys.executable} -m pip install ipykernel)"
        ) from None
    runs = kernel_python(spec.argv, sys.executable)
    if os.path.realpath(runs) != os.path.realpath(sys.executable):
        raise BuildError(
            f"kernel {name!r} ({spec.resource_dir}) runs {runs}, not "
            f"{sys.executable}: run `{sys.executable} -m ipykernel install "
            f"--sys-prefix` or remove that kernelspec"
        )


# --------------------------------------------------------------------------- reuse between builds

#: Libraries whose version can change a chapter's numbers: a new version re-executes every chapter.
FINGERPRINT_PACKAGES = ("torch", "transformers", "sae-lens", "trl", "peft", "datasets", "numpy", "scipy")


def _srlib_imports(tree: ast.AST, package: str = "srlib") -> set[str]:
    """The srlib modules an AST imports, anywhere in it (functions included): `import srlib.x`,
    `from srlib.x import y` (and `srlib.x.y`, in case y is a module), and relative imports
    (`from .x import y`) of a file in the srlib package `package`."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "srlib")
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, (base, node.module)))
            if module.split(".")[0] == "srlib":
                found.add(module)
                found.update(f"{module}.{a.name}" for a in node.names)
    return found


def _module_files(package_dir: Path, module: str) -> list[Path]:
    """The srlib source files that importing `module` runs: each package on the way (a
    subpackage counts whole, every file in it) and the module's own file; [] if it is no module
    (a function or class named in `from srlib.x import y`)."""
    files, path = [], package_dir
    for part in module.split(".")[1:]:
        path = path / part
        if path.is_dir():
            files += sorted(path.rglob("*.py"))
        elif path.with_suffix(".py").is_file():
            files.append(path.with_suffix(".py"))
    return files


def srlib_closure(code: str) -> list[Path]:
    """The source files of every srlib module `code` imports, directly or through other srlib
    modules (the package's `__init__` always): what a chapter's output can depend on in srlib."""
    package_dir = Path(srlib.__file__).resolve().parent

    def imported_files(source: str, package: str = "srlib") -> list[Path]:
        return [f for m in _srlib_imports(ast.parse(source), package) for f in _module_files(package_dir, m)]

    seen: set[Path] = set()
    todo = [package_dir / "__init__.py", *imported_files(code)]
    while todo:
        path = todo.pop()
        if path in seen or not path.is_file():
            continue
        seen.add(path)
        package = ".".join(("srlib", *path.parent.relative_to(package_dir).parts))
        todo += imported_files(path.read_text(), package)
    return sorted(seen)


def chapter_fingerprint(source: Path, profile: str) -> str:
    """A digest of everything a chapter's executed copy depends on that the build can see: the
    notebook, the profile, the srlib modules it imports (transitively), the versions of the
    libraries in `FINGERPRINT_PACKAGES` and the local data files (names and sizes under
    `SRLIB_DATA_DIR`). Caches (SAEs, states, runs) are content-keyed and need no entry here."""
    import hashlib
    from importlib import metadata

    notebook = json.loads(source.read_text())
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    code = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith(("%", "!")))
    digest = hashlib.sha256()
    digest.update(source.read_bytes())
    digest.update(profile.encode())
    for path in srlib_closure(code):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    for package in FINGERPRINT_PACKAGES:
        try:
            digest.update(f"{package}=={metadata.version(package)}".encode())
        except metadata.PackageNotFoundError:
            digest.update(f"{package} absent".encode())
    data_dir = os.environ.get("SRLIB_DATA_DIR")
    if data_dir and Path(data_dir).is_dir():
        for path in sorted(Path(data_dir).rglob("*")):
            if path.is_file():
                digest.update(f"{path.relative_to(data_dir).as_posix()}:{path.stat().st_size}".encode())
    return digest.hexdigest()


def _stamp(paths: BuildPaths, stem: str) -> dict:
    """What the last execution of `stem` recorded (`fingerprint`, `seconds`, `stages`); {} if
    nothing readable was recorded."""
    try:
        stamp = json.loads(paths.fingerprint(stem).read_text())
    except (OSError, ValueError):
        return {}
    return stamp if isinstance(stamp, dict) else {}


def last_seconds(paths: BuildPaths, stem: str) -> float | None:
    """How long `stem` took when it last ran under this profile (whatever has changed since)."""
    seconds = _stamp(paths, stem).get("seconds")
    return float(seconds) if isinstance(seconds, (int, float)) else None


def reusable(paths: BuildPaths, stem: str, fingerprint: str) -> float | None:
    """The seconds a previous build took to execute `stem` when its executed copy and results
    are still there and its inputs have not changed since (`chapter_fingerprint`); else None."""
    if (
        _stamp(paths, stem).get("fingerprint") == fingerprint
        and paths.executed(stem).is_file()
        and paths.results(stem).is_file()
    ):
        return last_seconds(paths, stem) or 0.0
    return None


def _chapter_kernel(cwd: Path, env: dict[str, str]) -> type:
    """A kernel manager class for papermill (nbclient) whose kernels start in the folder `cwd`
    with `env` added to this process's environment.

    Both travel to the kernel this way, never through this process: papermill's own `cwd`
    changes the working directory of the whole process, so chapters run side by side in threads
    would start their kernels in each other's (or no) folder; and `os.environ` is shared by those
    threads, so it cannot name one events file per chapter.
    """
    from jupyter_client.manager import AsyncKernelManager

    class ChapterKernelManager(AsyncKernelManager):
        # jupyter_client types start_kernel as the sync KernelManager's; AsyncKernelManager's is async
        async def start_kernel(self, **kw: Any) -> None:  # type: ignore[override]
            kw["env"] = {**kw.get("env", os.environ), **env}
            kw["cwd"] = str(cwd)
            return await super().start_kernel(**kw)

    return ChapterKernelManager


def execute_notebook(
    source: Path,
    executed: Path,
    results: Path,
    profile: str,
    events: Path | None = None,
    threads: int | None = None,
) -> float:
    """Run `source` with papermill into `executed`; return seconds. Raise NotebookFailed.

    With `events`, the kernel reports its stages there (`srlib.progress`, `SRLIB_PROGRESS_EVENTS`);
    with `threads`, its torch work uses at most that many threads (`srlib.chapter.THREADS_ENV`).
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    from srlib.chapter import THREADS_ENV

    executed.parent.mkdir(parents=True, exist_ok=True)
    results.unlink(missing_ok=True)
    start = time.perf_counter()
    name = f"{NOTEBOOK_DIR}/{source.name}"
    try:
        papermill.execute_notebook(
            str(source),
            str(executed),
            kernel_name="python3",
            kernel_manager_class=_chapter_kernel(
                executed.parent,
                {
                    **({EVENTS_ENV: str(events.resolve())} if events else {}),
                    **({THREADS_ENV: str(threads)} if threads else {}),
                },
            ),
            # Relative to the notebook's folder (the kernel's cwd), so the injected cell that
            # the book shows names no folder of the machine that built it.
            parameters={"PROFILE": profile, "RESULTS_PATH": os.path.relpath(results, executed.parent)},
            progress_bar=False,  # the stages' status line says more than a count of cells
        )
    except PapermillExecutionError as exc:
        tail = _strip_ansi("\n".join(exc.traceback[-6:]))
        raise NotebookFailed(
            f"notebook {name} failed in cell {exc.exec_count}: "
            f"{exc.ename}: {_first_line(exc.evalue)} (executed copy with the "
            f"traceback: {executed})",
            details=tail,
        ) from None
    except Exception as exc:  # kernel died, timeout, unreadable notebook ...
        raise NotebookFailed(f"notebook {name} did not run: {type(exc).__name__}: {_first_line(str(exc))}") from exc
    if not results.is_file():
        raise BuildError(
            f"notebook {name} wrote no results: it must call "
            "srlib.results.write_results(RESULTS_PATH, ...) (a parameter the build "
            "passes; see srlib/results.py)"
        )
    return time.perf_counter() - start


def _first_line(text: str) -> str:
    lines = str(text).strip().splitlines()
    return lines[0] if lines else ""


def _strip_ansi(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


# --------------------------------------------------------------------------- what a chapter is doing

#: Seconds between two status lines of one stage when stdout is a log, not a terminal.
LOG_EVERY = 30.0
#: Seconds between two reads of a running chapter's events file.
POLL_SECONDS = 1.0


class EventsTail:
    """Reads the complete JSON lines appended to an events file since the last read."""

    def __init__(self, path: Path) -> None:
        self.path, self.offset, self.partial = path, 0, b""

    def read(self) -> list[dict]:
        """The events appended since the last call ([] while the file does not exist); a line
        still being written waits for the next call, a line that is not an event is skipped."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        self.offset += len(data)
        *lines, self.partial = (self.partial + data).split(b"\n")
        events = []
        for line in lines:
            try:
                event = json.loads(line)
            except ValueError:
                continue
            if isinstance(event, dict) and isinstance(event.get("stage"), str) and "time" in event:
                events.append(event)
        return events


def read_events(path: Path) -> list[dict]:
    """Every complete event in an events file."""
    return EventsTail(path).read()


def stage_report(events: Iterable[dict]) -> list[dict]:
    """A chapter's stages from its events, in the order they first appeared: `name`, `runs`,
    `seconds` (summed over its runs; a nested stage's overlap its parent's), `done` (units
    summed over its runs) and `unit`. A run with no end line (the chapter failed, a loop
    stopped early) counts as far as its last progress line."""
    stages: dict[str, dict] = {}
    unfinished: dict[tuple, dict] = {}
    for e in events:
        s = stages.setdefault(
            e["stage"], {"name": e["stage"], "runs": 0, "seconds": 0.0, "done": 0, "unit": e.get("unit", "it")}
        )
        if e.get("end"):
            unfinished.pop((e["stage"], e.get("run")), None)
            s["runs"] += e.get("runs", 1)
            s["seconds"] += e.get("seconds", 0.0)
            s["done"] += e.get("done", 0)
        else:
            unfinished[e["stage"], e.get("run")] = e
    for e in unfinished.values():
        s = stages[e["stage"]]
        s["runs"] += 1
        s["seconds"] += e["time"] - e["started"]
        s["done"] += e["done"]
    for s in stages.values():
        s["seconds"] = round(s["seconds"], 3)
    return list(stages.values())


def _duration(seconds: float) -> str:
    """`1h05m`, `4m07s` or `12s`."""
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def _amount(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.1f}"


def status_text(event: dict) -> str:
    """One stage as a short phrase: units done of the total, the rate and, from it, an estimate
    of the time left; for an end line, what the runs it closes did."""
    name, unit, done, total = event["stage"], event.get("unit", "it"), event.get("done", 0), event.get("total")
    if event.get("end"):
        runs = event.get("runs", 1)
        return f"{name}: done, {_amount(done)} {unit} in {_duration(event.get('seconds', 0))}" + (
            f" ({runs} runs)" if runs > 1 else ""
        )
    rate = done / max(event["time"] - event["started"], 1e-9)
    text = (
        f"{name} {_amount(done)}/{_amount(total)} {unit} ({done / total:.0%})"
        if total
        else f"{name} {_amount(done)} {unit}"
    )
    text += f", {rate:.3g} {unit}/s"
    if total and rate > 0:
        text += f", about {_duration(max(total - done, 0) / rate)} left"
    return text


class Console:
    """The build's output while chapters run: plain lines (`say`), and the stages of the
    running chapters (`status`): on a terminal one live line that each update rewrites; on a
    log, a line per update but at most one per chapter and stage every `log_every` seconds
    (the end of a stage that ran that long is always told)."""

    def __init__(
        self, stream: Any = None, *, tty: bool | None = None, log_every: float = LOG_EVERY, clock: Any = time.monotonic
    ) -> None:
        self.stream = sys.stdout if stream is None else stream
        self.tty = bool(self.stream.isatty()) if tty is None else tty
        self.log_every, self.clock = log_every, clock
        self.live: dict[str, str] = {}
        self.told: dict[tuple[str, str], float] = {}
        self.lock = threading.Lock()
        self.drawn = False

    def say(self, line: str) -> None:
        with self.lock:
            self._clear()
            self.stream.write(line + "\n")
            self._draw()

    def status(self, label: str, event: dict, note: str = "") -> None:
        """Tell a new event of chapter `label` (e.g. `[3/10] 03_sparserm`), with `note` after it."""
        text = status_text(event) + (f"; {note}" if note else "")
        with self.lock:
            if self.tty:
                self.live[label] = text
                self._draw()
                return
            key, now = (label, event["stage"]), self.clock()
            long_end = event.get("end") and event.get("seconds", 0) >= self.log_every
            if long_end or now - self.told.get(key, -math.inf) >= self.log_every:
                self.told[key] = now
                self.stream.write(f"{label} {text}\n")
                self.stream.flush()

    def finish(self, label: str) -> None:
        """Chapter `label` stopped: its part of the live line goes."""
        with self.lock:
            self.live.pop(label, None)
            self._clear()
            self._draw()

    def _clear(self) -> None:
        if self.drawn:
            self.stream.write("\r\x1b[K")
            self.drawn = False

    def _draw(self) -> None:
        if self.tty and self.live:
            width = shutil.get_terminal_size().columns - 1
            self.stream.write("\r\x1b[K" + " | ".join(f"{k} {v}" for k, v in self.live.items())[:width])
            self.drawn = True
        self.stream.flush()


def chapter_note(elapsed: float, last: float | None) -> str:
    """How far the chapter is: its time so far, and its last run's time when there was one
    (the chapter's own estimate; a stage's is in its status)."""
    return f"chapter {_duration(elapsed)} in" + (f", its last run took {_duration(last)}" if last else "")


@contextlib.contextmanager
def watching(
    path: Path, label: str, console: Console, *, every: float = POLL_SECONDS, last: float | None = None
) -> Iterator[list[dict]]:
    """While the block runs, tell `console` what the events file `path` says (its newest line
    per stage, every `every` seconds, with `chapter_note`; `last`: the chapter's last running
    time); yields the list of the events read, complete when the block ends."""
    tail, seen, stop, started = EventsTail(path), [], threading.Event(), time.perf_counter()

    def poll() -> None:
        new = tail.read()
        seen.extend(new)
        note = chapter_note(time.perf_counter() - started, last)
        for event in {e["stage"]: e for e in new}.values():
            console.status(label, event, note)

    def loop() -> None:
        while not stop.wait(every):
            poll()

    thread = threading.Thread(target=loop, name=f"events of {label}", daemon=True)
    thread.start()
    try:
        yield seen
    finally:
        stop.set()
        thread.join()
        poll()
        console.finish(label)


# --------------------------------------------------------------------------- the build


def stage_sources(root: Path, paths: BuildPaths, stems: Sequence[str]) -> None:
    """A fresh `_build/<profile>/src/` holding the config, the toc and `book/`; the executed
    copies of the chapters in `stems` (with their results and fingerprints) are kept for reuse,
    those of chapters no longer listed are removed."""
    if paths.src.exists():
        for entry in paths.src.iterdir():
            if entry.name != NOTEBOOK_DIR:
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        executed_dir = paths.src / NOTEBOOK_DIR
        if executed_dir.is_dir():
            for entry in executed_dir.iterdir():
                if entry.name.split(".")[0] not in stems:
                    shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
    paths.src.mkdir(parents=True, exist_ok=True)
    for name in ("_config.yml", "_toc.yml"):
        shutil.copy2(root / name, paths.src / name)
    shutil.copytree(
        root / "book", paths.src / "book", ignore=shutil.ignore_patterns("__pycache__", ".ipynb_checkpoints")
    )


class _Tee(io.TextIOBase):
    """Write to a stream and remember what was written (Sphinx's warnings)."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.parts: list[str] = []

    def write(self, text: str) -> int:
        self.parts.append(text)
        return self.stream.write(text)

    def flush(self) -> None:
        self.stream.flush()


def build_html(paths: BuildPaths, *, strict: bool) -> int:
    """Jupyter Book (Sphinx) HTML from the staged tree; return the number of warnings."""
    from jupyter_book.sphinx import build_sphinx

    if paths.html.exists():
        shutil.rmtree(paths.html)  # no stale page from a chapter since removed
    tee = _Tee(sys.stderr)
    with contextlib.redirect_stderr(tee):
        status = build_sphinx(
            str(paths.src),
            str(paths.html),
            noconfig=True,
            path_config=str(paths.src / "_config.yml"),
            confoverrides={"external_toc_path": "_toc.yml", "latex_individualpages": False},
            doctreedir=str(paths.doctrees),
            freshenv=True,
            quiet=True,
            warningiserror=strict,
            keep_going=strict,
        )
    log = "".join(tee.parts)
    paths.warnings_log.write_text(log)
    n_warnings = len(re.findall(r"(WARNING|ERROR):", log))
    if status != 0:
        why = "warnings are errors under --strict" if strict and n_warnings else str(status)
        raise BuildError(f"Sphinx failed ({why}); see {paths.warnings_log}")
    return n_warnings


def _run_chapter(
    source: Path,
    paths: BuildPaths,
    profile: str,
    position: str,
    fingerprint: str,
    console: Console,
    threads: int | None = None,
) -> tuple[float, list[dict]]:
    """Execute one chapter (telling `console` its stages as they go; its torch work on at most
    `threads` threads), fold its solutions, stamp its inputs; return its seconds and its stages
    (`stage_report`)."""
    stem = source.stem
    last = last_seconds(paths, stem)
    paths.fingerprint(stem).unlink(missing_ok=True)  # a failed run is never reused
    events = paths.events(stem)
    events.parent.mkdir(parents=True, exist_ok=True)
    events.unlink(missing_ok=True)
    console.say(f"{position} executing {NOTEBOOK_DIR}/{source.name} (PROFILE={profile})")
    with watching(events, f"{position} {stem}", console, last=last) as seen:
        seconds = execute_notebook(
            source, paths.executed(stem), paths.results(stem), profile, events=events, threads=threads
        )
    stages = stage_report(seen)
    executed = json.loads(paths.executed(stem).read_text())
    if fold_solutions(executed):
        paths.executed(stem).write_text(json.dumps(executed, indent=1, ensure_ascii=False))
    paths.fingerprint(stem).write_text(json.dumps({"fingerprint": fingerprint, "seconds": seconds, "stages": stages}))
    console.say(f"{position} {NOTEBOOK_DIR}/{source.name} done in {seconds:.1f} s")
    return seconds, stages


def side_by_side_threads(jobs: int) -> int | None:
    """The torch threads of each of `jobs` chapters running at once: the cores shared equally
    (at least one); None (no cap) for one chapter at a time. Two threads each for two chapters
    on two cores would leave each parallel region waiting for a descheduled thread
    (`benchmarks/threads.py --side-by-side 2` measures it)."""
    if jobs <= 1:
        return None
    return max(1, (os.cpu_count() or 1) // jobs)


def execute_chapters(
    sources: Sequence[Path],
    paths: BuildPaths,
    profile: str,
    *,
    jobs: int = 1,
    force: bool = False,
    console: Console | None = None,
) -> list[dict]:
    """Execute the chapters whose inputs changed since their last execution (all with `force`);
    return one record per chapter, in book order: `chapter`, `seconds` and `stages` (of the run
    that made its executed copy) and `reused`. `console` (stdout by default) tells each
    chapter's stages while it runs.

    With `jobs` > 1 the book's first chapter, when it must run, goes alone (chapter 1 builds
    the SAE and the hidden states every later chapter reads from the cache), then up to `jobs` chapters run
    at once, each in its own kernel, the longest first by their last running time (a chapter
    never run counts as longest), so that a long chapter does not start last. A chapter that
    runs alone uses every core; chapters side by side share them (`side_by_side_threads`). The
    first failure stops the build once running chapters finish.
    """
    from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

    if jobs < 1:
        raise BuildError(f"jobs must be at least 1, got {jobs}")
    console = console or Console()
    todo, records = [], {}
    for i, source in enumerate(sources, 1):
        position, fingerprint = f"[{i}/{len(sources)}]", chapter_fingerprint(source, profile)
        seconds = None if force else reusable(paths, source.stem, fingerprint)
        if seconds is None:
            todo.append((source, position, fingerprint))
        else:
            records[source.stem] = {
                "chapter": source.stem,
                "seconds": seconds,
                "reused": True,
                "stages": _stamp(paths, source.stem).get("stages", []),
            }
            console.say(
                f"{position} {NOTEBOOK_DIR}/{source.name}: unchanged since its last run ({seconds:.0f} s then), reused"
            )

    def run(source: Path, position: str, fingerprint: str, threads: int | None = None) -> None:
        seconds, stages = _run_chapter(source, paths, profile, position, fingerprint, console, threads)
        records[source.stem] = {
            "chapter": source.stem,
            "seconds": seconds,
            "reused": False,
            "stages": stages,
            "threads": threads,
        }

    first: list[tuple[Path, str, str]]
    rest: list[tuple[Path, str, str]]
    if not todo:
        first, rest = [], []
    elif jobs == 1:
        first, rest = todo, []
    elif todo[0][0] == sources[0]:
        first, rest = todo[:1], todo[1:]
    else:
        first, rest = [], todo
    rest.sort(key=lambda item: -(last_seconds(paths, item[0].stem) or math.inf))
    for source, position, fingerprint in first:
        run(source, position, fingerprint)
    if rest:
        with ThreadPoolExecutor(max_workers=jobs) as pool:
            threads = side_by_side_threads(jobs)
            futures = [
                pool.submit(run, source, position, fingerprint, threads) for source, position, fingerprint in rest
            ]
            _, pending = wait(futures, return_when=FIRST_EXCEPTION)
            for future in pending:
                future.cancel()
            for future in futures:
                error = future.exception() if future.done() and not future.cancelled() else None
                if error is not None:
                    raise error
    return [records[source.stem] for source in sources]


def build(root: Path, profile: str, *, strict: bool = False, jobs: int = 1, force: bool = False) -> BuildPaths:
    """Execute the listed notebooks under `profile` and build the book's HTML; return its paths.

    A chapter whose inputs (`chapter_fingerprint`) are unchanged since it last ran is not
    executed again; `force` executes every chapter. `jobs`: chapters executed at once.
    """
    from srlib.profiles import get_profile

    try:
        get_profile(profile)
    except ValueError as exc:
        raise BuildError(str(exc)) from None
    root = root.resolve()
    paths = BuildPaths(root, profile)
    started = time.perf_counter()
    stems = chapter_stems(read_toc(root / "_toc.yml"))
    sources = chapter_notebooks(root, stems)
    for extra in unlisted_notebooks(root, stems):
        print(
            f"note: {extra.relative_to(root)} is not in _toc.yml, so it is not run (add its entry to _toc.yml)",
            flush=True,
        )
    ensure_mathjax(root / "book" / "_static")
    stage_sources(root, paths, stems)

    chapters, params, records, execution_seconds = [], [], [], 0.0
    if sources:
        import papermill

        check_kernel()
        execute_started = time.perf_counter()
        records = execute_chapters(sources, paths, profile, jobs=jobs, force=force)
        execution_seconds = time.perf_counter() - execute_started
        write_report(paths, records, jobs=jobs, seconds=execution_seconds)
    for source in sources:
        stem = source.stem
        title = notebook_title(json.loads(paths.executed(stem).read_text()), stem)
        chapters.append((stem, title, load_results(paths.results(stem))))
        params.append((stem, title, papermill.inspect_notebook(str(source))))

    for page, markers, body in (
        ("results.md", RESULTS_MARKERS, render_results(chapters)),
        ("reproduce.md", PARAMETERS_MARKERS, render_parameters(params)),
        ("reproduce.md", REPORT_MARKERS, render_report(records, execution_seconds)),
    ):
        staged = paths.src / "book" / page
        staged.write_text(fill_between(staged.read_text(), markers, body))

    print("building HTML with Jupyter Book", flush=True)
    n_warnings = build_html(paths, strict=strict)
    elapsed = time.perf_counter() - started
    print(f"{n_warnings} Sphinx warning(s); log: {paths.warnings_log}")
    print(f"The book ({profile} profile) is at {paths.html / 'index.html'} (built in {elapsed:.0f} s)")
    return paths


_BULLET = re.compile(r"\s*([*\-]|\d+[.)])\s+")


def reflow_docstring(lines: Sequence[str]) -> list[str]:
    """Join the wrapped lines of each prose paragraph and list item; keep other lines as they are.

    A paragraph starts at column 0; a list item starts with `*`, `-` or `1.` and continues on
    lines indented to its text. Anything else (indented examples, tables) is left alone.
    """
    out: list[str] = []
    mode, item_indent = None, 0
    for line in lines:
        text = line.rstrip()
        indent = len(text) - len(text.lstrip())
        bullet = _BULLET.match(text)
        if not text:
            out.append("")
            mode = None
        elif bullet:
            out.append(text)
            mode, item_indent = "item", bullet.end()
        elif (mode == "para" and indent == 0) or (mode == "item" and indent == item_indent):
            out[-1] += " " + text.strip()
        else:
            out.append(text)
            mode = "para" if indent == 0 else None
    return out


def _docstring_as_text(app: Any, what: str, name: str, obj: Any, options: Any, lines: list[str]) -> None:
    """Show a docstring as plain text (paragraphs reflowed) instead of parsing it as reST.

    srlib's docstrings are plain text (`code` in backticks, chat tokens such as <|im_end|>,
    indented lists) that reStructuredText would misread.
    """
    if lines:
        lines[:] = [".. code-block:: text", ""] + [f"   {line}" for line in reflow_docstring(lines)] + [""]


def setup(app: Any) -> dict:
    """The Sphinx extension `_config.yml` loads: the API page shows docstrings as plain text."""
    app.connect("autodoc-process-docstring", _docstring_as_text)
    return {"parallel_read_safe": True, "parallel_write_safe": True}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bookbuild", description=__doc__.split("\n")[0])
    parser.add_argument("--profile", default="cpu", help="smoke | cpu | paper (default: cpu)")
    parser.add_argument(
        "--root", type=Path, default=Path("."), help="the repository root (default: the current directory)"
    )
    parser.add_argument("--strict", action="store_true", help="fail on any Sphinx warning")
    parser.add_argument(
        "--jobs", type=int, default=1, metavar="N", help="chapters executed at once after the first (default: 1)"
    )
    parser.add_argument(
        "--force", action="store_true", help="execute every chapter, even those unchanged since their last run"
    )
    parser.add_argument(
        "--mathjax-only", action="store_true", help="only fetch MathJax into book/_static/mathjax if it is missing"
    )
    parser.add_argument(
        "--handout",
        type=Path,
        metavar="DIR",
        help="only write the chapter notebooks without their solution cells to DIR",
    )
    args = parser.parse_args(argv)
    try:
        if args.handout:
            for path in write_handouts(args.root, args.handout):
                print(path)
        elif args.mathjax_only:
            print(ensure_mathjax(args.root / "book" / "_static"))
        else:
            build(args.root, args.profile, strict=args.strict, jobs=args.jobs, force=args.force)
    except NotebookFailed as exc:
        print(exc.details, file=sys.stderr)
        print(f"book build stopped: {exc}", file=sys.stderr)
        return 1
    except (BuildError, DataError) as exc:
        print(f"book build: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
