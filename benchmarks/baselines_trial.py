"""Fit one baseline reward model on a built-in data set and report what it costs and scores.

    python benchmarks/baselines_trial.py --method standard --dataset truthfulqa --max-train 931

Prints one JSON object: test pair accuracy (with its binomial standard error), trainable
parameters and their share of the backbone, training wall time, peak RSS while training
(psutil, see `srlib.baselines`), scoring pairs per second, and the settings used. Needs
SRLIB_DATA_DIR (or the dataset hub) and, for the cpu profile, SmolLM2-135M-Instruct.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch

from srlib.backbone import load_backbone
from srlib.baselines import METHODS, fit_baseline, get_method
from srlib.data import load_pairs
from srlib.errors import SrlibError
from srlib.evaluate import binomial_se
from srlib.profiles import get_profile
from srlib.reward import pair_accuracy

DATASETS = ("truthfulqa", "hh-harmless", "pku-saferlhf")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", choices=METHODS, required=True)
    parser.add_argument("--dataset", choices=DATASETS, default="truthfulqa")
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--max-train", type=int, default=None, help="first N training pairs (default all)")
    parser.add_argument("--max-test", type=int, default=None, help="first N test pairs (default all)")
    parser.add_argument("--use-val", action="store_true", help="keep the epoch of lowest validation loss")
    parser.add_argument("--seed", type=int, default=0, help="training seed (the data split is seed 0)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--epochs", type=float, default=1.0)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=None, help="default: the profile's (judge: 2x)")
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        result = run(args)
    except SrlibError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return 0


def run(args: argparse.Namespace) -> dict:
    profile = get_profile(args.profile)
    backbone = load_backbone(profile.model_id)
    train = load_pairs(f"{args.dataset}:train", max_pairs=args.max_train)
    val = load_pairs(f"{args.dataset}:val") if args.use_val else None
    test = load_pairs(f"{args.dataset}:test", max_pairs=args.max_test)
    method = get_method(args.method)
    max_length = args.max_length or (2 * profile.max_length if method.two_answers else profile.max_length)
    settings = {"max_length": max_length}
    if method.trained:
        settings.update(epochs=args.epochs, learning_rate=args.lr, batch_size=args.batch_size)
    rm = fit_baseline(args.method, backbone, train, val, seed=args.seed, **settings)
    start = time.perf_counter()
    s_w, s_l = rm.score_pairs(test, progress=True)
    scoring_seconds = time.perf_counter() - start
    accuracy = pair_accuracy(s_w, s_l)
    backbone_parameters = sum(p.numel() for p in backbone.model.parameters())
    trainable = rm.num_trainable_parameters()
    return {
        "method": args.method,
        "dataset": args.dataset,
        "backbone": backbone.model_id,
        "identity": backbone.identity,
        "seed": args.seed,
        "threads": args.threads,
        "n_train": len(train) if method.trained else 0,
        "n_val": len(val) if val else 0,
        "n_test": len(test),
        "accuracy": round(accuracy, 4),
        "accuracy_se": round(binomial_se(accuracy, len(test)), 4),
        "trainable_parameters": trainable,
        "trainable_share_of_backbone": trainable / backbone_parameters,
        "train_seconds": rm.cost.seconds,
        "peak_rss_mb": rm.cost.peak_rss_mb,
        "rss_increase_mb": rm.cost.rss_increase_mb,
        "memory_method": rm.cost.memory_method,
        "scoring_seconds": round(scoring_seconds, 1),
        "scoring_pairs_per_second": round(len(test) / scoring_seconds, 2),
        "settings": rm.config()["settings"],
    }


if __name__ == "__main__":
    sys.exit(main())
