"""The book build (`bookbuild.py`) and the results schema (`srlib.results`): results JSON → tables, the toc ↔ notebook
check, per-profile paths, the exercise tags, and one end-to-end build of a tiny book with papermill and Sphinx."""

from __future__ import annotations

import io
import json
import math
import shutil
from pathlib import Path

import nbformat
import pytest
import torch

import bookbuild as book
from bookbuild import BuildError, BuildPaths, NotebookFailed
from srlib import results
from srlib.errors import DataError

ROOT = Path(__file__).resolve().parents[1]


def _table(**changes):
    tab = {
        "caption": "Pair accuracy",
        "columns": ["method", "accuracy"],
        "rows": [["SparseRM", 0.82431], ["DenseRM", None]],
    }
    tab.update(changes)
    return tab


# ----------------------------------------------------------------------------- paths and toc


def test_each_profile_builds_into_its_own_folder(tmp_path):
    smoke, cpu = BuildPaths(tmp_path, "smoke"), BuildPaths(tmp_path, "cpu")
    assert smoke.html == tmp_path / "_build" / "smoke" / "html"
    assert smoke.src == tmp_path / "_build" / "smoke" / "src"
    assert smoke.executed("03_sparserm") == smoke.src / "notebooks" / "03_sparserm.ipynb"
    assert smoke.results("03_sparserm") == smoke.src / "notebooks" / "03_sparserm.results.json"
    assert not {smoke.base, smoke.src, smoke.html} & {cpu.base, cpu.src, cpu.html}


def test_toc_files_walks_parts_chapters_and_sections():
    toc = {
        "root": "book/intro",
        "parts": [
            {
                "caption": "A",
                "chapters": [
                    {"file": "book/setup.md"},
                    {"file": "notebooks/01_a", "sections": [{"file": "notebooks/02_b.ipynb"}]},
                ],
            },
            {"caption": "B", "chapters": [{"file": "book/results"}]},
        ],
    }
    docs = book.toc_files(toc)
    assert docs == ["book/intro", "book/setup", "notebooks/01_a", "notebooks/02_b", "book/results"]
    assert book.chapter_stems(docs) == ["01_a", "02_b"]


def test_a_listed_notebook_that_is_missing_stops_the_build_with_its_name(tmp_path):
    (tmp_path / "notebooks").mkdir()
    (tmp_path / "notebooks" / "01_a.ipynb").write_text("{}")
    assert book.chapter_notebooks(tmp_path, ["01_a"]) == [tmp_path / "notebooks" / "01_a.ipynb"]
    with pytest.raises(BuildError, match=r"notebooks/02_b\.ipynb") as err:
        book.chapter_notebooks(tmp_path, ["01_a", "02_b"])
    assert "\n" not in str(err.value)


def test_unlisted_chapter_notebooks_are_found(tmp_path):
    (tmp_path / "notebooks").mkdir()
    for name in ("01_a.ipynb", "02_b.ipynb", "scratch.ipynb"):
        (tmp_path / "notebooks" / name).write_text("{}")
    assert [p.name for p in book.unlisted_notebooks(tmp_path, ["01_a"])] == ["02_b.ipynb"]


def test_the_repository_toc_names_only_pages_and_notebooks_that_exist():
    docs = book.read_toc(ROOT / "_toc.yml")
    for doc in docs:
        if not doc.startswith("notebooks/"):
            assert (ROOT / f"{doc}.md").is_file(), doc
    book.chapter_notebooks(ROOT, book.chapter_stems(docs))


def test_the_pages_the_build_fills_keep_their_markers():
    for page, markers in (
        ("results.md", book.RESULTS_MARKERS),
        ("reproduce.md", book.PARAMETERS_MARKERS),
        ("reproduce.md", book.REPORT_MARKERS),
    ):
        text = (ROOT / "book" / page).read_text()
        assert all(m in text for m in markers), page


# ----------------------------------------------------------------------------- results schema


def test_a_results_table_renders_as_a_captioned_markdown_table():
    text = book.render_table(
        "results-03-sparserm-accuracy", _table(rows=[["Sparse|RM", 0.82431], ["DenseRM", None], ["n", 1000]])
    )
    assert text.splitlines() == [
        "```{table} Pair accuracy",
        ":name: results-03-sparserm-accuracy",
        "",
        "| method | accuracy |",
        "|---|---|",
        "| Sparse\\|RM | 0.8243 |",
        "| DenseRM | – |",
        "| n | 1000 |",
        "```",
    ]


def test_float_format_applies_to_float_cells_only():
    text = book.render_table("t", _table(rows=[["a", 82.4312], ["b", 7]], float_format=".1f"))
    assert "| a | 82.4 |" in text and "| b | 7 |" in text


