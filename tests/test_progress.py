"""srlib.progress: tqdm bars that, when SRLIB_PROGRESS_EVENTS names a file, report each stage
there as throttled JSON lines (what `make book` reads to say what a chapter is doing)."""

from __future__ import annotations

import json
import time
from itertools import pairwise
from types import SimpleNamespace

import pytest
from tqdm.auto import tqdm

from srlib import progress


@pytest.fixture
def events(tmp_path, monkeypatch):
    """An events file named by the environment; a fresh sink per test."""
    path = tmp_path / "events.jsonl"
    monkeypatch.setenv(progress.EVENTS_ENV, str(path))
    monkeypatch.setattr(progress, "_sinks", {})
    return path


def _lines(path):
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_without_the_variable_the_bar_is_tqdm_and_nothing_is_written(tmp_path, monkeypatch):
    monkeypatch.delenv(progress.EVENTS_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    b = progress.progress_bar(range(3), desc="work", disable=True)
    assert type(b) is tqdm
    assert list(b) == [0, 1, 2]
    run = progress.stage("work", 3)
    run.advance(3)
    run.close()
    assert list(tmp_path.iterdir()) == []


def test_a_bar_reports_its_stage_whether_shown_or_not(events):
    assert list(progress.progress_bar(range(5), desc="layer 15 tokens", unit="text", disable=True)) == list(range(5))
    with progress.progress_bar(total=10, desc="SAE steps", unit="step", disable=True) as manual:
        manual.update(4)
        manual.update(6)
    (first, second) = _lines(events)
    assert first["stage"] == "layer 15 tokens" and first["end"] is True
    assert (first["done"], first["total"], first["unit"], first["runs"]) == (5, 5, "text", 1)
    assert (second["stage"], second["done"], second["total"], second["unit"]) == ("SAE steps", 10, 10, "step")
    assert second["time"] >= second["started"] and second["seconds"] >= 0


def test_progress_lines_are_throttled_to_one_per_interval_per_stage(tmp_path):
    clock = _Clock()
    sink = progress._Sink(str(tmp_path / "e.jsonl"), clock=clock, interval=1.0)
    run = progress.Stage("DPO steps", total=100, unit="step", sink=sink)
    for _ in range(100):  # 100 steps of 0.1 s: 10 s
        clock.now += 0.1
        run.advance()
    run.close()
    lines = _lines(tmp_path / "e.jsonl")
    updates = [e for e in lines if not e.get("end")]
    assert 9 <= len(updates) <= 10  # one a second, not one a step
    assert all(b["time"] - a["time"] >= 1.0 - 1e-9 for a, b in pairwise(updates))
    assert [e["done"] for e in updates] == sorted(e["done"] for e in updates)
    assert lines[-1]["end"] and lines[-1]["done"] == 100 and lines[-1]["seconds"] == pytest.approx(10.0)


def test_many_short_runs_fold_into_few_lines_and_lose_nothing(tmp_path):
    clock = _Clock()
    sink = progress._Sink(str(tmp_path / "e.jsonl"), clock=clock, interval=1.0)
    for _ in range(200):  # 200 head fits of 0.05 s, 30 epochs each: 10 s
        run = progress.Stage("reward head", total=30, unit="epoch", sink=sink)
        clock.now += 0.05
        run.advance(30)
        run.close()
    sink.flush()  # what the process does at exit
    lines = _lines(tmp_path / "e.jsonl")
    assert len(lines) <= 12
    ends = [e for e in lines if e.get("end")]
    assert sum(e["runs"] for e in ends) == 200
    assert sum(e["done"] for e in ends) == 200 * 30 and sum(e["total"] for e in ends) == 200 * 30
    assert sum(e["seconds"] for e in ends) == pytest.approx(10.0)


def test_a_long_run_always_writes_its_end_line(tmp_path):
    clock = _Clock()
    sink = progress._Sink(str(tmp_path / "e.jsonl"), clock=clock, interval=1.0)
    run = progress.Stage("training SAE", total=2, unit="step", sink=sink)
    clock.now += 1.5
    run.advance()  # a progress line at 1.5 s
    clock.now += 1.5
    run.advance()
    run.close()
    run.close()  # closing twice writes nothing more
    assert [e.get("end", False) for e in _lines(tmp_path / "e.jsonl")] == [False, False, True]


def test_the_trainer_callback_reports_global_steps(events):
    callback = progress.trainer_callback("DPO steps")
    state = SimpleNamespace(max_steps=8, global_step=0)
    callback.on_train_begin(None, state, None)
    for step in range(1, 9):
        state.global_step = step
        callback.on_step_end(None, state, None)
    callback.on_train_end(None, state, None)
    end = _lines(events)[-1]
    assert (end["stage"], end["done"], end["total"], end["unit"], end["end"]) == ("DPO steps", 8, 8, "step", True)


def test_counting_a_unit_costs_microseconds(events):
    run = progress.stage("cheap", total=None)
    start = time.perf_counter()
    for _ in range(100_000):
        run.advance()
    per_unit = (time.perf_counter() - start) / 100_000
    run.close()
    assert per_unit < 20e-6  # a unit is a batch, a step or a text: milliseconds at the least


def _tqdm_bars(code: str) -> list[int]:
    """The lines of `code` that call tqdm's bar directly (`tqdm(...)`, `tqdm.tqdm(...)`,
    `trange(...)`); `tqdm.write` is not a bar."""
    import ast

    lines = []
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in {"tqdm", "trange"}:
                lines.append(node.lineno)
    return lines


def test_srlib_makes_its_bars_through_srlib_progress_only():
    from pathlib import Path

    package = Path(progress.__file__).parent
    found = {
        path.relative_to(package).as_posix(): _tqdm_bars(path.read_text())
        for path in sorted(package.rglob("*.py"))
        if path.name != "progress.py"
    }
    assert {name: lines for name, lines in found.items() if lines} == {}
    assert _tqdm_bars("from tqdm.auto import tqdm\nfor x in tqdm(range(3)):\n    tqdm.write('x')") == [2]
