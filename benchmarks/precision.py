"""What reading states and training the SAE under bfloat16 autocast saves, and what it changes.

    SRLIB_DATA_DIR=... python benchmarks/precision.py --profile cpu [--autocast bfloat16]
                       [--datasets truthfulqa ...] [--pairs N] [--sae-steps N] [--policy N]
                       [--policy-precisions float32 bfloat16] [--policy-batch-size B]
                       [--policy-accumulation A] [--threads N]

A profile's `autocast` (`srlib.profiles.Profile.autocast`) makes the backbone read hidden states
under `torch.autocast` (matrix products in bfloat16, the residual stream in float32) and the SAE
train under sae-lens's autocast. This compares the two precisions on the same inputs, with the
profile's own float32 reading as the reference:

- reading the VALIDATION pairs of each data set (cache off, the fastest of `--repeats` rounds):
  seconds each way; per state the relative error ||z_low - z|| / ||z|| and the cosine; the
  Jaccard overlap of the SAE latents that fire; and a SparseRM fitted (profile settings, seed 0)
  on the float32 training states, scoring the pairs read each way: its accuracy and how many
  pairs its decision flips on;
- `--sae-steps` steps of the profile's SAE training on the cached float32 corpus rows, without
  and with autocast: seconds per step. (The quality of a whole SAE trained under autocast on
  states read under it: `benchmarks/sae_quality.py --autocast bfloat16`.)
- `--policy N`: chapter 7's policy stages under its cpu settings (`AlignmentConfig.autocast`), on
  the Red-Teaming track's data: generating answers to N generation prompts, one DPO round (one
  epoch) on N training pairs taken as tuples, and the pairwise log-prob accuracy on N
  validation pairs: seconds each way, the DPO loss, and the accuracy and flipped verdicts of
  the evaluation. `--policy-batch-size` and `--policy-accumulation` set the DPO round's
  micro-batch and its gradient accumulation (default: chapter 7's cpu settings), so the peak
  memory of one effective batch taken whole or in micro-batches can be compared.

Needs the profile's float32 SAE and states (chapter 1 under the profile builds them; they are
computed here otherwise). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import tempfile
import time
from collections.abc import Sequence

import torch
from torch.nn.functional import cosine_similarity

from srlib import sae as sae_module
from srlib.activations import pair_states
from srlib.alignment import AlignmentConfig, dpo_round, evaluate_policy, generate_responses, policy_precision
from srlib.backbone import AUTOCAST_DTYPES, Backbone, backbone_for_profile
from srlib.baselines.cost import CostMeter
from srlib.data import generation_prompts, load_pairs, prompt_messages
from srlib.directions import select_directions
from srlib.experiments import dataset_states
from srlib.profiles import DEFAULT_PROFILE, get_profile
from srlib.reward import SparseRM


def fastest_read(backbone: Backbone, pairs, profile, repeats: int) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """(states, seconds): the pairs' states at the profile's layer and position, cache off, the
    fastest of `repeats` reads."""
    best, states = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        states = pair_states(
            backbone,
            pairs,
            profile.layer,
            position=profile.position,
            max_length=profile.max_length,
            batch_size=profile.batch_size,
            cache=False,
            progress=False,
        )
        best = min(best, time.perf_counter() - start)
    assert states is not None
    return states, best


def firing_jaccard(sae, a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over rows of the Jaccard overlap of the latents that fire on a and on b."""
    fa, fb = sae_module.encode(sae, a) > 0, sae_module.encode(sae, b) > 0
    return ((fa & fb).sum(1) / (fa | fb).sum(1).clamp(min=1)).float().mean().item()


