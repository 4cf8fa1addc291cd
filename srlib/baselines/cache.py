"""Fit each baseline once and score each pair set once: both are kept on disk.

`cached_fit_baseline` fits a baseline once and saves it under `cache_dir("baselines", key)`,
the key hashing the backbone's identity, the method, its settings (defaults filled in), the
seed and the texts and ids of the pairs it learns from; a later call loads it, training cost
included. `cached_score_pairs` keeps its scores of a pair set beside it, with the scoring
time, so a rebuilt book neither trains nor scores again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from srlib.baselines.models import Baseline, fit_baseline, nonempty_pairs
from srlib.baselines.registry import get_method
from srlib.baselines.settings import build_settings
from srlib.cache import warn_recomputing
from srlib.errors import ConfigError, DamagedFileError
from srlib.paths import atomic_path, cache_dir
from srlib.reward import CONFIG_NAME, RewardModel, pair_accuracy

#: Bump when a change to the baselines makes earlier cached fits or scores stale. 2: scores of a
#: bfloat16 backbone's classifier heads and judge are float32 products (1 kept bfloat16-rounded ones).
CACHE_VERSION = 2
SCORES_DIR = "scores"


def pairs_digest(pairs: Sequence | None) -> str | None:
    """A hash of a pair list: ids and texts, in order (None for no pairs). Two lists hash
    alike only if every pair has the same id, prompt, chosen and rejected text."""
    if not pairs:
        return None
    digest = hashlib.sha256()
    for pair in pairs:
        for part in (pair.pair_id, pair.prompt, pair.chosen, pair.rejected):
            digest.update((part if isinstance(part, str) else json.dumps(part)).encode())  # a conversation prompt
            digest.update(b"\x00")
    return digest.hexdigest()


def baseline_key(
    method: str,
    backbone,
    train_pairs: Sequence | None = None,
    val_pairs: Sequence | None = None,
    *,
    seed: int = 0,
    **settings,
) -> str:
    """The cache key of one baseline fit: "<method>-<hash>".

    The hash covers the backbone's identity, the method, its settings with the defaults filled
    in (so leaving a setting out and passing its default give one key), a cache version and,
    for the methods that train (`Method.trained`), the seed and the training and validation
    pairs (`pairs_digest`). The zero-shot judge and the log-prob floor learn nothing, so their
    key ignores pairs and seed.
    """
    spec = get_method(method)
    resolved = build_settings(spec.model_class.settings_class, settings)
    # 1 and 1.0 epochs are one fit: numbers of float fields are hashed as floats
    canonical = {
        f.name: float(getattr(resolved, f.name)) if f.type == "float" else getattr(resolved, f.name)
        for f in dataclasses.fields(resolved)
    }
    record: dict[str, Any] = {
        "version": CACHE_VERSION,
        "method": method,
        "backbone": backbone.identity,
        "settings": canonical,
    }
    if spec.trained:
        record.update(seed=seed, train=pairs_digest(train_pairs), val=pairs_digest(val_pairs))
    text = json.dumps(record, sort_keys=True)
    return f"{method}-{hashlib.sha256(text.encode()).hexdigest()[:24]}"


def cached_fit_baseline(
    method: str,
    backbone,
    train_pairs: Sequence | None = None,
    val_pairs: Sequence | None = None,
    *,
    seed: int = 0,
    progress: bool = True,
    **settings,
) -> Baseline:
    """`fit_baseline`, but only once: the fitted model is saved (atomically) under
    `cache_dir("baselines", baseline_key(...))` and a later call with the same backbone, method,
    settings, seed and pairs loads it instead of training.

    The returned model has `cache_path` (its folder, for `cached_score_pairs`) and
    `from_cache` (True when loaded); its `.cost` is the cost measured when it was trained.
    """
    directory = cache_dir("baselines") / baseline_key(method, backbone, train_pairs, val_pairs, seed=seed, **settings)
    rm: Baseline | None = None
    if (directory / CONFIG_NAME).is_file():
        try:
            rm = Baseline.from_pretrained(directory, backbone=backbone)
            rm.from_cache = True
        except DamagedFileError as error:
            warn_recomputing(directory, error)
            shutil.rmtree(directory)  # srlib's own cache entry: the refit below writes it anew
    if rm is None:
        rm = fit_baseline(method, backbone, train_pairs, val_pairs, seed=seed, progress=progress, **settings)
        rm.save_pretrained(directory)
        rm.from_cache = False
    rm.cache_path = directory
    return rm


@dataclass
class PairScores:
    """A reward model's scores of a pair set and how long computing them took."""

    chosen: Tensor
    rejected: Tensor
    seconds: float  # wall time of score_pairs when the scores were computed (not when loaded)
    from_cache: bool = False

    @property
    def accuracy(self) -> float:
        return pair_accuracy(self.chosen, self.rejected)

    @property
    def pairs_per_second(self) -> float:
        return len(self.chosen) / self.seconds if self.seconds > 0 else float("inf")


def scores_path(directory: str | Path, pairs: Sequence) -> Path:
    """Where `cached_score_pairs` keeps a model's scores of `pairs`, in its cache folder."""
    return Path(directory) / SCORES_DIR / f"{pairs_digest(pairs)}.safetensors"


def cached_score_pairs(rm: RewardModel, pairs: Sequence, *, progress: bool = False) -> PairScores:
    """`rm.score_pairs(pairs)`, timed, kept in the model's cache folder (`scores/<pairs_digest>`)
    so a second call with the same pairs loads the scores and the time first measured.
    `rm` must come from `cached_fit_baseline`."""
    directory = getattr(rm, "cache_path", None)
    if directory is None:
        raise ConfigError("cached_score_pairs needs a reward model from cached_fit_baseline (it has no cache_path)")
    pairs = nonempty_pairs(pairs, "scoring")
    path = scores_path(directory, pairs)
    if path.is_file():
        try:
            with safe_open(str(path), framework="pt") as f:
                seconds = float(f.metadata()["seconds"])
                return PairScores(f.get_tensor("chosen"), f.get_tensor("rejected"), seconds, from_cache=True)
        except (SafetensorError, OSError, ValueError, KeyError, TypeError) as error:
            warn_recomputing(path, error)  # damaged: scored again below and rewritten
    started = time.perf_counter()
    chosen, rejected = rm.score_pairs(pairs, progress=progress)
    scores = PairScores(chosen.float(), rejected.float(), time.perf_counter() - started)
    with atomic_path(path) as tmp:
        save_file(
            {"chosen": scores.chosen.contiguous(), "rejected": scores.rejected.contiguous()},
            str(tmp),
            metadata={"seconds": repr(scores.seconds), "n_pairs": str(len(pairs))},
        )
    return scores
