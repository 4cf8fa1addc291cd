"""RewardBench-style evaluation: accuracy per subset and per section, scored the way RewardBench
(Lambert et al., 2024; github.com/allenai/reward-bench) scores a reward model.

A RewardBench file has one record per pair: `prompt`, `chosen`, `rejected` (strings) and
`subset` (e.g. "alpacaeval-easy"), usually also `id`; the real data set is the hub's
`allenai/reward-bench`, split "filtered" (2,985 pairs). The rules below follow RewardBench's
own code (`rewardbench/rewardbench.py`, `rewardbench/utils.py`, `rewardbench/constants.py`):

- A pair is won when the reward of `chosen` is strictly greater than that of `rejected`
  (`1 if chosen > rejected else 0`): **a tie counts as a loss**. (The book's paired
  comparisons count a tie as half a pair, `srlib.evaluate.pair_outcomes`; RewardBench does
  not, so neither does this module.) The number of ties is reported beside each subset.
- A subset's score is its accuracy over its pairs.
- A section (Chat, Chat Hard, Safety, Reasoning) is the mean of its subsets' accuracies
  weighted by RewardBench's fixed example counts (`EXAMPLE_COUNTS`), not by the pairs present
  in the file; in Reasoning, the prompt-math subset "math-prm" (447 pairs) is weighted 984, as
  much as the six HumanEvalPack code subsets (6 × 164) together.
- A section none of whose subsets is in the file is left out (RewardBench reports 0 for it).
  Subsets outside the map are reported per subset and belong to no section.

The prompts are formatted with the backbone's chat template like every pair in srlib
(`srlib.backbone.format_text`), as RewardBench does for models with a chat template.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from srlib.data import HUB_PREFIX, PreferencePair, Records, pairs_from_records, read_records
from srlib.errors import DataError

#: The hub data set and split `python -m srlib eval --rewardbench` reads by default.
REWARDBENCH_HUB_ID = "allenai/reward-bench"
REWARDBENCH_SPLIT = "filtered"

#: RewardBench's subset -> section map (rewardbench/constants.py, SUBSET_MAPPING).
SUBSET_MAPPING: dict[str, tuple[str, ...]] = {
    "Chat": ("alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"),
    "Chat Hard": (
        "mt-bench-hard",
        "llmbar-natural",
        "llmbar-adver-neighbor",
        "llmbar-adver-GPTInst",
        "llmbar-adver-GPTOut",
        "llmbar-adver-manual",
    ),
    "Safety": (
        "refusals-dangerous",
        "refusals-offensive",
        "xstest-should-refuse",
        "xstest-should-respond",
        "donotanswer",
    ),
    "Reasoning": ("math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"),
}
SECTIONS = tuple(SUBSET_MAPPING)

#: RewardBench's section weights per subset (rewardbench/constants.py, EXAMPLE_COUNTS): the
#: filtered split's pair counts, except math-prm, upweighted from 447 to equal the code subsets.
EXAMPLE_COUNTS: dict[str, int] = {
    "alpacaeval-easy": 100,
    "alpacaeval-length": 95,
    "alpacaeval-hard": 95,
    "mt-bench-easy": 28,
    "mt-bench-med": 40,
    "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100,
    "refusals-offensive": 100,
    "llmbar-natural": 100,
    "llmbar-adver-neighbor": 134,
    "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47,
    "llmbar-adver-manual": 46,
    "xstest-should-refuse": 154,
    "xstest-should-respond": 250,
    "donotanswer": 136,
    "hep-cpp": 164,
    "hep-go": 164,
    "hep-java": 164,
    "hep-js": 164,
    "hep-python": 164,
    "hep-rust": 164,
}


@dataclass(frozen=True)
class SubsetScore:
    """One subset: its pairs, how many the reward model won (chosen strictly higher), its ties."""

    n: int
    wins: int
    ties: int

    @property
    def accuracy(self) -> float:
        return self.wins / self.n


@dataclass(frozen=True)
class RewardBenchResult:
    """Per-subset scores and RewardBench's section scores (see the module docstring)."""

    subsets: dict[str, SubsetScore]
    sections: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready summary: n, sections, and per subset n / accuracy / ties."""
        return {
            "n": sum(s.n for s in self.subsets.values()),
            "tie_rule": "a tie is a loss",
            "sections": self.sections,
            "subsets": {name: {"n": s.n, "accuracy": s.accuracy, "ties": s.ties} for name, s in self.subsets.items()},
        }

    def table(self) -> str:
        """A text table: each section's score, then its subsets; other subsets last."""
        rows = []
        for section in SECTIONS:
            if section in self.sections:
                rows.append((section, "", f"{self.sections[section]:.3f}", ""))
                rows += [
                    (
                        f"  {name}",
                        str(self.subsets[name].n),
                        f"{self.subsets[name].accuracy:.3f}",
                        str(self.subsets[name].ties),
                    )
                    for name in SUBSET_MAPPING[section]
                    if name in self.subsets
                ]
        others = [name for name in self.subsets if section_of(name) is None]
        if others:
            rows.append(("(no section)", "", "", ""))
            rows += [
                (
                    f"  {name}",
                    str(self.subsets[name].n),
                    f"{self.subsets[name].accuracy:.3f}",
                    str(self.subsets[name].ties),
                )
                for name in others
            ]
        header = ("section / subset", "pairs", "accuracy", "ties")
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(4)]
        lines = [
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
            ).rstrip()
            for row in (header, *rows)
        ]
        return "\n".join(lines)


