"""The reward models SparseRM is compared with (the paper's Figure 3), on the same backbone.

Every baseline has the interface of `srlib.reward.RewardModel` (`score_pairs`, `score`,
`save_pretrained`, `RewardModel.from_pretrained`, `num_trainable_parameters`) and records
what training cost in `.cost` (a `TrainingCost`). Build one with `fit_baseline(method, ...)`
or `<Class>.fit(backbone, train_pairs, val_pairs=None, *, seed=0, ...)`.

What each one is, and how far it is from the published method:

* `StandardRM` (method ``standard``; Stiennon et al. 2020): the backbone as a sequence
  classifier with a scalar head, trained with the Bradley-Terry loss by TRL's
  `RewardTrainer`. As the SparseRM paper trains its baselines, with LoRA: rank 8 on the
  attention q/v projections, the head trainable in full (peft ``modules_to_save``). The
  published model fine-tunes the whole network; LoRA is the paper's (and our) choice.
* `GeneralizableRM` (``generalizable``; Yang et al. 2024, GRM): StandardRM plus GRM's
  text-generation regulariser on the chosen responses, read through the SAME hidden states:
  loss = (1 − α)·BT + α·(−log σ(β · log π(y_chosen | x))), with log π the summed log-prob
  of the chosen response tokens under the backbone's own (frozen) LM head applied to the
  final hidden states of the LoRA'd backbone. α = 0.01, β = 0.1 and the reference-free
  "SFT" form are GRM's published defaults. Not as published: their reward head is an MLP
  (one hidden layer of 1,024 units) and their LoRA is rank 32 on q/k/v/o; here the head and
  LoRA are StandardRM's, so the two baselines differ only by the regulariser.
* `GenerativeJudge` (``judge``, ``judge-lora``): the JudgeLM / GRAM family, NOT their
  published models (JudgeLM and GRAM are separately fine-tuned judge LLMs with their own
  prompts and training data). The backbone is asked which of two answers is better
  (`JUDGE_TEMPLATE`); the verdict is read from the next-token logits of "A" and "B" and
  averaged over both orders to cancel position bias. ``judge`` is zero-shot; ``judge-lora``
  tunes a LoRA (same shape as above) with TRL's `SFTTrainer` on the correct verdict token of
  every training pair, in both orders; given validation pairs it keeps the epoch of lowest
  validation loss and records it (`best_epoch`, `val_loss`), as the two RMs above do. Its
  `score_pairs` returns s_chosen = P(chosen is better) and s_rejected = 1 − s_chosen: a
  pairwise judge has no score for one response.
* `LogProbPreference` (``logprob``): no reward model at all, the floor: each response is
  scored by the backbone's mean per-token log-probability of it given the prompt
  (`srlib.evaluate`'s reading of the response tokens).

The package, one job per module:

* `registry`: the one list of methods (`REGISTRY`, `METHODS`, `METHOD_LABELS`, ...).
* `settings`: each method's frozen settings (`LoraSettings`, `GRMSettings`, `JudgeSettings`,
  `LogProbSettings`).
* `models`: the four classes above, `fit_baseline` and `trainable_parameters`.
* `cost`: the training-cost meter (`TrainingCost`, `measure_cost`).
* `cache`: fit once, score once (`cached_fit_baseline`, `cached_score_pairs`, `baseline_key`).
* `trials`: methods × seeds through the cache (`baseline_trials`, `baseline_settings`).
* `table`: Figure 3 as a table (`comparison_table`).

Every name is importable from `srlib.baselines`; the package imports a module only when one
of its names is first used, so `srlib.baselines.registry` (the CLI's choices) loads no model
library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

#: Each public name and the module of this package that defines it.
_HOMES = {
    "registry": (
        "COMPARISON_METHODS",
        "METHODS",
        "METHOD_LABELS",
        "REGISTRY",
        "TRAINED_METHODS",
        "Method",
        "get_method",
    ),
    "settings": ("GRMSettings", "JudgeSettings", "LogProbSettings", "LoraSettings", "build_settings"),
    "cost": ("CostMeter", "TrainingCost", "costed_fit", "extraction_cost", "measure_cost"),
    "models": (
        "JUDGE_TEMPLATE",
        "VERDICT_TOKENS",
        "GeneralizableRM",
        "GenerativeJudge",
        "LogProbPreference",
        "StandardRM",
        "chosen_response_logprob",
        "fit_baseline",
        "trainable_parameters",
        "verdict_preference",
    ),
    "cache": (
        "CACHE_VERSION",
        "PairScores",
        "baseline_key",
        "cached_fit_baseline",
        "cached_score_pairs",
        "pairs_digest",
        "scores_path",
    ),
    "trials": ("TRIAL_COLUMNS", "baseline_settings", "baseline_trials"),
    "table": ("comparison_table",),
}
_MODULE_OF = {name: module for module, names in _HOMES.items() for name in names}
__all__ = sorted(_MODULE_OF)


def __getattr__(name: str) -> Any:
    """`srlib.baselines.<name>`: imported from its module on first use (PEP 562)."""
    if name not in _MODULE_OF:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_MODULE_OF[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # what type checkers and editors see: the same names, imported eagerly
    from srlib.baselines.cache import (
        CACHE_VERSION,
        PairScores,
        baseline_key,
        cached_fit_baseline,
        cached_score_pairs,
        pairs_digest,
        scores_path,
    )
    from srlib.baselines.cost import CostMeter, TrainingCost, costed_fit, extraction_cost, measure_cost
    from srlib.baselines.models import (
        JUDGE_TEMPLATE,
        VERDICT_TOKENS,
        GeneralizableRM,
        GenerativeJudge,
        LogProbPreference,
        StandardRM,
        chosen_response_logprob,
        fit_baseline,
        trainable_parameters,
        verdict_preference,
    )
    from srlib.baselines.registry import (
        COMPARISON_METHODS,
        METHOD_LABELS,
        METHODS,
        REGISTRY,
        TRAINED_METHODS,
        Method,
        get_method,
    )
    from srlib.baselines.settings import GRMSettings, JudgeSettings, LogProbSettings, LoraSettings, build_settings
    from srlib.baselines.table import comparison_table
    from srlib.baselines.trials import TRIAL_COLUMNS, baseline_settings, baseline_trials
