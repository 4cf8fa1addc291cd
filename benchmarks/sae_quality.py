"""How good is a profile's SAE? Train it (or load it from the cache) and report its quality.

    python benchmarks/sae_quality.py --profile cpu [--corpus-tokens N] [--sae FIELD=VALUE ...]
                                     [--val-pairs N] [--autocast bfloat16] [--out result.json]

Prints, as JSON: the held-out report `train_sae` saved (FVE, L0 and dead latents over all
tokens of the held-out corpus texts and at their last tokens), the same report at the read
position of the VALIDATION pairs of the profile's data sets (never in the SAE corpus; the states
chapter 11 measures an SAE on, so a lever tried here is judged where settings are chosen, never
on the test split), the decoder row norms, and the training time and tokens.
Needs `SRLIB_DATA_DIR` (or the dataset hub).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from srlib.backbone import AUTOCAST_DTYPES, backbone_for_profile, format_pair
from srlib.data import load_pairs
from srlib.profiles import get_profile
from srlib.sae import sae_for_profile, sae_info, sae_quality


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument(
        "--corpus-tokens", type=int, default=None, help="token budget of the SAE corpus (default: the profile's)"
    )
    parser.add_argument(
        "--sae",
        action="append",
        default=[],
        metavar="FIELD=VALUE",
        help="override a field of the profile's SAETrainingConfig, e.g. --sae last_token_share=0.4 (repeatable)",
    )
    parser.add_argument(
        "--val-pairs",
        type=int,
        default=None,
        help="validation pairs per data set for the read-position report (default: the profile's; 0: skip)",
    )
    parser.add_argument(
        "--autocast",
        default=None,
        choices=["none", *AUTOCAST_DTYPES],
        help="read states and train the SAE under torch.autocast in this dtype (default: the profile's)",
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    profile = get_profile(args.profile)
    if args.autocast is not None:
        profile = profile.replace(autocast=None if args.autocast == "none" else args.autocast)
    if args.corpus_tokens is not None:
        profile = profile.replace(sae_corpus_tokens=args.corpus_tokens)
    if args.sae:
        changes = {}
        for item in args.sae:
            field, _, value = item.partition("=")
            kind = type(getattr(profile.sae_training, field))
            changes[field] = kind(float(value)) if kind is int else kind(value)
        profile = profile.replace(sae_training=dataclasses.replace(profile.sae_training, **changes))
    backbone = backbone_for_profile(profile)
    start = time.perf_counter()
    sae = sae_for_profile(profile, backbone)
    sae_config = {
        "architecture": sae.cfg.architecture(),
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.d_sae,
        "k": getattr(sae.cfg, "k", None),
    }
    result = {
        "profile": profile.name,
        "layer": profile.layer,
        "sae_config": sae_config,
        "seconds_this_call": round(time.perf_counter() - start, 1),
        "trained": sae_info(sae),
    }
    norms = sae.W_dec.detach().norm(dim=1)
    result["decoder_row_norms"] = {"min": norms.min().item(), "max": norms.max().item()}
    if args.val_pairs != 0:
        result["validation_pairs_read_position"] = {}
        for name in profile.datasets:
            pairs = load_pairs(f"{name}:val", max_pairs=args.val_pairs or profile.max_pairs)
            report = sae_quality(
                sae,
                backbone,
                [text for pair in pairs for text in format_pair(backbone.tokenizer, pair)],
                profile.layer,
                position=profile.position,
                all_tokens=False,
                max_length=profile.max_length,
                batch_size=profile.batch_size,
            ).read_position
            result["validation_pairs_read_position"][name] = {**report.as_dict(), "alive": report.alive_fraction}
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
