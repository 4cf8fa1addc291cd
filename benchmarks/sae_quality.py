"""How good is a profile's SAE? Train it (or load it from the cache) and report its quality.

    python benchmarks/sae_quality.py --profile cpu [--corpus-tokens N] [--sae FIELD=VALUE ...]
                                     [--test-pairs 300] [--out result.json]

Prints, as JSON: the held-out report `train_sae` saved (FVE, L0 and dead latents over all
tokens of the held-out corpus texts and at their last tokens), the same report at the last
tokens of TEST-split pairs of the profile's data sets (never in the SAE corpus; the states the
reward model reads at test time), the decoder row norms, and the training time and tokens.
Needs `SRLIB_DATA_DIR` (or the dataset hub).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from srlib.activations import pair_states
from srlib.backbone import backbone_for_profile
from srlib.data import load_pairs
from srlib.profiles import get_profile
from srlib.sae import sae_for_profile, sae_info, sae_report


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
        "--test-pairs", type=int, default=300, help="test pairs per data set for the last-token report (0: skip)"
    )
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = parser.parse_args()

    profile = get_profile(args.profile)
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
    if args.test_pairs:
        result["test_pairs_last_tokens"] = {}
        for name in profile.datasets:
            pairs = load_pairs(f"{name}:test", max_pairs=args.test_pairs)
            chosen, rejected = pair_states(
                backbone, pairs, profile.layer, max_length=profile.max_length, batch_size=profile.batch_size
            )
            report = sae_report(sae, torch.cat([chosen, rejected]))
            result["test_pairs_last_tokens"][name] = report.as_dict()
    text = json.dumps(result, indent=1, default=str)
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