@pytest.mark.parametrize(
    "bad, message",
    [
        (_table(caption=""), "caption"),
        (_table(columns=[]), "columns"),
        (_table(rows=[["only one cell"]]), "row 0 must be a list of 2 cells"),
        (_table(rows=[["a", [1, 2]]]), "row 0 has a list cell"),
        (_table(float_format="%.2f"), "float_format"),
        (_table(colour="red"), "unknown table keys"),
    ],
)
def test_a_malformed_table_is_refused_with_its_name(bad, message):
    with pytest.raises(DataError, match=message) as err:
        results.validate_results({"profile": "smoke", "tables": {"accuracy": bad}}, "03.results.json")
    assert "table 'accuracy'" in str(err.value)


def test_results_need_a_profile_and_tables():
    with pytest.raises(DataError, match="profile"):
        results.validate_results({"tables": {}}, "x")
    with pytest.raises(DataError, match="tables"):
        results.validate_results({"profile": "cpu"}, "x")


def test_write_results_round_trips_and_writes_nothing_without_a_path(tmp_path):
    tab = results.table(
        ["method", "accuracy", "n"],
        [["SparseRM", torch.tensor(0.5).item(), torch.tensor(3)], ["nan", math.nan, 0]],
        "Accuracy",
    )
    assert tab["rows"] == [["SparseRM", 0.5, 3], ["nan", None, 0]]
    metrics = {
        "seconds": 1.5,
        "seeds": (0, 1),
        "scores": torch.tensor([0.5, math.inf]),
        "records": [{"acc": torch.tensor(0.25)}],
        "path": tmp_path / "rm",
    }
    path = results.write_results(
        tmp_path / "x" / "03.results.json", profile="smoke", tables={"accuracy": tab}, metrics=metrics
    )
    data = results.load_results(path)
    assert data == {
        "profile": "smoke",
        "tables": {"accuracy": tab},
        "metrics": {
            "seconds": 1.5,
            "seeds": [0, 1],
            "scores": [0.5, None],
            "records": [{"acc": 0.25}],
            "path": str(tmp_path / "rm"),
        },
    }
    assert results.write_results("", profile="smoke", tables={}) is None


def test_a_data_frame_becomes_a_table():
    pd = pytest.importorskip("pandas")
    frame = pd.DataFrame({"accuracy": [0.8, 0.7]}, index=pd.Index(["SparseRM", "DenseRM"], name="method"))
    tab = results.frame_table(frame, "Accuracy", index=True)
    assert tab["columns"] == ["method", "accuracy"]
    assert tab["rows"] == [["SparseRM", 0.8], ["DenseRM", 0.7]]


def test_invalid_json_is_reported_with_its_line(tmp_path):
    path = tmp_path / "bad.results.json"
    path.write_text('{"profile": "cpu",\n "tables": }')
    with pytest.raises(DataError, match="line 2"):
        results.load_results(path)


def test_the_results_page_gets_a_section_per_chapter_in_order():
    body = book.render_results(
        [
            ("01_a", "SAE decomposition", {"profile": "smoke", "tables": {"quality": _table(caption="SAE quality")}}),
            ("03_b", "SparseRM", {"profile": "smoke", "tables": {}}),
        ]
    )
    assert body.index("## SAE decomposition") < body.index("## SparseRM")
    assert "{doc}`../notebooks/01_a`" in body and "profile `smoke`" in body
    assert ":name: results-01-a-quality" in body and "```{table} SAE quality" in body
    assert "reports no tables" in body
    assert "No chapter" in book.render_results([])


def test_fill_between_replaces_only_the_marked_part():
    markers = ("<!-- begin results -->", "<!-- end results -->")
    page = "# Results\n\nintro\n\n<!-- begin results -->\nold\n<!-- end results -->\n"
    filled = book.fill_between(page, markers, "NEW")
    assert filled == "# Results\n\nintro\n\n<!-- begin results -->\nNEW\n<!-- end results -->\n"
    with pytest.raises(BuildError, match="markers"):
        book.fill_between("# Results\n", markers, "NEW")


def test_the_parameters_table_lists_each_parameter_with_its_comment():
    params = {
        "PROFILE": {"name": "PROFILE", "default": '"cpu"', "help": "smoke | cpu | paper"},
        "K": {"name": "K", "default": "128", "help": ""},
    }
    body = book.render_parameters([("03_sparserm", "SparseRM", params)])
    assert '| `PROFILE` | `"cpu"` | smoke \\| cpu \\| paper |' in body
    assert "| `K` | `128` |  |" in body


def test_notebook_title_is_the_first_level_one_heading():
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell("x = 1"),
            nbformat.v4.new_markdown_cell("Some text\n\n# 3. SparseRM  \n\n## Section"),
        ]
    )
    assert book.notebook_title(nb, "03_sparserm") == "3. SparseRM"
    assert book.notebook_title(nbformat.v4.new_notebook(), "03_sparserm") == "03_sparserm"


