"""The command line: `python -m srlib fit | score | filter | eval | explain | steer | sae | align | cache`.

The names and flags here are a contract (the book, the README and users' scripts call them).
PAIRS is a JSONL or parquet file of records in one of TRL's preference formats (standard,
conversational, implicit prompt), `hub:<dataset id>[:<split>]`, or a built-in name such as
`truthfulqa:train` (see `srlib.data.load_pairs`). A mistake in the input (a bad file, a layer
out of range, K larger than the SAE, a folder that is not a saved reward model) ends the
command with exit code 2 and one line that names the problem, never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from srlib.baselines.registry import METHODS as BASELINE_METHODS
from srlib.errors import SrlibError
from srlib.paper import TABLE1_TRACKS
from srlib.profiles import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from srlib.reward_config import LOSS_NAMES

if TYPE_CHECKING:
    from srlib.reward import RewardModel

FEATURES = ("projection", "latents", "random", "dense")
METHODS = ("sparserm",) + BASELINE_METHODS


def _profile_from_args(args: argparse.Namespace) -> Profile:
    """The profile named by --profile, with --model / --layer / --sae / --k overriding it."""
    profile = get_profile(args.profile)
    changes = {}
    if getattr(args, "model", None):
        changes["model_id"] = args.model
    if getattr(args, "sae", None):
        changes["sae_source"] = args.sae
        if getattr(args, "layer", None) is not None:
            changes["layer"] = args.layer
    else:  # the profile's own SAE follows the layer (Gemma Scope: its layer_<L> folder)
        profile = profile.at_layer(getattr(args, "layer", None))
    if getattr(args, "k", None) is not None:
        changes["k"] = args.k
    return profile.replace(**changes) if changes else profile


def _load_pairs(spec: str, args: argparse.Namespace, profile: Profile | None = None):
    """Pairs for `spec`, capped by --max-pairs (or the profile's cap for built-in sets)."""
    from srlib.data import load_pairs

    cap = getattr(args, "max_pairs", None)
    if cap is None and profile is not None and ":" in spec and not Path(spec).exists():
        cap = profile.max_pairs
    return load_pairs(spec, seed=getattr(args, "split_seed", 0), max_pairs=cap)


def finite_float(text: str) -> float:
    """argparse type: a float that is not inf or nan (Python's float() accepts both)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def _print_result(result: dict) -> None:
    """The machine-readable summary: one JSON object on the last line of stdout."""
    print(json.dumps(result, sort_keys=True))


def cmd_fit(args: argparse.Namespace) -> int:
    """Train a reward model on PAIRS and save it under --out."""
    from srlib.backbone import backbone_for_profile
    from srlib.paths import check_output
    from srlib.reward import FeatureRM, is_saved_reward_model

    check_output(args.out, is_dir=True, overwrite=args.overwrite, is_ours=is_saved_reward_model)
    profile = _profile_from_args(args)
    head = dataclasses.replace(profile.head, loss=args.loss, gamma=args.gamma, seed=args.seed)  # a bad value fails here
    config = profile.sparserm_config(args.features, head=head)  # what a sparserm fit builds
    train = _load_pairs(args.train, args, profile)
    val = _load_pairs(args.val, args, profile) if args.val else None
    backbone = backbone_for_profile(profile)
    started = time.perf_counter()
    if args.method != "sparserm":
        from srlib.baselines import fit_baseline

        model: RewardModel = fit_baseline(args.method, backbone, train, val, seed=args.seed)
    elif config.features == "dense":
        from srlib.reward import DenseRM

        model = DenseRM.fit(backbone, train, val, config=config, batch_size=profile.batch_size)
    else:
        from srlib.reward import SparseRM
        from srlib.sae import sae_for_profile

        sae = sae_for_profile(profile, backbone)
        model = SparseRM.fit(backbone, train, val, config=config, sae=sae, batch_size=profile.batch_size)
    # the model card names the training data (a local file by its name only, never its path)
    card = {"training_data": Path(args.train).name if Path(args.train).exists() else args.train}
    model.save_pretrained(
        args.out, overwrite=args.overwrite, **({"model_card_kwargs": card} if args.method == "sparserm" else {})
    )
    result = {
        "out": str(args.out),
        "method": args.method,
        "n_train": len(train),
        "n_val": len(val) if val else 0,
        "trainable_parameters": model.num_trainable_parameters(),
        "fit_seconds": round(time.perf_counter() - started, 2),
    }
    if isinstance(model, FeatureRM):  # the sparserm method: SparseRM or DenseRM
        result.update(
            features=args.features,
            loss=args.loss,
            layer=profile.layer,
            best_val_accuracy=model.require_fitted().history.best_val_accuracy,
        )
    _print_result(result)
    return 0


def _load_rm(path: str):
    from srlib.reward import RewardModel

    return RewardModel.from_pretrained(path)


def cmd_score(args: argparse.Namespace) -> int:
    """Score PAIRS with a saved reward model; print n and pair accuracy."""
    from srlib.paths import atomic_path, check_output
    from srlib.reward import pair_accuracy

    if args.out:
        check_output(args.out, overwrite=args.overwrite)
    model = _load_rm(args.rm)
    pairs = _load_pairs(args.pairs, args)
    s_w, s_l = model.score_pairs(pairs, progress=True)  # a bar on stderr: long inputs take a while
    if args.out:
        with atomic_path(args.out, overwrite=args.overwrite) as tmp, open(tmp, "w") as handle:
            for pair, a, b in zip(pairs, s_w.tolist(), s_l.tolist(), strict=True):
                handle.write(json.dumps({"pair_id": pair.pair_id, "score_chosen": a, "score_rejected": b}) + "\n")
    _print_result({"n": len(pairs), "accuracy": pair_accuracy(s_w, s_l), "pairs": args.pairs, "rm": str(args.rm)})
    return 0


def cmd_filter(args: argparse.Namespace) -> int:
    """Keep the pairs the reward model agrees with (s_chosen > s_rejected) and write them."""
    from srlib.alignment import filter_tuples
    from srlib.data import write_jsonl
    from srlib.paths import check_output

    check_output(args.out, overwrite=args.overwrite)
    model = _load_rm(args.rm)
    pairs = _load_pairs(args.pairs, args)
    verdict = filter_tuples(pairs, model, progress=True)
    kept = [pair for pair, keep in zip(pairs, verdict.keep, strict=True) if keep]
    write_jsonl(kept, args.out, overwrite=args.overwrite)
    _print_result({"n": len(pairs), "kept": len(kept), "out": str(args.out)})
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    """Attribute each pair's chosen and rejected scores to the SparseRM's selected directions:
    one JSON record per pair (to --out, or to stdout), baseline + contributions + rest = score."""
    from srlib.explain import explain_records, require_sae_inputs
    from srlib.paths import atomic_path, check_output

    if args.out:
        check_output(args.out, overwrite=args.overwrite)
    if args.top < 0:
        raise SrlibError(f"--top must be >= 0, got {args.top}")
    model = require_sae_inputs(_load_rm(args.rm))
    pairs = _load_pairs(args.pairs, args)
    records = explain_records(model, pairs, *model.read_pair_states(pairs), top=args.top)
    lines = [json.dumps(record) + "\n" for record in records]
    if not args.out:
        sys.stdout.writelines(lines)
        return 0
    with atomic_path(args.out, overwrite=args.overwrite) as tmp, open(tmp, "w") as handle:
        handle.writelines(lines)
    _print_result({"n": len(records), "out": str(args.out), "rm": str(args.rm), "top": args.top})
    return 0


def cmd_steer(args: argparse.Namespace) -> int:
    """Scale or mask selected directions of a SparseRM; save the steered model (--out) and, with
    --pairs, print the pair accuracy before and after (ties count 1/2) and the pairs that flipped."""
    from srlib.explain import parse_scales, steer, steering_effect
    from srlib.paths import check_output
    from srlib.reward import is_saved_reward_model

    scales = parse_scales(args.scale)
    if args.out:
        check_output(args.out, is_dir=True, overwrite=args.overwrite, is_ours=is_saved_reward_model)
    model = _load_rm(args.rm)
    steered = steer(model, scales)
    result: dict[str, Any] = {"rm": str(args.rm), "steering": {str(k): v for k, v in steered.steering.items()}}
    if args.pairs:
        pairs = _load_pairs(args.pairs, args)
        effect = steering_effect(model, steered, pairs, *model.read_pair_states(pairs))
        result.update(n=len(pairs), **effect.as_dict())
    if args.out:
        steered.save_pretrained(args.out, overwrite=args.overwrite)
        result["out"] = str(args.out)
    _print_result(result)
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a RewardBench-format file or hub data set: a table of accuracy per section and
    subset, then the JSON summary (RewardBench's weighting; a tie is a loss: srlib.rewardbench)."""
    from srlib.rewardbench import evaluate_rewardbench

    model = _load_rm(args.rm)
    result = evaluate_rewardbench(model, args.rewardbench)
    print(result.table())
    _print_result({"rm": str(args.rm), "rewardbench": str(args.rewardbench), **result.to_dict()})
    return 0


#: Pairs per source `sae report` measures by default (validation splits: enough for the alive share).
SAE_REPORT_PAIRS = 200


def cmd_sae(args: argparse.Namespace) -> int:
    """`sae train` trains (or loads from the cache) the profile's SAE; `sae report` also
    prints what its training recorded (quality on held-out corpus texts, the corpus, the
    timings) and, per set of pairs (default: each profile data set's validation split), the
    SAE's quality at the token the reward model reads beside the same over all their tokens:
    latents alive, FVE, L0 (`srlib.sae.sae_quality`)."""
    from srlib.backbone import backbone_for_profile, format_pair
    from srlib.errors import ConfigError
    from srlib.sae import sae_for_profile, sae_info, sae_quality

    if args.action == "train" and args.pairs:
        raise ConfigError("--pairs is for `sae report`; `sae train` trains on the profile's corpus")
    profile = _profile_from_args(args)
    pairs = {}
    if args.action == "report":  # a bad source fails here, before any model loads
        args.max_pairs = SAE_REPORT_PAIRS if args.max_pairs is None else args.max_pairs
        pairs = {spec: _load_pairs(spec, args) for spec in args.pairs or [f"{n}:val" for n in profile.datasets]}
    backbone = backbone_for_profile(profile)
    sae = sae_for_profile(profile, backbone)
    result = {
        "profile": profile.name,
        "model": profile.model_id,
        "layer": profile.layer,
        "sae_source": profile.sae_source,
        "d_sae": int(sae.cfg.d_sae),
    }
    if args.action == "report":
        import pandas as pd

        result["report"] = sae_info(sae) or "no training record: a pretrained SAE"
        qualities = {
            spec: sae_quality(
                sae,
                backbone,
                [t for p in items for t in format_pair(backbone.tokenizer, p)],
                profile.layer,
                position=profile.position,
                max_length=profile.max_length,
                batch_size=profile.batch_size,
            )
            for spec, items in pairs.items()
        }
        table = pd.DataFrame({spec: q.as_row() for spec, q in qualities.items()}).T
        print(
            f"SAE quality per set of pairs (both answers of up to {args.max_pairs} pairs each): 'read' at the "
            f"token the reward model reads ({profile.position}), 'all' over all their tokens"
        )
        print(table.to_string(float_format=lambda x: f"{x:.3f}"))
        result["quality"] = {spec: q.as_dict() for spec, q in qualities.items()}
    _print_result(result)
    return 0


def cmd_align(args: argparse.Namespace) -> int:
    """Iterative DPO with RM-filtered self-generated pairs (chapter 07), from the command line."""
    from srlib.alignment import AlignmentConfig, check_run_folder, run_alignment

    check_run_folder(args.out)
    changes = {
        "track": args.track,
        "seed": args.seed,
        "rounds": args.rounds,
        "n_prompts": args.prompts,
        "model_id": args.model,
    }
    config = AlignmentConfig.for_profile(args.profile, **{k: v for k, v in changes.items() if v is not None})
    reward_models = {"WO RM": None} if args.include_wo_rm else {}
    for path in args.rm:
        reward_models[Path(path).name] = _load_rm(path)
    if not reward_models:
        raise SrlibError("align needs at least one --rm DIR or --include-wo-rm")
    result = run_alignment(config, reward_models, out_dir=args.out)
    _print_result({"out": str(args.out), "track": config.track, "table": result.table()})
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    """`cache list`: each cache's folder, entries and size; `verify`: open every entry, one line
    per damaged one on stderr (exit 2 if any); `clear --what KIND`: remove those caches only."""
    from srlib.cache import CACHE_KINDS, clear_caches, list_caches, verify_caches

    if args.action == "clear" and not args.what:
        raise SrlibError("name the caches to clear: --what KIND (repeatable) or --what all")
    kinds = list(CACHE_KINDS) if not args.what or "all" in args.what else list(dict.fromkeys(args.what))
    if args.action == "list":
        _print_result(list_caches(kinds))
    elif args.action == "clear":
        removed = clear_caches(kinds)
        for item in removed:
            print(f"removed {item['folder']} ({item['entries']} entries, {item['bytes']:,} bytes)")
        _print_result({"removed": [item["kind"] for item in removed]})
    else:
        checked, damaged = verify_caches(kinds)
        for line in damaged:
            print(f"damaged: {line}", file=sys.stderr)
        _print_result({"checked": checked, "damaged": len(damaged)})
        return 2 if damaged else 0
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (exit 2), as every other user error here."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _OneLineParser(prog="python -m srlib", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def add_model_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--profile",
            default=DEFAULT_PROFILE,
            choices=sorted(PROFILES),
            help=f"preset for model, layer, SAE and sizes (default {DEFAULT_PROFILE})",
        )
        p.add_argument("--model", help="backbone: hub id or local folder (overrides the profile)")
        p.add_argument("--layer", type=int, help="layer L = output of block L, 0-indexed")
        p.add_argument("--sae", help='"train", "sae-lens:<release>/<sae_id>" or a saved SAE folder')

    def add_pairs_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument("--max-pairs", type=int, help="use only the first N pairs of each set")
        p.add_argument("--split-seed", type=int, default=0, help="seed of the built-in splits")

    fit = sub.add_parser("fit", help="train a reward model")
    fit.add_argument("--train", required=True, metavar="PAIRS")
    fit.add_argument("--val", metavar="PAIRS", help="validation pairs for early stopping")
    fit.add_argument(
        "--out",
        required=True,
        metavar="DIR",
        help="a new or empty folder, or a saved reward model to replace with --overwrite",
    )
    fit.add_argument("--overwrite", action="store_true", help="replace the reward model saved in --out")
    add_model_flags(fit)
    add_pairs_flags(fit)
    fit.add_argument("--k", type=int, help="top-K latents per side (default: the profile's K)")
    fit.add_argument("--features", default="projection", choices=FEATURES)
    fit.add_argument("--loss", default="margin", choices=LOSS_NAMES)
    fit.add_argument("--gamma", type=finite_float, default=1.0, help="margin of the margin loss")
    fit.add_argument(
        "--method", default="sparserm", choices=METHODS, help="sparserm (with --features) or a baseline reward model"
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=cmd_fit)

    score = sub.add_parser("score", help="score pairs with a saved reward model")
    score.add_argument("--rm", required=True, metavar="DIR")
    score.add_argument("--pairs", required=True, metavar="PAIRS")
    score.add_argument("--out", metavar="SCORES.jsonl")
    score.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_pairs_flags(score)
    score.set_defaults(func=cmd_score)

    filt = sub.add_parser("filter", help="keep the pairs a reward model agrees with")
    filt.add_argument("--rm", required=True, metavar="DIR")
    filt.add_argument("--pairs", required=True, metavar="PAIRS")
    filt.add_argument("--out", required=True, metavar="KEPT.jsonl")
    filt.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_pairs_flags(filt)
    filt.set_defaults(func=cmd_filter)

    from srlib.rewardbench import REWARDBENCH_HUB_ID, REWARDBENCH_SPLIT

    evaluate = sub.add_parser("eval", help="RewardBench-style accuracy per subset and section")
    evaluate.add_argument("--rm", required=True, metavar="DIR")
    evaluate.add_argument(
        "--rewardbench",
        default=REWARDBENCH_HUB_ID,
        metavar="FILE_OR_ID",
        help="a RewardBench-format .jsonl/.parquet file (prompt, chosen, rejected, subset) or a "
        f"hub id, read at split {REWARDBENCH_SPLIT!r} (default {REWARDBENCH_HUB_ID})",
    )
    evaluate.set_defaults(func=cmd_eval)

    explain = sub.add_parser("explain", help="attribute a SparseRM's scores to its selected directions")
    explain.add_argument("--rm", required=True, metavar="DIR", help="a saved SparseRM (projection or latents)")
    explain.add_argument("--pairs", required=True, metavar="PAIRS")
    explain.add_argument("--top", type=int, default=10, help="contributions listed per answer (default 10)")
    explain.add_argument("--out", metavar="EXPLAINED.jsonl", help="write the records here (default: stdout)")
    explain.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    add_pairs_flags(explain)
    explain.set_defaults(func=cmd_explain)

    steer = sub.add_parser("steer", help="scale or mask a SparseRM's directions and measure the change")
    steer.add_argument("--rm", required=True, metavar="DIR", help="a saved SparseRM (projection or latents)")
    steer.add_argument(
        "--scale",
        action="append",
        required=True,
        metavar="LATENT=FACTOR",
        help="multiply that latent's standardised input by FACTOR (0 masks it); repeatable",
    )
    steer.add_argument("--pairs", metavar="PAIRS", help="pairs to measure the accuracy before and after on")
    steer.add_argument("--out", metavar="DIR", help="save the steered reward model here")
    steer.add_argument("--overwrite", action="store_true", help="replace the reward model saved in --out")
    add_pairs_flags(steer)
    steer.set_defaults(func=cmd_steer)

    sae = sub.add_parser("sae", help="train or report on the profile's SAE")
    sae.add_argument("action", choices=("train", "report"))
    sae.add_argument(
        "--pairs",
        action="append",
        metavar="PAIRS",
        help="report: pairs to measure the SAE on (repeatable; default each profile data set's validation split)",
    )
    sae.add_argument(
        "--max-pairs", type=int, help=f"report: use only the first N pairs of each set (default {SAE_REPORT_PAIRS})"
    )
    sae.add_argument("--split-seed", type=int, default=0, help="seed of the built-in splits")
    add_model_flags(sae)
    sae.set_defaults(func=cmd_sae)

    align = sub.add_parser("align", help="iterative DPO on RM-filtered self-generated pairs")
    align.add_argument(
        "--rm", action="append", default=[], metavar="DIR", help="a saved reward model used as filter (repeatable)"
    )
    align.add_argument("--track", required=True, choices=TABLE1_TRACKS, help="a track of the paper's Table 1")
    align.add_argument("--out", required=True, metavar="DIR", help="run folder (resumable)")
    align.add_argument("--rounds", type=int, help="DPO rounds (default: the profile's)")
    align.add_argument("--prompts", type=int, help="prompts per round (default: the profile's)")
    align.add_argument("--include-wo-rm", action="store_true", help="also run without filtering")
    align.add_argument("--seed", type=int, default=0)
    align.add_argument("--profile", default=DEFAULT_PROFILE, choices=sorted(PROFILES))
    align.add_argument("--model", help="policy model: hub id or local folder (overrides the profile)")
    align.set_defaults(func=cmd_align)

    from srlib.cache import CACHE_KINDS

    cache = sub.add_parser("cache", help="list, verify or clear srlib's caches")
    cache.add_argument("action", choices=("list", "verify", "clear"))
    cache.add_argument(
        "--what",
        action="append",
        choices=(*CACHE_KINDS, "all"),
        metavar="KIND",
        help=f"a cache ({', '.join(CACHE_KINDS)}) or all; repeatable (list, verify: all by default)",
    )
    cache.set_defaults(func=cmd_cache)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; a user's mistake prints one line to stderr and returns 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SrlibError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:  # not found, permission, a folder for a file, a full disk, a network ...
        what = error.strerror or (str(error).splitlines() or [type(error).__name__])[0]
        where = "".join(f": {name}" for name in (error.filename, error.filename2) if name)
        print(f"error: {what}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