def decisions(model: SparseRM, chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per pair, whether the model scores the chosen answer above the rejected one."""
    return model.score_states(chosen) > model.score_states(rejected)


def sae_step_seconds(profile, backbone: Backbone, steps: int, autocast: bool) -> float:
    """Seconds per step of the profile's SAE training on its cached corpus rows (first step excluded)."""
    texts, _ = sae_module._profile_corpus(profile, backbone)
    data = sae_module.corpus_activations(
        backbone, profile.layer, texts, max_length=profile.max_length, batch_size=profile.batch_size, progress=False
    )
    config = dataclasses.replace(profile.sae_training, training_tokens=(steps + 1) * profile.sae_training.batch_size)
    start = time.perf_counter()
    sae_module._fit(data.train_tokens, data.train_last, config, progress=False, autocast=autocast)
    return (time.perf_counter() - start) / (steps + 1)


def policy_stages(
    backbone: Backbone, n: int, precisions: Sequence[str] = ("float32", "bfloat16"), **dpo_changes: int
) -> None:
    """Print chapter 7's policy stages (generation, one DPO round, evaluation) in each of
    `precisions` ("float32", "bfloat16": under autocast), with the DPO round's peak memory (the
    process's resident set, sampled) and, for both, what the autocast changes. `dpo_changes`
    (batch_size, gradient_accumulation_steps) replace chapter 7's cpu settings. A precision run
    after another inherits its process's memory, so run one per process to compare peaks."""
    base = AlignmentConfig.for_profile("cpu", track="red-teaming", epochs=1, **dpo_changes)
    prompts = [prompt_messages(p) for p in generation_prompts(base.data_name)[:n]]
    tuples = load_pairs(f"{base.data_name}:train", max_pairs=n)
    items = load_pairs(f"{base.data_name}:val", max_pairs=n)
    print(
        f"chapter 7's policy on {n} prompts / tuples / validation pairs (red-teaming track, cpu settings; "
        f"DPO micro-batch {base.batch_size} x {base.gradient_accumulation_steps} accumulated):"
    )
    print(
        f"{'precision':<12}{'generate s':>11}{'DPO s':>8}{'DPO loss':>10}{'DPO peak MB':>12}{'eval s':>8}"
        f"{'accuracy':>10}"
    )
    verdicts = {}
    for precision in precisions:
        autocast = None if precision == "float32" else precision
        config = base.replace(autocast=autocast)
        start = time.perf_counter()
        with policy_precision(backbone.model, config):
            generate_responses(
                backbone.model, backbone.tokenizer, prompts, max_new_tokens=config.max_new_tokens, progress=False
            )
        generate_s = time.perf_counter() - start
        with tempfile.TemporaryDirectory(prefix="precision-dpo-") as scratch, CostMeter() as memory:
            policy, stats = dpo_round(
                copy.deepcopy(backbone.model),
                backbone.tokenizer,
                tuples,
                config,
                seed=0,
                adapter_dir=f"{scratch}/adapter",
                reference=backbone.model,
                progress=False,
            )
        start = time.perf_counter()
        metrics = evaluate_policy(policy, backbone.tokenizer, items, config, progress=False, per_item=True)
        eval_s = time.perf_counter() - start
        verdicts[autocast] = torch.tensor(metrics["accuracy_items"])
        print(
            f"{autocast or 'float32':<12}{generate_s:>11.1f}{stats['seconds']:>8.1f}"
            f"{stats['epochs'][-1]['loss']:>10.4f}{memory.peak_rss / 2**20:>12.0f}{eval_s:>8.1f}"
            f"{100 * metrics['accuracy']:>10.1f}"
        )
    if len(verdicts) == 2:
        flipped = int((verdicts[None] != verdicts["bfloat16"]).sum())
        print(
            f"evaluation verdicts that differ (each policy trained and scored in its own precision): {flipped} of {n}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--autocast", default="bfloat16", choices=sorted(AUTOCAST_DTYPES))
    parser.add_argument("--datasets", nargs="+", default=None, help="default: the profile's")
    parser.add_argument("--pairs", type=int, default=None, help="validation pairs per data set (default: all; 0: skip)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--sae-steps", type=int, default=20, help="0 skips the SAE timing")
    parser.add_argument("--policy", type=int, default=0, help="chapter 7's policy stages on N items (0: skip)")
    parser.add_argument(
        "--policy-precisions",
        nargs="+",
        default=["float32", "bfloat16"],
        choices=["float32", "bfloat16"],
        help="which precisions --policy runs (one per process gives each its own peak memory)",
    )
    parser.add_argument(
        "--policy-batch-size", type=int, default=None, help="DPO micro-batch (default: the cpu preset's)"
    )
    parser.add_argument(
        "--policy-accumulation", type=int, default=None, help="DPO gradient accumulation (default: the cpu preset's)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = get_profile(args.profile).replace(autocast=None)  # the float32 reference
    reference = backbone_for_profile(profile, progress=False)
    print(
        f"{reference.model_id} ({reference.source}), profile {profile.name}, layer {profile.layer}, "
        f"{profile.position} token, K = {profile.k}, {torch.get_num_threads()} threads; "
        f"float32 against autocast {args.autocast}"
    )
    header = (
        f"{'data set':<14}{'pairs':>6}{'fp32 s':>8}{'low s':>8}{'speed-up':>9}{'rel err med':>12}"
        f"{'rel err max':>12}{'cos min':>9}{'latents J':>10}{'acc fp32':>9}{'acc low':>8}{'flipped':>8}"
    )
    datasets = (args.datasets or profile.datasets) if args.pairs != 0 else ()
    if datasets:  # the profile's float32 SAE (trained here if chapter 1 has not cached it)
        sae = sae_module.sae_for_profile(profile, reference, progress=False)
        low = backbone_for_profile(profile, autocast=AUTOCAST_DTYPES[args.autocast], progress=False)
        print(header)
    for dataset in datasets:
        states = dataset_states(reference, dataset, profile, progress=False)
        directions = select_directions(
            sae, sae_module.encode(sae, states.train.chosen), sae_module.encode(sae, states.train.rejected), profile.k
        )
        model = SparseRM(directions, sae=sae, layer=profile.layer, position=profile.position)
        model.fit_states(
            states.train.chosen, states.train.rejected, states.val.chosen, states.val.rejected, head=profile.head
        )
        pairs = states.val.pairs[: args.pairs]
        (ref_w, ref_l), ref_s = fastest_read(reference, pairs, profile, args.repeats)
        (low_w, low_l), low_s = fastest_read(low, pairs, profile, args.repeats)
        ref, lowered = torch.cat([ref_w, ref_l]), torch.cat([low_w, low_l])
        error = (lowered - ref).norm(dim=1) / ref.norm(dim=1)
        ref_d, low_d = decisions(model, ref_w, ref_l), decisions(model, low_w, low_l)
        print(
            f"{dataset:<14}{len(pairs):>6}{ref_s:>8.1f}{low_s:>8.1f}{ref_s / low_s:>9.2f}"
            f"{error.median().item():>12.2e}{error.max().item():>12.2e}"
            f"{cosine_similarity(lowered, ref, dim=1).min().item():>9.5f}"
            f"{firing_jaccard(sae, lowered, ref):>10.3f}{100 * ref_d.float().mean().item():>9.1f}"
            f"{100 * low_d.float().mean().item():>8.1f}{int((ref_d != low_d).sum()):>8}"
        )
    if args.sae_steps:
        full = sae_step_seconds(profile, reference, args.sae_steps, autocast=False)
        mixed = sae_step_seconds(profile, reference, args.sae_steps, autocast=True)
        print(
            f"SAE training ({profile.sae_training.architecture}, {profile.sae_training.d_sae} latents, "
            f"k {profile.sae_training.k}, batch {profile.sae_training.batch_size}): {full:.3f} s/step float32, "
            f"{mixed:.3f} s/step autocast bfloat16, speed-up {full / mixed:.2f}"
        )
    if args.policy:
        changes = {"batch_size": args.policy_batch_size, "gradient_accumulation_steps": args.policy_accumulation}
        policy_stages(
            reference, args.policy, args.policy_precisions, **{k: v for k, v in changes.items() if v is not None}
        )


if __name__ == "__main__":
    main()
