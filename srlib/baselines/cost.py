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
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

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

    def __enter__(self) -> CostMeter:
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
        return TrainingCost(
            seconds=round(self.seconds, 3),
            peak_rss_mb=round(self.peak_rss / mb, 1),
            rss_increase_mb=round((self.peak_rss - self.start_rss) / mb, 1),
            n_train_pairs=n_train_pairs,
        )


def measure_cost(fn: Callable[..., Any], *args, n_train_pairs: int, **kwargs) -> tuple[Any, TrainingCost]:
    """Call `fn(*args, **kwargs)` under the meter the baselines are costed with (wall time,
    psutil peak RSS); return its result and the `TrainingCost`. Lets any other reward model
    (SparseRM, DenseRM) be timed and weighed exactly as the baselines are."""
    with CostMeter() as meter:
        result = fn(*args, **kwargs)
    return result, meter.cost(n_train_pairs)


def costed_fit(states, features: str, *, sae, k: int, seed: int, validation: bool, test=None) -> dict[str, Any]:
    """Fit SparseRM (`features="projection"`) or DenseRM (`"dense"`) from cached hidden states
    under the baselines' meter, and score it: one trial row with the columns of
    `srlib.baselines.trials.TRIAL_COLUMNS` that a feature model has. Chapter 8 and
    `benchmarks/rm_cost.py` both time SparseRM and DenseRM through here, so their numbers are
    measured the same way.

    `states`: a `DatasetStates` (the fit reads its training split, and its validation split for
    early stopping when `validation`); `test`: the split the trial's `test_accuracy` and
    per-pair `outcomes` are scored on (default: the whole test split, which
    `full_test_accuracy` always scores).
    """
    from srlib.data_efficiency import fit_feature_rm
    from srlib.evaluate import pair_outcomes
    from srlib.reward import pair_accuracy

    model, cost = measure_cost(
        fit_feature_rm,
        states,
        features,
        sae=sae,
        k=k,
        seed=seed,
        validation=validation,
        n_train_pairs=len(states.train),
    )
    test = states.test if test is None else test
    common = model.score_states(test.chosen), model.score_states(test.rejected)
    full = model.score_states(states.test.chosen), model.score_states(states.test.rejected)
    return {
        "dataset": states.name,
        "seed": seed,
        "test_accuracy": pair_accuracy(*common),
        "full_test_accuracy": pair_accuracy(*full),
        "trainable_parameters": model.num_trainable_parameters(),
        "fit_seconds": cost.seconds,
        "peak_rss_mb": cost.peak_rss_mb,
        "rss_increase_mb": cost.rss_increase_mb,
        "n_train_pairs": len(states.train),
        "n_val_pairs": len(states.val) if validation else 0,
        "outcomes": pair_outcomes(*common),
    }


def extraction_cost(backbone, pairs, *, layer: int, max_length: int, batch_size: int) -> dict[str, float]:
    """Time the extraction of the hidden states a head reads (both answers of each pair, early
    exit at `layer`, cache off) under the same meter: texts, seconds, texts per second and the
    growth of resident memory. The rate is what SparseRM's fit adds to read fresh pairs, and its
    scoring speed (a pair is two extractions and a head that costs next to nothing)."""
    from srlib.activations import last_token_states
    from srlib.backbone import format_pair

    texts = [text for pair in pairs for text in format_pair(backbone.tokenizer, pair)]
    _, cost = measure_cost(
        last_token_states,
        backbone,
        texts,
        layer,
        max_length=max_length,
        batch_size=batch_size,
        cache=False,
        progress=False,
        n_train_pairs=0,
    )
    return {
        "texts": len(texts),
        "seconds": cost.seconds,
        "texts_per_second": len(texts) / cost.seconds,
        "rss_increase_mb": cost.rss_increase_mb,
    }
