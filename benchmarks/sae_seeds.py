"""How much chapter 3's SparseRM accuracy moves when only the SAE's training seed changes.

    SRLIB_DATA_DIR=... python benchmarks/sae_seeds.py --profile cpu [--seeds 0 1] [--autocast none]
                                                        [--threads N]

The book's intervals are over head seeds (and test pairs): they hold the SAE fixed. Retraining
the SAE with another seed (same corpus, same settings) gives other latents, another top-K
selection and other accuracies; this prints chapter 3's SparseRM row (test accuracy, mean ± sd
over the profile's head seeds) and the validation accuracy for the profile's SAE trained with
each of `--seeds`, so a change to how SAEs are trained (a precision, a budget) can be judged
against the spread that a seed alone makes. Trains every SAE not yet cached (about ten minutes
each on two cores at the cpu profile's size).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from srlib.backbone import AUTOCAST_DTYPES, backbone_for_profile
from srlib.experiments import dataset_states, run_trials, select_for, summarize
from srlib.profiles import DEFAULT_PROFILE, get_profile
from srlib.sae import sae_for_profile


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="SAE training seeds")
    parser.add_argument("--autocast", default=None, choices=["none", *AUTOCAST_DTYPES], help="default: the profile's")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    base = get_profile(args.profile)
    if args.autocast is not None:
        base = base.replace(autocast=None if args.autocast == "none" else args.autocast)
    if base.sae_training is None:
        parser.error(f"profile {base.name!r} trains no SAE of its own (sae_source={base.sae_source!r})")
    backbone = backbone_for_profile(base, progress=False)
    print(
        f"{base.name}: layer {base.layer}, K = {base.k}, autocast {base.autocast}, "
        f"head seeds {list(base.seeds)}; SparseRM accuracy (%) per SAE seed"
    )
    print(f"{'SAE seed':<10}{'data set':<16}{'test (mean ± sd)':>18}{'validation':>14}")
    states_of = {dataset: dataset_states(backbone, dataset, base, progress=False) for dataset in base.datasets}
    for seed in args.seeds:
        profile = base.replace(sae_training=dataclasses.replace(base.sae_training, seed=seed))
        sae = sae_for_profile(profile, backbone, progress=False)
        for dataset, states in states_of.items():
            variant = dict(features="projection", directions=select_for(states, sae, profile.k), head=profile.head)
            trials = run_trials(states, {"SparseRM": variant}, profile.seeds, progress=False)
            test = summarize(trials, value="test_accuracy")["label"].iloc[0]
            val = summarize(trials, value="val_accuracy")["label"].iloc[0]
            print(f"{seed:<10}{dataset:<16}{test:>18}{val:>14}")


if __name__ == "__main__":
    main()