def section_of(subset: str) -> str | None:
    """The RewardBench section of `subset`, or None for a subset outside the map."""
    return next((section for section, names in SUBSET_MAPPING.items() if subset in names), None)


def section_scores(accuracies: Mapping[str, float]) -> dict[str, float]:
    """RewardBench's `calculate_scores_per_section`: per section, the mean of the accuracies of
    its subsets present in `accuracies`, weighted by `EXAMPLE_COUNTS`; sections with none of
    their subsets present are left out."""
    scores = {}
    for section, names in SUBSET_MAPPING.items():
        present = [name for name in names if name in accuracies]
        if present:
            total = sum(EXAMPLE_COUNTS[name] for name in present)
            scores[section] = sum(accuracies[name] * EXAMPLE_COUNTS[name] for name in present) / total
    return scores


def score_subsets(subsets: Sequence[str], chosen: Sequence[float], rejected: Sequence[float]) -> RewardBenchResult:
    """The result for pairs of the given subsets with rewards `chosen` and `rejected`:
    a pair is won only when chosen > rejected (a tie is a loss, as in RewardBench)."""
    if not (len(subsets) == len(chosen) == len(rejected)) or not subsets:
        raise DataError(
            f"need one subset and two rewards per pair, got {len(subsets)} subsets, "
            f"{len(chosen)} and {len(rejected)} rewards"
        )
    counts: dict[str, list[int]] = {}
    for name, a, b in zip(subsets, chosen, rejected, strict=True):
        n_wins_ties = counts.setdefault(name, [0, 0, 0])
        n_wins_ties[0] += 1
        n_wins_ties[1] += int(a > b)
        n_wins_ties[2] += int(a == b)
    scores = {name: SubsetScore(*values) for name, values in sorted(counts.items())}
    return RewardBenchResult(scores, section_scores({name: s.accuracy for name, s in scores.items()}))


def rewardbench_spec(spec: str | os.PathLike) -> str | os.PathLike:
    """The source `read_records` reads for FILE_OR_ID: a file as given, "hub:..." as given, and a
    bare hub id (default `allenai/reward-bench`) as its "filtered" split."""
    text = os.fspath(spec)
    if text.startswith(HUB_PREFIX) or os.path.exists(text) or text.endswith((".jsonl", ".jsonl.gz", ".parquet")):
        return spec
    return f"{HUB_PREFIX}{text}:{REWARDBENCH_SPLIT}"


def load_rewardbench(spec: str | os.PathLike = REWARDBENCH_HUB_ID) -> tuple[list[PreferencePair], list[str]]:
    """(pairs, their subsets) of a RewardBench-format file or hub data set (`rewardbench_spec`).

    Each record needs a string `subset`; an `id` becomes the pair_id. Bad records are one-line
    errors naming the file and line (a hub split's are dropped with a warning, as in
    `srlib.data.pairs_from_records`).
    """
    records = read_records(rewardbench_spec(spec))
    rows: list[tuple[str, str, dict[str, Any]]] = []
    for where, default_id, obj in records.rows:
        subset = obj.get("subset")
        if not isinstance(subset, str) or not subset.strip():
            raise DataError(
                f"{where}: field 'subset' must be a non-empty string (RewardBench's format: "
                "prompt, chosen, rejected, subset)"
            )
        record: dict[str, Any] = {key: obj[key] for key in ("prompt", "chosen", "rejected") if key in obj}
        record["source"] = subset
        if obj.get("id") is not None:
            record["pair_id"] = str(obj["id"])
        rows.append((where, default_id, record))
    pairs = pairs_from_records(Records(rows, records.strict, records.name))
    return pairs, [pair.source for pair in pairs]


def evaluate_rewardbench(
    model, spec: str | os.PathLike = REWARDBENCH_HUB_ID, *, progress: bool = True
) -> RewardBenchResult:
    """Score every pair of a RewardBench source with `model` (any srlib reward model: its
    `score_pairs`) and return the per-subset and per-section result."""
    pairs, subsets = load_rewardbench(spec)
    s_w, s_l = model.score_pairs(pairs, progress=progress)
    return score_subsets(subsets, s_w.tolist(), s_l.tolist())
