"""What training a baseline cost: wall time and the process's peak resident memory.

`TrainingCost.seconds` is the wall time of training (data preparation included, final scoring
excluded); memory is the process's resident set size (RSS) sampled by psutil every 20 ms while
training (tracemalloc misses torch's allocations; getrusage's ru_maxrss is a peak over the
whole process life, so a second run in one process would report the first's peak).
`measure_cost` puts any other training (SparseRM's head, say) under the same meter.
"""

from __future__ import annotations

import threading
import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import psutil


@dataclass
class TrainingCost:
    """What training a reward model cost (see the module docstring for how it is measured)."""

    seconds: float
    peak_rss_mb: float
    rss_increase_mb: float  # peak RSS while training minus RSS when training began
    n_train_pairs: int
    memory_method: str = "psutil RSS sampled every 20 ms"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class CostMeter:
    """Context manager: wall time and peak RSS of the block, sampled in a background thread."""

    interval = 0.02

    def __enter__(self) -> "CostMeter":
        self._process = psutil.Process()
        self.start_rss = self.peak_rss = self._process.memory_info().rss
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        self._t0 = time.perf_counter()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def __exit__(self, *exc) -> None:
        self.seconds = time.perf_counter() - self._t0
        self._stop.set()
        self._thread.join()
        self.peak_rss = max(self.peak_rss, self._process.memory_info().rss)

    def cost(self, n_train_pairs: int) -> TrainingCost:
        mb = 1024 * 1024
        return TrainingCost(seconds=round(self.seconds, 3), peak_rss_mb=round(self.peak_rss / mb, 1),
                            rss_increase_mb=round((self.peak_rss - self.start_rss) / mb, 1),
                            n_train_pairs=n_train_pairs)


def measure_cost(fn: Callable[..., Any], *args, n_train_pairs: int, **kwargs) -> tuple[Any, TrainingCost]:
    """Call `fn(*args, **kwargs)` under the meter the baselines are costed with (wall time,
    psutil peak RSS); return its result and the `TrainingCost`. Lets any other reward model
    (SparseRM, DenseRM) be timed and weighed exactly as the baselines are."""
    with CostMeter() as meter:
        result = fn(*args, **kwargs)
    return result, meter.cost(n_train_pairs)