def test_the_kernel_resolves_a_bare_python_to_the_launching_interpreter():
    assert book.kernel_python(["python", "-m", "ipykernel_launcher"], "/venv/bin/python") == "/venv/bin/python"
    assert book.kernel_python(["python3", "-m", "ipykernel_launcher"], "/venv/bin/python") == "/venv/bin/python"
    assert (
        book.kernel_python(["/usr/bin/python3", "-m", "ipykernel_launcher"], "/venv/bin/python") == "/usr/bin/python3"
    )


def _where_am_i_notebook() -> nbformat.NotebookNode:
    """A chapter that records its kernel's working directory and events file in its results."""
    return nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_code_cell('PROFILE = "cpu"\nRESULTS_PATH = ""', metadata={"tags": ["parameters"]}),
            nbformat.v4.new_code_cell(
                "import os, time\n"
                "from srlib.results import write_results\n"
                "time.sleep(1)  # so that the two chapters overlap\n"
                "from srlib.chapter import torch_threads\n"
                'write_results(RESULTS_PATH, profile=PROFILE, tables={}, metrics={"cwd": os.getcwd(), '
                '"events": os.environ.get("SRLIB_PROGRESS_EVENTS"), "threads": torch_threads(8)})'
            ),
        ],
        metadata={"kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}},
    )


def test_chapters_run_side_by_side_each_start_their_kernel_in_their_own_folder(tmp_path, monkeypatch):
    # papermill's `cwd` changes the working directory of the whole process: two chapters run in
    # threads once started a kernel outside its folder, whose results then went missing.
    driver_cwd = tmp_path / "driver"
    driver_cwd.mkdir()
    monkeypatch.chdir(driver_cwd)
    runs = {}
    for stem in ("a_ch", "b_ch"):
        folder = tmp_path / stem / "notebooks"
        source = tmp_path / f"{stem}.ipynb"
        nbformat.write(_where_am_i_notebook(), source)
        runs[stem] = (source, folder / f"{stem}.ipynb", folder / f"{stem}.results.json", folder / f"{stem}.events")
    from concurrent.futures import ThreadPoolExecutor

    threads = {"a_ch": 1, "b_ch": None}  # a capped chapter beside an uncapped one
    with ThreadPoolExecutor(max_workers=2) as pool:
        list(
            pool.map(
                lambda item: book.execute_notebook(*item[1][:3], "smoke", events=item[1][3], threads=threads[item[0]]),
                runs.items(),
            )
        )
    for stem, (_, executed, results_path, events) in runs.items():
        metrics = json.loads(results_path.read_text())["metrics"]
        assert Path(metrics["cwd"]).resolve() == executed.parent.resolve()
        assert metrics["events"] == str(events.resolve())
        assert metrics["threads"] == (threads[stem] or 8)  # each kernel got its own cap, or none
    assert Path.cwd() == driver_cwd  # the build's own working directory never moved
    assert list(driver_cwd.iterdir()) == []


def test_chapters_side_by_side_share_the_cores_and_a_chapter_alone_has_them_all(monkeypatch):
    monkeypatch.setattr(book.os, "cpu_count", lambda: 8)
    assert book.side_by_side_threads(1) is None
    assert (book.side_by_side_threads(2), book.side_by_side_threads(3), book.side_by_side_threads(16)) == (4, 2, 1)


def test_the_thread_cap_bounds_what_a_chapter_asks_for(monkeypatch):
    from srlib import chapter
    from srlib.errors import ConfigError

    monkeypatch.delenv(chapter.THREADS_ENV, raising=False)
    assert chapter.torch_threads(4) == 4 and chapter.torch_threads() == chapter.DEFAULT_THREADS
    monkeypatch.setenv(chapter.THREADS_ENV, "2")
    assert (chapter.torch_threads(4), chapter.torch_threads(1)) == (2, 1)
    monkeypatch.setenv(chapter.THREADS_ENV, "two")
    with pytest.raises(ConfigError, match="SRLIB_THREADS='two' is not a positive whole number"):
        chapter.torch_threads(4)


# ----------------------------------------------------------------------------- exercises


def _exercise_notebook():
    return nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# Chapter"),
            nbformat.v4.new_code_cell("def f():\n    raise NotImplementedError", metadata={"tags": ["exercise"]}),
            nbformat.v4.new_code_cell(
                "def f():\n    return 1",
                metadata={"tags": ["solution"]},
                outputs=[nbformat.v4.new_output("stream", text="hi")],
                execution_count=3,
            ),
            nbformat.v4.new_code_cell("assert f() == 1", outputs=[nbformat.v4.new_output("stream", text="ok")]),
        ]
    )


