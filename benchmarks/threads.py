"""One torch thread or two: the time of each workload of the book at both, and the choice.

Chapters pin `torch.set_num_threads(1)` for head fits and give the backbone the profile's
`threads`; this measures the claim per workload (issue 15, "Both cores") instead of assuming
it. Each workload runs at a small size representative of the cpu profile, with 1 and then 2
threads in every round (interleaved, so drifting load hits both alike); the fastest of
`--repeats` rounds is reported, with the speed-up and the choice: 2 threads where the
speed-up is at least `--threshold` (default 1.2), else 1. The workloads:

- extraction: `last_token_states` of TruthfulQA train texts at the profile's layer, cache off
  (the backbone's early-exit forward, batches of the profile's `batch_size`);
- SAE training: steps of sae-lens's trainer as `srlib.sae` runs it (`_fit`), the profile's
  SAE width, k, batch and autocast, on token rows of those texts;
- reward heads: `fit_head` on projection-sized features (2K columns) for fixed epochs;
- generation: `generate_responses` (sampling with the KV cache), chapter 7's token budget;
- DPO: one `dpo_round` on a few tuples (TRL DPOTrainer with a LoRA adapter: reference
  log-probs, one epoch of steps, the merge), on a fresh copy of the model each time.

    SRLIB_DATA_DIR=... python benchmarks/threads.py [--model tiny] [--repeats 3] [--side-by-side 2]

`--side-by-side N` measures what the book build does with `--jobs N`: N processes run the same
workload at once (each loads its own model, untimed, then all start together), first with one
thread each and then with two; the time is until the last finishes. The choice there is the
thread count per chapter when N chapters share the machine.

`--model tiny` runs the same on the tiny random model in seconds (a check that it works; its
numbers say nothing about the real model). Timings depend on whatever else runs on the
machine: two threads on cores that other processes keep busy can be many times slower than
one (each parallel region waits for its descheduled thread), so run it on an otherwise idle
machine, twice, and trust only what both runs agree on.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import multiprocessing
import tempfile
import time
from collections.abc import Callable, Sequence

import torch

from srlib import sae as sae_mod
from srlib.activations import iter_token_activations, last_token_states
from srlib.alignment import AlignmentConfig, dpo_round, generate_responses
from srlib.backbone import backbone_for_profile, format_pair, load_backbone
from srlib.data import load_pairs, prompt_messages
from srlib.profiles import TINY_MODEL_ID, get_profile
from srlib.reward import fit_head


def workloads(backbone, profile, args) -> dict[str, Callable[[], object]]:
    """{name: a function that runs one instance of the workload}; inputs are built here, untimed."""
    pairs = load_pairs("truthfulqa:train", max_pairs=max(args.texts, args.prompts, args.tuples))
    texts = [text for pair in pairs for text in format_pair(backbone.tokenizer, pair)][: args.texts]
    layer, max_length, batch_size = profile.layer, profile.max_length, profile.batch_size
    tokens = torch.cat(list(iter_token_activations(backbone, texts, layer, max_length=max_length, progress=False)))
    last = last_token_states(backbone, texts, layer, max_length=max_length, cache=False, progress=False)
    sae_config = dataclasses.replace(
        profile.sae_training, training_tokens=args.sae_steps * profile.sae_training.batch_size
    )
    generator = torch.Generator().manual_seed(0)
    width = 2 * min(profile.k, profile.sae_training.d_sae)
    features = [
        torch.randn(n, width, generator=generator) for n in (args.head_pairs,) * 2 + (args.head_pairs // 4,) * 2
    ]
    head = dataclasses.replace(profile.head, epochs=args.head_epochs, patience=args.head_epochs)
    conversations = [prompt_messages(pair.prompt) for pair in pairs[: args.prompts]]
    alignment = AlignmentConfig(track="truthfulqa", epochs=1, batch_size=4, max_length=256, eval_batch_size=8)

    def dpo() -> None:
        with tempfile.TemporaryDirectory(prefix="threads-dpo-") as scratch:
            dpo_round(
                copy.deepcopy(backbone.model),
                backbone.tokenizer,
                pairs[: args.tuples],
                alignment,
                seed=0,
                adapter_dir=f"{scratch}/adapter",
                progress=False,
            )

    return {
        f"extraction ({len(texts)} texts, layer {layer})": lambda: last_token_states(
            backbone, texts, layer, max_length=max_length, batch_size=batch_size, cache=False, progress=False
        ),
        f"SAE training ({args.sae_steps} steps of {sae_config.batch_size})": lambda: sae_mod._fit(
            tokens, last, sae_config, progress=False, autocast=backbone.autocast is not None
        ),
        f"reward heads ({args.head_fits} fits, {args.head_epochs} epochs)": lambda: [
            fit_head(*features, dataclasses.replace(head, seed=seed)) for seed in range(args.head_fits)
        ],
        f"generation ({len(conversations)} prompts, {alignment.max_new_tokens} tokens)": lambda: generate_responses(
            backbone.model,
            backbone.tokenizer,
            conversations,
            max_new_tokens=alignment.max_new_tokens,
            batch_size=alignment.generation_batch_size,
            progress=False,
        ),
        f"DPO round ({args.tuples} tuples, batch {alignment.batch_size})": dpo,
    }


def load(args):
    """(backbone, profile) of the run: the tiny model with the smoke profile's sizes, or the real one."""
    # The tiny model has the smoke profile's sizes (its layer, SAE width, K), not the cpu profile's.
    profile = get_profile("smoke" if args.model == "tiny" else args.profile)
    backbone = load_backbone(TINY_MODEL_ID, device="cpu") if args.model == "tiny" else backbone_for_profile(profile)
    return backbone, profile


