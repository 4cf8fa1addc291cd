"""Chapter 3's validation study on one data set, from the command line.

    python benchmarks/validation_study.py --profile cpu --dataset truthfulqa [--layers 15]
                                          [--ks 32 64 128 256] [--seeds 0 1 2] [--out result.json]

Runs `srlib.experiments.validation_study`: read position × standardised/raw head inputs at the
profile's layer and K, then the layer × K grid at the reading chosen, every choice made on the
VALIDATION split by `SELECTION_RULE`; the test split is scored once, for the selection. With
`--layers` left at the profile's layer no other SAE is trained, which makes this the cheap way
to rerun the first stage. Prints both stages' validation tables, the selection with its
validation and test columns, and whether each profile default equals the selection; the last
line is the JSON summary. Needs `SRLIB_DATA_DIR` (or the dataset hub).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from srlib.backbone import backbone_for_profile
from srlib.experiments import SELECTION_RULE, summarize, validation_study
from srlib.profiles import get_profile
from srlib.sae import sae_for_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--dataset", default="truthfulqa")
    parser.add_argument("--layers", type=int, nargs="+", default=None, help="default: the profile's layer")
    parser.add_argument("--ks", type=int, nargs="+", default=None, help="default: the profile's K")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: the profile's seeds")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON summary here")
    args = parser.parse_args()

    profile = get_profile(args.profile)
    started = time.perf_counter()
    backbone = backbone_for_profile(profile)
    sae = sae_for_profile(profile, backbone)
    study = validation_study(
        backbone,
        profile,
        sae,
        dataset=args.dataset,
        layers=args.layers or [profile.layer],
        ks=args.ks or [profile.k],
        seeds=args.seeds or list(profile.seeds),
    )
    seconds = time.perf_counter() - started
    print(f"selection rule: {SELECTION_RULE}")
    for name, trials, by in (
        ("read position x inputs", study.reading, ("position", "standardize")),
        ("layer x K", study.grid, ("layer", "k")),
    ):
        print(f"\n{name} (validation accuracy, mean ± sd over seeds):")
        print(summarize(trials, by, value="val_accuracy").to_string(index=False))
    print("\nselected, scored once on test:")
    print(study.both_columns().to_string(index=False))
    result = {
        "profile": profile.name,
        "dataset": args.dataset,
        "selected": study.selected,
        "defaults_match": study.defaults_match(profile),
        "validation": study.both_columns().iloc[0]["validation accuracy (%)"],
        "test": study.both_columns().iloc[0]["test accuracy (%)"],
        "seconds": round(seconds, 1),
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=2, default=str))
    print(json.dumps(result, default=str))


if __name__ == "__main__":
    main()