def test_solutions_are_folded_in_the_book_and_removed_from_handouts(tmp_path):
    nb = _exercise_notebook()
    assert book.fold_solutions(nb) == 1
    assert nb["cells"][2]["metadata"]["tags"] == ["solution", "hide-input"]
    handout = book.handout_notebook(_exercise_notebook())
    assert [c["source"] for c in handout["cells"]] == [
        "# Chapter",
        "def f():\n    raise NotImplementedError",
        "assert f() == 1",
    ]
    assert all(c.get("outputs", []) == [] for c in handout["cells"])

    (tmp_path / "notebooks").mkdir()
    nbformat.write(_exercise_notebook(), tmp_path / "notebooks" / "01_a.ipynb")
    written = book.write_handouts(tmp_path, tmp_path / "handout")
    assert [p.name for p in written] == ["01_a.ipynb"]
    assert len(nbformat.read(written[0], as_version=4).cells) == 3


# ----------------------------------------------------------------------------- reuse and parallel runs


def _chapters(root: Path, n: int) -> list[Path]:
    """`n` chapter notebooks that import srlib.evaluate (so srlib is in their fingerprint)."""
    (root / "notebooks").mkdir(exist_ok=True)
    sources = []
    for i in range(1, n + 1):
        nb = nbformat.v4.new_notebook(
            cells=[nbformat.v4.new_code_cell(f"from srlib.evaluate import compare_paired\nx = {i}")]
        )
        path = root / "notebooks" / f"0{i}_ch.ipynb"
        nbformat.write(nb, path)
        sources.append(path)
    return sources


class _FakePapermill:
    """Stands in for `execute_notebook`: writes the executed copy and results, records each run
    with its start and end times, and fails the chapters named in `fail`."""

    def __init__(self, seconds: float = 0.0, fail: tuple[str, ...] = (), pairs: tuple[str, ...] = ()):
        import threading

        self.seconds, self.fail, self.runs, self.lock = seconds, set(fail), [], threading.Lock()
        # chapters in `pairs` wait inside the run until a second one is running too
        self.pairs, self.barrier = set(pairs), threading.Barrier(2, timeout=30)
        self.entered, self.active, self.peak = [], 0, 0
        self.threads: dict[str, int | None] = {}  # the thread cap each chapter was given

    def __call__(self, source, executed, results, profile, events=None, threads=None):
        import time

        start = time.perf_counter()
        self.threads[source.stem] = threads
        if events is not None:  # what srlib.progress writes: one stage's end line
            events.write_text(
                json.dumps(
                    {
                        "stage": f"{source.stem} work",
                        "run": 1,
                        "done": 3,
                        "total": 3,
                        "unit": "step",
                        "started": 0.0,
                        "time": 2.5,
                        "end": True,
                        "runs": 1,
                        "seconds": 2.5,
                    }
                )
                + "\n"
            )
        with self.lock:
            self.entered.append(source.stem)
            self.active += 1
            self.peak = max(self.peak, self.active)
        if source.stem in self.pairs:
            self.barrier.wait()  # a BrokenBarrierError here: no second chapter ran beside this one
        time.sleep(self.seconds)
        with self.lock:
            self.active -= 1
        if source.stem in self.fail:
            raise NotebookFailed(f"notebook {source.name} failed")
        executed.parent.mkdir(parents=True, exist_ok=True)
        executed.write_text(source.read_text())
        results.write_text(json.dumps({"profile": profile, "tables": {}}))
        with self.lock:
            self.runs.append((source.stem, start, time.perf_counter()))
        return 1.0


def test_unchanged_chapters_are_reused_and_an_edited_one_runs_again(tmp_path, monkeypatch):
    sources = _chapters(tmp_path, 3)
    paths = BuildPaths(tmp_path, "smoke")
    fake = _FakePapermill()
    monkeypatch.setattr(book, "execute_notebook", fake)
    book.execute_chapters(sources, paths, "smoke")
    assert [r[0] for r in fake.runs] == ["01_ch", "02_ch", "03_ch"]
    records = book.execute_chapters(sources, paths, "smoke", jobs=2)
    assert len(fake.runs) == 3  # nothing changed: nothing runs, with one job or several
    assert [r["reused"] for r in records] == [True] * 3 and records[0]["chapter"] == "01_ch"
    book.execute_chapters(sources, paths, "smoke")
    assert len(fake.runs) == 3
    nb = nbformat.read(sources[1], as_version=4)
    nb.cells[0].source += "\ny = 2"
    nbformat.write(nb, sources[1])
    book.execute_chapters(sources, paths, "smoke")
    assert [r[0] for r in fake.runs[3:]] == ["02_ch"]
    book.execute_chapters(sources, paths, "cpu")  # another profile is another input
    assert len(fake.runs) == 7
    book.execute_chapters(sources, paths, "cpu", force=True)
    assert len(fake.runs) == 10


