"""Progress of srlib's long work: the one way srlib makes a progress bar, and the events a
build reads to say what a chapter is doing.

`progress_bar(...)` is tqdm's bar (same arguments); every loop in srlib that can run for minutes
(hidden states extracted, SAE steps, head fits, generation, scoring) goes through it, and
`trainer_callback(name)` does the same for a Hugging Face trainer's steps (DPO, LoRA fits).

When the environment variable `SRLIB_PROGRESS_EVENTS` names a file (the book build sets it
for each chapter's kernel), each stage also appends small JSON lines to it, whether its bar
is shown or not. A stage is named by its bar's `desc`; one line is

    {"stage": "training SAE", "run": "4711.3", "done": 120, "total": 2000, "unit": "step",
     "started": <epoch seconds>, "time": <epoch seconds>}

(`run`: the process id and the run's number in it, unique when subprocesses report too)

while a run of it has been under way for `INTERVAL` seconds or more (at most one line per
`INTERVAL` seconds per stage name), and
a line with `"end": true` when runs end, carrying `runs`, `seconds` and `done` summed over
the runs it stands for: a run shorter than `INTERVAL` that ends within `INTERVAL` of the
stage's previous line is folded into the stage's next end line (or the one written when the
process exits), so a thousand tiny fits write a line a second, not a thousand. Without the
variable nothing is written and `progress_bar` is tqdm itself.
"""

from __future__ import annotations

import atexit
import json
import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

#: The environment variable that names the events file (JSON lines, appended).
EVENTS_ENV = "SRLIB_PROGRESS_EVENTS"
#: At most one line per stage name per this many seconds (end lines of long runs aside).
INTERVAL = 1.0


def events_path() -> str | None:
    """The events file this process reports to, or None (the variable unset or empty)."""
    return os.environ.get(EVENTS_ENV) or None


@dataclass
class _Folded:
    """Short runs of one stage that ended without a line of their own yet."""

    runs: int = 0
    seconds: float = 0.0
    done: float = 0
    total: float | None = 0
    started: float = 0.0
    unit: str = "it"


class _Sink:
    """Appends event lines to one file and keeps the per-stage throttle (thread-safe)."""

    def __init__(self, path: str, clock: Callable[[], float] = time.time, interval: float = INTERVAL) -> None:
        self.path, self.clock, self.interval = path, clock, interval
        self.lock = threading.Lock()
        self.last_line: dict[str, float] = {}
        self.folded: dict[str, _Folded] = {}
        self.runs = 0

    def new_run(self) -> str:
        with self.lock:
            self.runs += 1
            return f"{os.getpid()}.{self.runs}"

    def due(self, stage: str, now: float) -> bool:
        """Whether a progress line for `stage` may be written at `now` (one per interval)."""
        return now - self.last_line.get(stage, -float("inf")) >= self.interval

    def write(self, event: dict) -> None:
        with self.lock:
            self._append(event)

    def _append(self, event: dict) -> None:
        self.last_line[event["stage"]] = event["time"]
        # One write of one short line in append mode: lines of concurrent writers do not mix.
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(event, separators=(",", ":")) + "\n")

    def end(self, event: dict, seconds: float) -> None:
        """The end of one run: written with the short runs folded before it, or folded itself."""
        stage, now = event["stage"], event["time"]
        with self.lock:
            folded = self.folded.pop(stage, _Folded(started=event["started"], unit=event["unit"]))
            folded.runs += 1
            folded.seconds += seconds
            folded.done += event["done"]
            folded.total = None if folded.total is None or event["total"] is None else folded.total + event["total"]
            if seconds < self.interval and not self.due(stage, now):
                self.folded[stage] = folded
                return
            self._append(
                {
                    **event,
                    "done": folded.done,
                    "total": folded.total,
                    "end": True,
                    "runs": folded.runs,
                    "seconds": round(folded.seconds, 4),
                }
            )

    def flush(self) -> None:
        """Write the folded runs of every stage (at exit: nothing is lost to the throttle)."""
        with self.lock:
            for stage, f in list(self.folded.items()):
                self._append(
                    {
                        "stage": stage,
                        "run": None,
                        "done": f.done,
                        "total": f.total,
                        "unit": f.unit,
                        "started": f.started,
                        "time": self.clock(),
                        "end": True,
                        "runs": f.runs,
                        "seconds": round(f.seconds, 4),
                    }
                )
            self.folded.clear()