def selected(runs: dict[str, Callable[[], object]], only: Sequence[str]) -> dict[str, Callable[[], object]]:
    """The workloads whose name starts with one of `only` (all when empty)."""
    return {name: run for name, run in runs.items() if not only or name.startswith(tuple(only))}


def _side_by_side_worker(args, name: str, threads: int, barrier, results) -> None:
    """One of the processes of `side_by_side`: load, warm up, wait for the others, run once."""
    torch.set_num_threads(threads)
    backbone, profile = load(args)
    run = workloads(backbone, profile, args)[name]
    run()  # warm-up, as in the one-process rounds
    barrier.wait()
    start = time.perf_counter()
    run()
    results.put(time.perf_counter() - start)


def side_by_side(args, names: Sequence[str], copies: int) -> None:
    """Print, per workload, the seconds until `copies` processes running it at once all finish,
    with one and with two threads each (the fastest of `args.repeats` rounds), and the choice."""
    context = multiprocessing.get_context("spawn")  # fork after torch's thread pool started can hang
    one, two = f"{copies} x 1 thread (s)", f"{copies} x 2 threads (s)"
    print(f"{'workload':<44}{one:>18}{two:>19}{'speed-up':>10}{'choice':>8}", flush=True)
    for name in names:
        at = {1: float("inf"), 2: float("inf")}
        for _ in range(args.repeats):
            for threads in (1, 2):
                barrier, results = context.Barrier(copies), context.Queue()
                processes = [
                    context.Process(target=_side_by_side_worker, args=(args, name, threads, barrier, results))
                    for _ in range(copies)
                ]
                for process in processes:
                    process.start()
                seconds = max(results.get() for _ in processes)
                for process in processes:
                    process.join()
                at[threads] = min(at[threads], seconds)
        speedup = at[1] / at[2]
        choice = 2 if speedup >= args.threshold else 1
        print(f"{name:<44}{at[1]:>18.2f}{at[2]:>19.2f}{speedup:>10.2f}{choice:>8}", flush=True)


def timed(run: Callable[[], object], threads: int) -> float:
    """Seconds of one `run()` with torch on `threads` threads."""
    torch.set_num_threads(threads)
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("real", "tiny"), default="real", help="tiny: the tiny random model")
    parser.add_argument(
        "--profile", default="cpu", help="the model and sizes (layer, batch, SAE, K, head) of this profile"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the fastest of each is reported")
    parser.add_argument("--threshold", type=float, default=1.2, help="speed-up from which 2 threads are chosen")
    parser.add_argument("--texts", type=int, default=64, help="texts extracted (and the SAE's token rows)")
    parser.add_argument("--sae-steps", type=int, default=20)
    parser.add_argument("--head-fits", type=int, default=4)
    parser.add_argument("--head-epochs", type=int, default=10)
    parser.add_argument("--head-pairs", type=int, default=600, help="training pairs per head fit")
    parser.add_argument("--prompts", type=int, default=8, help="generation prompts")
    parser.add_argument("--tuples", type=int, default=8, help="DPO tuples")
    parser.add_argument("--only", nargs="*", default=(), help="run only the workloads whose name starts so")
    parser.add_argument(
        "--side-by-side", type=int, default=0, metavar="N", help="N processes run each workload at once (as --jobs N)"
    )
    args = parser.parse_args()
    backbone, profile = load(args)
    runs = selected(workloads(backbone, profile, args), args.only)
    print(
        f"{backbone.model_id} ({backbone.source}), profile {profile.name} sizes, {args.repeats} rounds, "
        f"{torch.get_num_threads()} threads available to torch by default",
        flush=True,
    )
    if args.side_by_side > 1:
        del backbone  # each process loads its own
        side_by_side(args, list(runs), args.side_by_side)
        return
    print(f"{'workload':<44}{'1 thread (s)':>14}{'2 threads (s)':>15}{'speed-up':>10}{'choice':>8}", flush=True)
    for name, run in runs.items():
        timed(run, 1)  # warm-up: first-call costs (allocations, kernels, TRL imports) are not the workload's
        at = {1: float("inf"), 2: float("inf")}
        for _ in range(args.repeats):
            for threads in (1, 2):
                at[threads] = min(at[threads], timed(run, threads))
        speedup = at[1] / at[2]
        choice = 2 if speedup >= args.threshold else 1
        print(f"{name:<44}{at[1]:>14.2f}{at[2]:>15.2f}{speedup:>10.2f}{choice:>8}", flush=True)


if __name__ == "__main__":
    main()