def test_the_report_records_each_chapter_s_stages_and_a_reused_chapter_keeps_them(tmp_path, monkeypatch):
    sources = _chapters(tmp_path, 2)
    paths = BuildPaths(tmp_path, "smoke")
    monkeypatch.setattr(book, "execute_notebook", _FakePapermill())
    stage = {"name": "01_ch work", "runs": 1, "seconds": 2.5, "done": 3, "unit": "step"}
    first = book.execute_chapters(sources, paths, "smoke", console=book.Console(io.StringIO(), tty=False))
    assert first[0]["stages"] == [stage] and first[0]["reused"] is False
    again = book.execute_chapters(sources, paths, "smoke", console=book.Console(io.StringIO(), tty=False))
    assert again[0]["stages"] == [stage] and again[0]["reused"] is True
    page = book.render_report(again, 0.0)
    assert "| `01_ch` | 01_ch work | 1 | 3 step | 2.5 |" in page and "| `02_ch` | 02_ch work |" in page
    assert "stage" not in book.render_report([{**r, "stages": []} for r in again], 0.0)


def test_a_failed_chapter_is_never_reused(tmp_path, monkeypatch):
    sources = _chapters(tmp_path, 2)
    paths = BuildPaths(tmp_path, "smoke")
    monkeypatch.setattr(book, "execute_notebook", _FakePapermill())
    book.execute_chapters(sources, paths, "smoke")
    nb = nbformat.read(sources[1], as_version=4)
    nb.cells[0].source += "\nbroken = True"
    nbformat.write(nb, sources[1])
    monkeypatch.setattr(book, "execute_notebook", _FakePapermill(fail=("02_ch",)))
    with pytest.raises(NotebookFailed):
        book.execute_chapters(sources, paths, "smoke")
    assert not paths.fingerprint("02_ch").exists()  # the old copy's stamp is gone with the failed run
    fake = _FakePapermill()
    monkeypatch.setattr(book, "execute_notebook", fake)
    book.execute_chapters(sources, paths, "smoke")
    assert [r[0] for r in fake.runs] == ["02_ch"]


def test_with_two_jobs_the_first_chapter_runs_alone_then_two_at_a_time(tmp_path, monkeypatch):
    sources = _chapters(tmp_path, 5)
    fake = _FakePapermill(seconds=0.05, pairs=("02_ch", "03_ch", "04_ch", "05_ch"))
    monkeypatch.setattr(book, "execute_notebook", fake)
    book.execute_chapters(sources, BuildPaths(tmp_path, "smoke"), "smoke", jobs=2)
    runs = {stem: (start, end) for stem, start, end in fake.runs}
    assert sorted(runs) == [s.stem for s in sources] and fake.entered[0] == "01_ch"
    assert all(start >= runs["01_ch"][1] for stem, (start, _) in runs.items() if stem != "01_ch")
    assert fake.peak == 2  # the other four met in pairs, never three at once
    with pytest.raises(BuildError, match="jobs"):
        book.execute_chapters(sources, BuildPaths(tmp_path, "smoke"), "smoke", jobs=0)


def test_with_two_jobs_the_longest_chapters_start_first(tmp_path, monkeypatch):
    sources = _chapters(tmp_path, 4)
    paths = BuildPaths(tmp_path, "smoke")
    alone = _FakePapermill()
    monkeypatch.setattr(book, "execute_notebook", alone)
    book.execute_chapters(sources, paths, "smoke")
    assert set(alone.threads.values()) == {None}  # one chapter at a time: every core
    for stem, seconds in {"02_ch": 5.0, "03_ch": 50.0, "04_ch": 20.0}.items():
        paths.fingerprint(stem).write_text(json.dumps({"fingerprint": "old inputs", "seconds": seconds}))
    fake = _FakePapermill(pairs=("03_ch", "04_ch"))  # the two longest run side by side ...
    monkeypatch.setattr(book, "execute_notebook", fake)
    book.execute_chapters(sources, paths, "smoke", jobs=2)
    assert sorted(fake.entered[:2]) == ["03_ch", "04_ch"] and fake.entered[2:] == ["02_ch"]  # ... 02 after
    assert fake.threads == dict.fromkeys(("02_ch", "03_ch", "04_ch"), book.side_by_side_threads(2))  # cores shared


def test_the_closure_takes_a_subpackage_whole_and_follows_its_relative_imports(tmp_path, monkeypatch):
    import srlib

    files = {
        "__init__.py": "",
        "evaluate.py": "",
        "plots.py": "",
        "baselines/__init__.py": "from .registry import METHODS\n",
        "baselines/registry.py": "from ..evaluate import compare_paired\nMETHODS = ()\n",
        "baselines/lora.py": "",
        "tools/__init__.py": "",
        "tools/other.py": "",
    }
    for name, text in files.items():
        (tmp_path / "srlib" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "srlib" / name).write_text(text)
    monkeypatch.setattr(srlib, "__file__", str(tmp_path / "srlib" / "__init__.py"))
    closure = {
        p.relative_to(tmp_path / "srlib").as_posix() for p in book.srlib_closure("from srlib.baselines import METHODS")
    }
    assert closure == {
        "__init__.py",
        "baselines/__init__.py",
        "baselines/registry.py",
        "baselines/lora.py",
        "evaluate.py",
    }
    assert {p.name for p in book.srlib_closure("import srlib.tools.other")} == {"__init__.py", "other.py"}


