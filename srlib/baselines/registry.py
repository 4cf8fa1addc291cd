"""The one list of baseline methods. The CLI's choices, chapter 8's default comparison and
table rows, `fit_baseline`'s dispatch, the cache keys and the settings the book runs all read
it; adding a baseline is one `Method` here plus its class in `srlib.baselines.models`.

This module imports nothing heavy (no torch, no TRL), so `python -m srlib --help` can list the
methods without loading a model library; `Method.model_class` imports the class on first use.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from srlib.errors import ConfigError

if TYPE_CHECKING:
    from srlib.baselines.models import Baseline


@dataclass(frozen=True)
class Method:
    """One baseline method.

    name: what the CLI, `fit_baseline` and the cache key call it. label: how the book names it.
    model: the class in `srlib.baselines.models` that fits it. trained: whether it learns from
    the training pairs (the others ignore pairs and seed, so they run once). two_answers: its
    prompt holds both answers (a judge), so the book gives it twice the text budget.
    in_comparison: chapter 8 (and `benchmarks/rm_cost.py`) run it unless told otherwise.
    fit_options: keywords the class's `fit` gets for this method.
    """

    name: str
    label: str
    model: str
    trained: bool
    two_answers: bool = False
    in_comparison: bool = True
    fit_options: Mapping[str, Any] = field(default_factory=dict)

    @property
    def model_class(self) -> type[Baseline]:
        """The reward-model class that fits this method (imports `srlib.baselines.models`)."""
        return getattr(importlib.import_module("srlib.baselines.models"), self.model)


#: Every baseline, in the order tables list them.
REGISTRY: dict[str, Method] = {
    m.name: m
    for m in (
        Method("standard", "StandardRM (LoRA)", "StandardRM", trained=True),
        Method("generalizable", "GeneralizableRM (LoRA)", "GeneralizableRM", trained=True),
        Method("judge", "zero-shot judge", "GenerativeJudge", trained=False, two_answers=True),
        Method(
            "judge-lora",
            "LoRA judge",
            "GenerativeJudge",
            trained=True,
            two_answers=True,
            in_comparison=False,
            fit_options={"lora": True},
        ),
        Method("logprob", "log-prob floor", "LogProbPreference", trained=False),
    )
}
METHODS = tuple(REGISTRY)
#: The methods that learn from the training pairs (the others ignore pairs and seed).
TRAINED_METHODS = tuple(name for name, m in REGISTRY.items() if m.trained)
#: How the book names each method.
METHOD_LABELS = {name: m.label for name, m in REGISTRY.items()}
#: What chapter 8 and `benchmarks/rm_cost.py` run by default (all but the LoRA judge).
COMPARISON_METHODS = tuple(name for name, m in REGISTRY.items() if m.in_comparison)


def get_method(name: str) -> Method:
    """The registered method called `name`; any other name is one line listing the choices."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown baseline method {name!r}; choose one of: {', '.join(METHODS)}")
    return REGISTRY[name]
