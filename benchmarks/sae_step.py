"""Seconds per SAE training step: sae-lens's TopK and BatchTopK steps against srlib's gather steps.

`srlib.topk_training`'s classes compute sae-lens's TopK and BatchTopK training steps (the same
loss and gradients, `tests/test_sae.py`) from the kept latents instead of dense [batch, d_sae]
tensors. This times both on the same rows, as `srlib.sae._fit` trains them (sae-lens's
`SAETrainer`, the profile's autocast), for the profile's SAE and for each shape of chapter 11's
family of TopK and BatchTopK SAEs (or those whose name contains `--sae`), at one and two threads:

    SRLIB_DATA_DIR=... python benchmarks/sae_step.py [--profile cpu] [--at 0.2] [--steps 30] [--texts 400] [--sae NAME]

The rows are every token of `--texts` TruthfulQA train texts at the profile's layer (real
states). Each SAE runs its real schedule (its dead-latent window follows its length, and the
AuxK loss works on the latents dead by then) up to `--steps` steps from `--at` of the way
through, which are timed; the median is printed. Run it on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from unittest import mock

import torch
from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE
from sae_lens.saes.topk_sae import TopKTrainingSAE
from sae_lens.training.sae_trainer import SAETrainer

from srlib import sae as sae_mod
from srlib.activations import iter_token_activations, last_token_states
from srlib.backbone import backbone_for_profile, format_pair
from srlib.data import load_pairs
from srlib.profiles import SAETrainingConfig, get_profile
from srlib.topk_training import GATHER_CLASSES


class _Enough(Exception):
    """Raised by the timed step once the timed window is over (the rest of the run is not needed)."""


def step_seconds(tokens, last, config: SAETrainingConfig, *, autocast: bool, gather: bool, window: range) -> float:
    """Median seconds of the `SAETrainer.step`s numbered in `window` of a run of `config` (its
    real length, so its dead-latent window and AuxK loss are the book's), sae-lens's own
    classes unless `gather`; the run stops after the window."""
    times: list[float] = []
    step = SAETrainer.step

    def timed_step(trainer, batch):
        start = time.perf_counter()
        out = step(trainer, batch)
        if trainer.n_training_steps in window:
            times.append(time.perf_counter() - start)
        if trainer.n_training_steps >= window.stop:
            raise _Enough
        return out

    classes = GATHER_CLASSES if gather else {"topk": TopKTrainingSAE, "batchtopk": BatchTopKTrainingSAE}
    with (
        mock.patch.object(SAETrainer, "step", timed_step),
        mock.patch.dict(GATHER_CLASSES, classes),
        contextlib.suppress(_Enough),
    ):
        sae_mod._fit(tokens, last, config, progress=False, autocast=autocast)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", default="cpu")
    parser.add_argument("--at", type=float, default=0.2, help="where the timed steps start, as a share of the run")
    parser.add_argument("--steps", type=int, default=30, help="steps timed")
    parser.add_argument("--texts", type=int, default=400)
    parser.add_argument("--sae", default="", help="only the SAEs whose name contains this")
    args = parser.parse_args()

    profile = get_profile(args.profile)
    backbone = backbone_for_profile(profile)
    pairs = load_pairs("truthfulqa:train", max_pairs=args.texts)
    texts = [text for pair in pairs for text in format_pair(backbone.tokenizer, pair)][: args.texts]
    layer = profile.layer
    tokens = torch.cat(list(iter_token_activations(backbone, texts, layer, max_length=profile.max_length)))
    last = last_token_states(backbone, texts, layer, max_length=profile.max_length, cache=False)
    autocast = backbone.autocast is not None
    # one SAE per (architecture, d_sae, k): a step's cost follows the shapes, not the token budget
    configs = {"profile SAE": profile.sae_training}
    if profile.sae_family is not None:
        configs.update((name, config) for name, config in profile.sae_family.variants if config is not None)
    shapes = {(c.architecture, c.d_sae, c.k): name for name, c in reversed(configs.items())}
    configs = {name: configs[name] for name in reversed(shapes.values())}
    print(f"{len(tokens)} token rows, {len(last)} read-position rows, layer {layer}, autocast {autocast}")
    header = f"{'SAE (d_sae, k)':<58}{'threads':>8}{'sae-lens (s/step)':>19}{'gather (s/step)':>17}{'speed-up':>10}"
    print(header)
    for name, config in configs.items():
        if config.architecture not in GATHER_CLASSES or args.sae not in name:
            continue
        start = int(args.at * sae_mod._steps(config))
        window = range(start, start + args.steps)
        label = f"{name[:40]} ({config.d_sae}, {config.k})"
        for threads in (1, 2):
            torch.set_num_threads(threads)
            timed = [
                step_seconds(tokens, last, config, autocast=autocast, gather=gather, window=window)
                for gather in (False, True)
            ]
            print(f"{label:<58}{threads:>8}{timed[0]:>19.3f}{timed[1]:>17.3f}{timed[0] / timed[1]:>9.2f}x", flush=True)


if __name__ == "__main__":
    main()