def test_the_fingerprint_follows_srlib_imports_and_the_data_files(tmp_path, monkeypatch):
    closure = {p.name for p in book.srlib_closure("from srlib.evaluate import compare_paired")}
    assert {"__init__.py", "evaluate.py", "data.py", "errors.py"} <= closure  # evaluate imports data
    assert "cli.py" not in closure and "results.py" not in closure
    assert {p.name for p in book.srlib_closure("from srlib import plots")} >= {"plots.py"}
    source = _chapters(tmp_path, 1)[0]
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text("x\n")
    monkeypatch.setenv("SRLIB_DATA_DIR", str(data))
    before = book.chapter_fingerprint(source, "smoke")
    assert book.chapter_fingerprint(source, "smoke") == before
    assert book.chapter_fingerprint(source, "cpu") != before
    (data / "a.csv").write_text("x\ny\n")
    assert book.chapter_fingerprint(source, "smoke") != before


def test_staging_keeps_listed_executed_chapters_and_drops_the_rest(tmp_path):
    shutil.copy2(ROOT / "_config.yml", tmp_path / "_config.yml")
    (tmp_path / "_toc.yml").write_text("format: jb-book\nroot: book/intro\n")
    (tmp_path / "book").mkdir()
    (tmp_path / "book" / "intro.md").write_text("# intro\n")
    paths = BuildPaths(tmp_path, "smoke")
    (paths.src / "notebooks").mkdir(parents=True)
    for name in ("01_kept.ipynb", "01_kept.results.json", "01_kept.inputs.json", "02_gone.ipynb"):
        (paths.src / "notebooks" / name).write_text("{}")
    (paths.src / "book").mkdir()
    (paths.src / "book" / "stale.md").write_text("old page")
    book.stage_sources(tmp_path, paths, ["01_kept"])
    assert sorted(p.name for p in (paths.src / "notebooks").iterdir()) == [
        "01_kept.inputs.json",
        "01_kept.ipynb",
        "01_kept.results.json",
    ]
    assert not (paths.src / "book" / "stale.md").exists() and (paths.src / "book" / "intro.md").is_file()


# ----------------------------------------------------------------------------- what a chapter is doing


def _event(stage, done, total, *, started=100.0, time=110.0, run=1, unit="step", **extra):
    return {
        "stage": stage,
        "run": run,
        "done": done,
        "total": total,
        "unit": unit,
        "started": started,
        "time": time,
        **extra,
    }


def _write_events(path, events, tail=""):
    path.write_text("".join(json.dumps(e) + "\n" for e in events) + tail)


def test_an_events_file_becomes_the_chapter_s_stages(tmp_path):
    path = tmp_path / "01.jsonl"
    _write_events(
        path,
        [
            _event("layer 15 tokens", 400, 1000, unit="text", time=101.0),
            _event("training SAE", 10, 200, run=2, time=111.0),
            _event("layer 15 tokens", 1000, 1000, unit="text", time=103.0, end=True, runs=1, seconds=3.0),
            _event("reward head", 90, 90, run=None, unit="epoch", end=True, runs=3, seconds=0.6),
            _event("reward head", 60, 60, run=7, unit="epoch", end=True, runs=2, seconds=0.4),
        ],
        tail='{"stage": "reward head", "done": 3',
    )  # a line still being written
    stages = book.stage_report(book.read_events(path))
    assert stages == [
        {"name": "layer 15 tokens", "runs": 1, "seconds": 3.0, "done": 1000, "unit": "text"},
        {"name": "training SAE", "runs": 1, "seconds": 11.0, "done": 10, "unit": "step"},  # never ended
        {"name": "reward head", "runs": 5, "seconds": 1.0, "done": 150, "unit": "epoch"},
    ]


def test_the_tail_reads_only_complete_new_lines(tmp_path):
    path = tmp_path / "e.jsonl"
    tail = book.EventsTail(path)
    assert tail.read() == []  # no file yet: the chapter has not reported
    line = json.dumps(_event("DPO steps", 5, 20))
    path.write_text(line[:10])
    assert tail.read() == []
    with open(path, "a") as f:
        f.write(line[10:] + "\nnot json\n" + json.dumps(_event("DPO steps", 9, 20)) + "\n")
    assert [e["done"] for e in tail.read()] == [5, 9]
    assert tail.read() == []


