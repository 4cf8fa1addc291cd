"""Time each stage of the alignment loop on a real backbone and report what DPO moved.

    python benchmarks/alignment_trial.py --track red-teaming --n-prompts 48 --rounds 1 --rms wo,dense \
        --out /tmp/align-trial/a

Runs `srlib.alignment.run_alignment` with the cpu profile's config and the changes given on the
command line, with "WO RM" and/or a DenseRM fitted here on the track's training pairs (cached in
`--out`), then prints one JSON object: per-stage seconds, kept tuples, DPO's training margins,
validation metrics per round and test metrics (with standard errors) for the base policy and
each reward model's best round. `--reuse DIR` copies the base evaluation and the round-1 tuples
of an earlier trial whose generation and evaluation settings were the same, so a sweep over DPO
settings pays for generation once. Needs SRLIB_DATA_DIR (or the dataset hub).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

from srlib.alignment import AlignmentConfig, run_alignment
from srlib.errors import SrlibError

# Settings that change what is generated or how it is evaluated: a reused trial must match them.
_SHARED_FIELDS = (
    "track",
    "model_id",
    "n_prompts",
    "n_shots",
    "shot_max_chars",
    "max_new_tokens",
    "temperature",
    "top_p",
    "generation_batch_size",
    "max_length",
    "max_val",
    "max_test",
    "eval_batch_size",
    "seed",
    "split_seed",
)


def _dense_rm(config: AlignmentConfig, layer: int, out: Path, progress: bool):
    """A DenseRM on the track's training pairs (val for early stopping), saved under `out`."""
    from srlib.backbone import load_backbone
    from srlib.data import load_pairs
    from srlib.reward import DenseRM, RewardModel, SparseRMConfig

    backbone = load_backbone(config.model_id, progress=progress)
    path = out / f"dense-rm-{config.data_name}-L{layer}"
    if (path / "config.json").exists():
        return RewardModel.from_pretrained(path, backbone=backbone), 0.0
    start = time.perf_counter()
    rm = DenseRM.fit(
        backbone,
        load_pairs(f"{config.data_name}:train"),
        load_pairs(f"{config.data_name}:val"),
        config=SparseRMConfig(features="dense", k=None, layer=layer),
        progress=progress,
    )
    rm.save_pretrained(path)
    return rm, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--track", required=True, help="truthfulqa, saferlhf or red-teaming")
    parser.add_argument("--n-prompts", type=int)
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--max-new-tokens", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-val", type=int)
    parser.add_argument("--max-test", type=int)
    parser.add_argument("--seed", type=int)
    parser.add_argument("--rms", default="wo,dense", help="comma list of: wo, dense")
    parser.add_argument("--layer", type=int, default=15, help="DenseRM layer")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reuse", default=None, help="an earlier trial's --out with the same generation")
    parser.add_argument("--out", required=True)
    parser.add_argument("--progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    changes = {
        key: value
        for key, value in {
            "track": args.track,
            "n_prompts": args.n_prompts,
            "rounds": args.rounds,
            "max_new_tokens": args.max_new_tokens,
            "learning_rate": args.lr,
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "max_val": args.max_val,
            "max_test": args.max_test,
            "seed": args.seed,
        }.items()
        if value is not None
    }
    try:
        config = AlignmentConfig.for_profile(args.profile, **changes)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        if args.reuse:
            _reuse(Path(args.reuse), out, config)
        rms, rm_seconds = {}, {}
        for name in args.rms.split(","):
            if name == "wo":
                rms["WO RM"] = None
            elif name == "dense":
                rms["DenseRM"], rm_seconds["DenseRM"] = _dense_rm(config, args.layer, out.parent, args.progress)
            else:
                raise SrlibError(f"unknown reward model {name!r}; use wo, dense")
        start = time.perf_counter()
        result = run_alignment(config, rms, out_dir=out / "run", progress=args.progress)
        total = time.perf_counter() - start
    except SrlibError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    report = {
        "config": config.to_dict(),
        "threads": args.threads,
        "run_seconds": total,
        "rm_fit_seconds": rm_seconds,
        "base_val": result.base_val,
        "base_test": result.base_test,
        "round1_filter": result.round1_filter,
        "runs": {
            name: {
                "best_round": run.best_round,
                "kept": run.kept,
                "test": run.test,
                "rounds": [
                    {
                        "round": r.round,
                        "val": r.val,
                        "seconds": r.seconds,
                        "train_epochs": (r.train or {}).get("epochs"),
                    }
                    for r in run.rounds
                ],
            }
            for name, run in result.runs.items()
        },
    }
    text = json.dumps(report, indent=1)
    print(text)
    (out / "report.json").write_text(text + "\n")
    return 0


def _reuse(source: Path, out: Path, config: AlignmentConfig) -> None:
    """Copy base_eval.json and round1_tuples.jsonl from an earlier trial with the same generation."""
    old = AlignmentConfig.from_dict(json.loads((source / "run" / "config.json").read_text()))
    differ = [f for f in _SHARED_FIELDS if getattr(old, f) != getattr(config, f)]
    if differ:
        raise SrlibError(f"--reuse {source}: generation/evaluation settings differ: {', '.join(differ)}")
    (out / "run").mkdir(parents=True, exist_ok=True)
    for name in ("base_eval.json", "round1_tuples.jsonl", "round1_generation.json"):
        if (source / "run" / name).exists() and not (out / "run" / name).exists():
            shutil.copy(source / "run" / name, out / "run" / name)


if __name__ == "__main__":
    raise SystemExit(main())
