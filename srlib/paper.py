"""The numbers the paper reports (Liu et al., AAAI 2026), as data, for "the paper's" columns.

The book shows these beside its own results and always labels them as the paper's: they are
for Gemma-2-9B-it (Tables 2-4) and Gemma-2-2B-it / Gemma-2-9B-it (Table 1) with Gemma Scope
SAEs, not for the backbone a chapter ran. Copied from `shared/paper/sparserm-aaai2026.txt`.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Column order of the paper's data sets, with srlib's data set names.
PAPER_DATASETS = {"pku-saferlhf": "SafeRLHF", "hh-harmless": "Red-Teaming", "truthfulqa": "TruthfulQA"}

#: Table 2: RM accuracy (%) by reward-head input (Gemma-2-9B-it, layer 31, K=128).
TABLE2_INPUTS = {
    "SAE latents": {"pku-saferlhf": 92.4, "hh-harmless": 88.4, "truthfulqa": 91.4},
    "Random directions": {"pku-saferlhf": 93.0, "hh-harmless": 88.0, "truthfulqa": 90.7},
    "Top-K directions": {"pku-saferlhf": 94.4, "hh-harmless": 90.2, "truthfulqa": 93.6},
}

#: Table 3: RM accuracy (%) by loss (Gemma-2-9B-it).
TABLE3_LOSSES = {
    "BT": {"pku-saferlhf": 94.0, "hh-harmless": 88.7, "truthfulqa": 91.4},
    "BCE": {"pku-saferlhf": 85.7, "hh-harmless": 83.1, "truthfulqa": 86.3},
    "Margin": {"pku-saferlhf": 94.4, "hh-harmless": 90.2, "truthfulqa": 93.6},
}

#: Table 4: RM accuracy and alignment (%) of DenseRM vs SparseRM (Gemma-2-9B-it).
TABLE4_DENSE_VS_SPARSE = {
    "DenseRM": {
        "accuracy": {"pku-saferlhf": 94.7, "hh-harmless": 90.3, "truthfulqa": 93.6},
        "alignment": {"pku-saferlhf": 78.7, "hh-harmless": 59.5, "truthfulqa": 64.9},
    },
    "SparseRM": {
        "accuracy": {"pku-saferlhf": 94.4, "hh-harmless": 90.2, "truthfulqa": 93.6},
        "alignment": {"pku-saferlhf": 79.9, "hh-harmless": 60.4, "truthfulqa": 65.2},
    },
}

#: Table 1: alignment performance after iterative DPO (SafeRLHF and Red-Teaming: pairwise
#: log-prob accuracy; TruthfulQA: MC1 and MC2), by backbone and reward model.
TABLE1_ALIGNMENT = {
    "Gemma-2-2B-it": {
        "WO RM": (73.4, 61.8, 56.1, 69.8),
        "StandardRM": (77.9, 65.2, 56.7, 70.5),
        "GeneralizableRM": (79.4, 67.8, 59.3, 73.2),
        "GRAM": (79.0, 65.8, 60.0, 73.9),
        "JudgeLM": (75.0, 66.0, 58.6, 72.0),
        "SparseRM": (79.5, 67.0, 59.3, 73.1),
    },
    "Gemma-2-9B-it": {
        "WO RM": (78.1, 58.9, 62.0, 77.0),
        "StandardRM": (78.7, 59.3, 62.5, 77.7),
        "GeneralizableRM": (78.9, 61.2, 64.2, 78.2),
        "GRAM": (79.3, 60.7, 64.7, 77.9),
        "JudgeLM": (78.8, 60.1, 63.7, 77.4),
        "SparseRM": (79.9, 60.4, 65.2, 78.5),
    },
}
TABLE1_COLUMNS = ("SafeRLHF", "Red-Teaming", "TQA MC1", "TQA MC2")


@dataclass(frozen=True)
class Track:
    """One column group of Table 1: what the policy is asked and how it is scored (§4).

    `kind` picks the generation instructions and the metric: "truthfulness" (TruthfulQA
    MC1/MC2, prompts from ARC-Challenge) or "safety" (pairwise log-prob accuracy on `dataset`'s
    test pairs, prompts from its generation split). `dataset` is srlib's name of the data the
    reward models are trained on; `paper_columns` are the track's columns in `TABLE1_COLUMNS`.
    """

    kind: str
    dataset: str
    paper_columns: tuple[str, ...]

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metrics a policy is scored with on this track (srlib.evaluate's keys)."""
        return ("mc1", "mc2") if self.kind == "truthfulness" else ("accuracy",)


#: The three tracks of Table 1, by the name the CLI (`align --track`) and chapter 7 use; here,
#: not in srlib.alignment, so that the command line can list them without importing torch.
TABLE1_TRACKS: dict[str, Track] = {
    "truthfulqa": Track("truthfulness", "truthfulqa", ("TQA MC1", "TQA MC2")),
    "saferlhf": Track("safety", "pku-saferlhf", ("SafeRLHF",)),
    "red-teaming": Track("safety", "hh-harmless", ("Red-Teaming",)),
}

#: Figure 4's chosen settings: the layer per backbone and K.
FIGURE4_CHOICE = {"Gemma-2-2B-it": {"layer": 13, "k": 128}, "Gemma-2-9B-it": {"layer": 31, "k": 128}}


def paper_table(table: dict[str, dict[str, float]]):
    """A paper table as a DataFrame: one row per method, columns in the paper's order."""
    import pandas as pd

    frame = pd.DataFrame(table).T[list(PAPER_DATASETS)]
    return frame.rename(columns=PAPER_DATASETS)