_sinks: dict[str, _Sink] = {}
_sinks_lock = threading.Lock()


def _sink() -> _Sink | None:
    """The sink of the events file named by the environment now, or None."""
    path = events_path()
    if path is None:
        return None
    with _sinks_lock:
        if path not in _sinks:
            _sinks[path] = _Sink(path)
        return _sinks[path]


@atexit.register
def _flush_all() -> None:
    for sink in list(_sinks.values()):
        sink.flush()


class Stage:
    """One run of a named piece of long work, counted in units; reports to `sink` (a no-op
    without one). `advance` is cheap: a clock read and a comparison unless a line is due."""

    def __init__(self, name: str, total: float | None = None, unit: str = "it", sink: _Sink | None = None) -> None:
        self.name, self.total, self.unit, self.sink = name, total, unit, sink
        self.done: float = 0
        self.closed = sink is None
        if sink is not None:
            self.run = sink.new_run()
            self.started = sink.clock()

    def _event(self, now: float) -> dict:
        return {
            "stage": self.name,
            "run": self.run,
            "done": self.done,
            "total": self.total,
            "unit": self.unit,
            "started": self.started,
            "time": now,
        }

    def advance(self, n: float = 1) -> None:
        """`n` more units done; writes a line when the stage's interval has passed."""
        if self.closed or self.sink is None:
            return
        self.done += n
        now = self.sink.clock()
        # A run shorter than the interval writes only its end line.
        if now - self.started >= self.sink.interval and self.sink.due(self.name, now):
            self.sink.write(self._event(now))

    def advance_to(self, done: float) -> None:
        """Set the units done (a trainer reports its global step)."""
        self.advance(done - self.done)

    def close(self) -> None:
        """The run ended (idempotent)."""
        if self.closed or self.sink is None:
            return
        self.closed = True
        now = self.sink.clock()
        self.sink.end(self._event(now), now - self.started)


def stage(name: str, total: float | None = None, unit: str = "it") -> Stage:
    """A `Stage` reporting to this process's events file (a no-op when none is named)."""
    return Stage(name, total, unit, _sink())


class _Bar(tqdm):
    """tqdm's bar that also counts its units into a `Stage` (shown or not)."""

    def __init__(self, *args: Any, stage: Stage, **kwargs: Any) -> None:
        self._stage = stage
        super().__init__(*args, **kwargs)

    def update(self, n: float | None = 1) -> bool | None:
        self._stage.advance(1 if n is None else n)
        return super().update(n)

    def close(self) -> None:
        self._stage.close()
        super().close()


def _counted(iterable: Iterable, stage: Stage) -> Iterator:
    for item in iterable:
        yield item
        stage.advance()


def progress_bar(
    iterable: Iterable | None = None, *, desc: str, total: float | None = None, unit: str = "it", **kwargs: Any
) -> tqdm:
    """tqdm's bar over `iterable` (or a manual one, `update(n)`), named `desc`: the stage name
    in the events file when one is named. Other keywords (`disable`, `leave`, ...) go to tqdm."""
    sink = _sink()
    if sink is None:
        return tqdm(iterable, desc=desc, total=total, unit=unit, **kwargs)
    if total is None and isinstance(iterable, Sized):
        total = len(iterable)
    run = Stage(desc, total, unit, sink)
    if iterable is not None:
        iterable = _counted(iterable, run)
    return _Bar(iterable, desc=desc, total=total, unit=unit, stage=run, **kwargs)


def trainer_callback(name: str):
    """A transformers `TrainerCallback` that reports the trainer's optimiser steps as stage
    `name` (DPO steps, a LoRA fit's steps); add it with `trainer.add_callback(...)`."""
    from transformers import TrainerCallback

    class StageCallback(TrainerCallback):
        def __init__(self) -> None:
            self.run: Stage | None = None

        def on_train_begin(self, args, state, control, **kwargs):
            self.run = stage(name, state.max_steps or None, "step")

        def on_step_end(self, args, state, control, **kwargs):
            if self.run is not None:
                self.run.advance_to(state.global_step)

        def on_train_end(self, args, state, control, **kwargs):
            if self.run is not None:
                self.run.close()

    return StageCallback()