def test_a_status_line_gives_the_rate_and_the_time_left():
    assert book.status_text(_event("training SAE", 50, 200, started=100.0, time=110.0)) == (
        "training SAE 50/200 step (25%), 5 step/s, about 30s left"
    )
    assert book.status_text(_event("generate", 3, None, unit="batch")) == "generate 3 batch, 0.3 batch/s"
    assert book.status_text(_event("reward head", 600, 600, unit="epoch", end=True, runs=20, seconds=75.0)) == (
        "reward head: done, 600 epoch in 1m15s (20 runs)"
    )
    assert book._duration(3 * 3600 + 5 * 60 + 1) == "3h05m"
    assert book.chapter_note(75.0, 600.0) == "chapter 1m15s in, its last run took 10m00s"
    assert book.chapter_note(5.0, None) == "chapter 5s in"


class _Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def test_a_log_gets_one_line_per_chapter_and_stage_every_thirty_seconds():
    out, clock = io.StringIO(), _Clock()
    console = book.Console(out, tty=False, clock=clock)
    for second in range(60):  # a stage reporting every second for a minute, in two chapters
        clock.now = float(second)
        console.status("[2/8] 02_a", _event("training SAE", second, 100, time=100.0 + second + 1))
        console.status("[3/8] 03_b", _event("layer 8 tokens", second, 100, time=100.0 + second + 1))
    console.status("[2/8] 02_a", _event("reward head", 1, 1, end=True, runs=1, seconds=0.1))
    console.status("[2/8] 02_a", _event("training SAE", 100, 100, end=True, runs=1, seconds=61.0))
    lines = out.getvalue().splitlines()
    assert [line.split(" ", 2)[1] for line in lines] == ["02_a", "03_b", "02_a", "03_b", "02_a", "02_a"]
    assert lines[0] == "[2/8] 02_a training SAE 0/100 step (0%), 0 step/s"
    assert lines[-1] == "[2/8] 02_a training SAE: done, 100 step in 1m01s"  # a long stage's end is told
    assert "\r" not in out.getvalue()


def test_a_terminal_gets_one_live_line_that_plain_lines_clear():
    out = io.StringIO()
    console = book.Console(out, tty=True)
    console.status("[2/8] 02_a", _event("training SAE", 50, 200))
    console.status("[3/8] 03_b", _event("layer 8 tokens", 3, None, unit="text"))
    console.status("[2/8] 02_a", _event("training SAE", 60, 200))
    console.say("[2/8] notebooks/02_a.ipynb done in 61.0 s")
    console.finish("[2/8] 02_a")
    text = out.getvalue()
    assert text.count("\n") == 1  # only the plain line ends a line; status rewrites in place
    assert "02_a training SAE 60/200 step" in text.split("\r\x1b[K")[3]
    assert text.split("\r\x1b[K")[-1].startswith("[3/8] 03_b layer 8 tokens")  # 02_a left the live line


def test_watching_tells_the_console_while_the_chapter_runs(tmp_path):
    import time

    path, out = tmp_path / "e.jsonl", io.StringIO()
    with book.watching(path, "[1/1] 01_a", book.Console(out, tty=False), every=0.05, last=600.0) as seen:
        _write_events(path, [_event("SAE steps", 5, 10)])
        deadline = time.monotonic() + 5
        while "SAE steps" not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.02)
        assert out.getvalue().startswith("[1/1] 01_a SAE steps 5/10 step")  # seen before the block ended
        assert "; chapter 0s in, its last run took 10m00s" in out.getvalue()
        with open(path, "a") as f:
            f.write(json.dumps(_event("SAE steps", 10, 10, end=True, runs=1, seconds=1.0)) + "\n")
    assert [e["done"] for e in seen] == [5, 10]  # the last lines are read when the chapter ends


# ----------------------------------------------------------------------------- end to end


def _tiny_book(root: Path, notebook_source: str) -> None:
    """A repository root with the real config, the real generated pages and one chapter notebook."""
    shutil.copy2(ROOT / "_config.yml", root / "_config.yml")
    (root / "_toc.yml").write_text(
        "format: jb-book\nroot: book/intro\nchapters:\n"
        "  - file: notebooks/01_demo\n  - file: book/results\n  - file: book/reproduce\n"
        "  - file: book/references\n"
    )
    (root / "book" / "_static" / "mathjax").mkdir(parents=True)
    for name in ("custom.css", "pipeline.svg"):
        shutil.copy2(ROOT / "book" / "_static" / name, root / "book" / "_static" / name)
    (root / "book" / "_static" / "mathjax" / book.MATHJAX_ENTRY).write_text("// stub\n")
    (root / "book" / "intro.md").write_text("# A tiny book\n\nOne chapter.\n")
    for name in ("results.md", "reproduce.md", "references.md", "references.bib"):
        shutil.copy2(ROOT / "book" / name, root / "book" / name)
    (root / "notebooks").mkdir()
    nb = nbformat.v4.new_notebook(
        cells=[
            nbformat.v4.new_markdown_cell("# A demo chapter"),
            nbformat.v4.new_code_cell(
                'PROFILE = "cpu"  # smoke | cpu | paper\nRESULTS_PATH = ""  # where to write results',
                metadata={"tags": ["parameters"]},
            ),
            nbformat.v4.new_code_cell(notebook_source),
        ]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, root / "notebooks" / "01_demo.ipynb")


# Three short runs of one stage: the last two are folded into the line the kernel writes at exit.
WORKS_IN_STAGES = """from srlib.progress import progress_bar
for run in range(3):
    for _ in progress_bar(range(7), desc="demo steps", unit="step"):
        pass
"""

WRITES_RESULTS = """from srlib.results import table, write_results
write_results(RESULTS_PATH, profile=PROFILE, tables={
    "accuracy": table(["method", "accuracy"], [["SparseRM", 0.5]], "Demo accuracy on " + PROFILE)})"""


@pytest.mark.notebook
def test_a_tiny_book_builds_end_to_end(tmp_path):
    _tiny_book(tmp_path, WORKS_IN_STAGES + WRITES_RESULTS)
    paths = book.build(tmp_path, "smoke", strict=True)
    assert paths == BuildPaths(tmp_path.resolve(), "smoke")
    assert json.loads(paths.results("01_demo").read_text())["profile"] == "smoke"
    results = (paths.html / "book" / "results.html").read_text()
    assert "Demo accuracy on smoke" in results and "SparseRM" in results
    reproduce = (paths.html / "book" / "reproduce.html").read_text()
    assert "where to write results" in reproduce
    assert (paths.html / "notebooks" / "01_demo.html").is_file()
    assert (paths.html / "index.html").is_file()
    report = json.loads(paths.report.read_text())
    assert [(c["chapter"], c["reused"]) for c in report["chapters"]] == [("01_demo", False)]
    # the kernel reported its stage to the events file the build named for this chapter
    assert [(s["name"], s["runs"], s["done"], s["unit"]) for s in report["chapters"][0]["stages"]] == [
        ("demo steps", 3, 21, "step")
    ]
    assert "executed" in reproduce and "01_demo" in reproduce and "demo steps" in reproduce
    book.build(tmp_path, "smoke", strict=True)  # nothing changed: the chapter is reused, and the page says so
    assert json.loads(paths.report.read_text())["chapters"][0]["reused"] is True
    assert "reused" in (paths.html / "book" / "reproduce.html").read_text()


@pytest.mark.notebook
def test_a_failing_notebook_stops_the_build_with_its_name_and_error(tmp_path):
    _tiny_book(tmp_path, "raise ValueError('layer 99 is out of range')")
    with pytest.raises(NotebookFailed, match=r"notebooks/01_demo\.ipynb failed .*ValueError: layer 99") as err:
        book.build(tmp_path, "smoke")
    assert "ValueError" in err.value.details
    assert not (tmp_path / "_build" / "smoke" / "html").exists()


@pytest.mark.notebook
def test_a_notebook_that_writes_no_results_is_an_error(tmp_path):
    _tiny_book(tmp_path, "x = 1")
    with pytest.raises(BuildError, match=r"01_demo\.ipynb wrote no results"):
        book.build(tmp_path, "smoke")


def test_docstrings_reflow_paragraphs_and_list_items_but_keep_examples():
    lines = [
        "A paragraph that",
        "wraps.",
        "",
        "* an item that",
        "  wraps too",
        "* another",
        "",
        "Example::",
        "",
        "    x = 1",
        "    y = 2",
        "1. numbered",
        "   item",
    ]
    assert book.reflow_docstring(lines) == [
        "A paragraph that wraps.",
        "",
        "* an item that wraps too",
        "* another",
        "",
        "Example::",
        "",
        "    x = 1",
        "    y = 2",
        "1. numbered item",
    ]


def test_every_srlib_object_the_pages_name_exists():
    """The book and the library never drift: each {py:...} role in book/*.md names a real object."""
    import importlib
    import re

    missing = []
    for page in sorted((ROOT / "book").glob("*.md")):
        for target in re.findall(r"\{py:\w+\}`~?(srlib\.[\w.]+)`", page.read_text()):
            module_name, _, attr = target.rpartition(".")
            try:
                obj = importlib.import_module(module_name)
            except ModuleNotFoundError:
                module_name, _, owner = module_name.rpartition(".")
                obj = getattr(importlib.import_module(module_name), owner, None)
            if obj is None or not hasattr(obj, attr):
                missing.append(f"{page.name}: {target}")
    assert not missing, missing
