"""How much the early exit in `srlib.activations` saves, on real TruthfulQA texts.

Times (fastest of `--repeats` interleaved rounds) three ways of reading the last-token state at the profile's layer L,
on the same tokenised batches (texts of one padded width together: `srlib.activations._batches`) and with the cache off:

- early exit: `last_token_states` (blocks 0..L, then a hook stops the pass);
- all blocks: the base model's full forward with `output_hidden_states` (no LM head);
- full LM: the causal LM's forward with `output_hidden_states`, as one would write it
  naively (all blocks plus the LM head over every token).

Blocks cost the same, so the expected speed-up of early exit over all blocks is about
num_layers / (L + 1) (30 / 16 ≈ 1.9 for the cpu profile); the LM head adds more on top.

It also prints the GEMM bound of the early exit from the same run: the seconds that only the
matrix products of blocks 0..L (the attention and MLP projections of every real token, padding
not counted) would take at the rate a plain `torch.matmul` of one batch's shape reaches here
with the same threads, and the share of that bound the early exit reaches (bound / measured),
and how much of the work was padding (each text is padded to a width fixed by its own length,
`srlib.activations._padded_width`, so its shapes do not depend on its batch). Last, how many
states are the same bits read alone on one thread as in the timed batches: all of them in float32;
under autocast the products' last bits depend on their row count and the threads.

With `--compiled` it also times a `torch.compile`d early exit (compiling apart) and prints how
far its states and the eager early exit's are from a float32 read.

    SRLIB_DATA_DIR=... python benchmarks/extraction.py --profile cpu --n 256 --batch-size 16 [--threads 2] [--compiled]
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

from srlib import activations
from srlib.activations import last_token_states
from srlib.backbone import AUTOCAST_DTYPES, backbone_for_profile, format_pair
from srlib.data import load_pairs
from srlib.profiles import DEFAULT_PROFILE, get_profile


def batched_last_token_states(backbone, texts, max_length, batch_size, forward):
    """Last-token states of `texts` from `forward(input_ids, attention_mask)` -> [b, width, d],
    batched as `srlib.activations` batches them (the same widths, under the backbone's autocast)."""
    encoded = [activations._encode(backbone.tokenizer, t, max_length) for t in texts]
    pad_id = backbone.tokenizer.pad_token_id or 0
    out = torch.empty(len(texts), backbone.hidden_size)
    with torch.inference_mode(), backbone.reading():
        for rows, input_ids, attention_mask in activations._batches(encoded, batch_size, pad_id):
            hidden = forward(input_ids, attention_mask)
            out[rows] = hidden[torch.arange(len(rows)), attention_mask.sum(1) - 1].float()
    return out


def full_forward_states(backbone, texts, layer, max_length, batch_size, with_lm_head):
    """Last-token states at `layer` from a forward pass through every block."""
    model = backbone.model if with_lm_head else backbone.model.get_decoder()

    def forward(input_ids, attention_mask):
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=True)
        return outputs.hidden_states[layer + 1]

    return batched_last_token_states(backbone, texts, max_length, batch_size, forward)


def compiled_early_exit(backbone, layer: int):
    """`torch.compile` (dynamic shapes) of a forward through blocks 0..`layer` only: a shallow copy
    of the decoder with the later blocks and the final norm dropped, so its last hidden state is
    block `layer`'s output, as the early exit reads it. Not what srlib runs (its early exit stops
    a hook-instrumented pass, which does not compile); this measures what compiling would buy."""
    decoder = backbone.model.get_decoder()
    prefix = copy.copy(decoder)
    prefix._modules = dict(decoder._modules)  # the copy's own module table: the backbone keeps its blocks
    prefix.layers = torch.nn.ModuleList(list(decoder.layers[: layer + 1]))
    prefix.norm = torch.nn.Identity()

    def forward(input_ids, attention_mask):
        return prefix(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state

    return torch.compile(forward, dynamic=True)


def projection_flops_per_token(config) -> int:
    """Multiply-adds × 2 of one block's linear projections for one token: q, k, v, o and the
    gated MLP's gate, up and down (attention scores and softmax not counted)."""
    d, inner = config.hidden_size, config.intermediate_size
    kv = config.num_key_value_heads * (d // config.num_attention_heads)
    return 2 * (2 * d * d + 2 * d * kv + 3 * d * inner)


def matmul_rate(rows: int, d: int, inner: int, dtype: torch.dtype = torch.float32, repeats: int = 20) -> float:
    """FLOP/s of the best of `repeats` [rows, d] @ [d, inner] products in `dtype` (torch's threads)."""
    a, b = torch.randn(rows, d, dtype=dtype), torch.randn(d, inner, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d * inner / best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default=DEFAULT_PROFILE)
    parser.add_argument("--n", type=int, default=256, help="number of texts (chosen + rejected)")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument(
        "--repeats", type=int, default=3, help="interleaved rounds; the fastest round of each method is reported"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's, every core)")
    parser.add_argument(
        "--autocast",
        default=None,
        choices=["none", *AUTOCAST_DTYPES],
        help="read states under torch.autocast in this dtype (default: the profile's autocast)",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also time a torch.compile'd early exit (its compile time printed apart), and how far its "
        "states and the early exit's are from a float32 read",
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    profile = get_profile(args.profile)
    batch_size = args.batch_size or profile.batch_size
    layer, max_length = profile.layer, profile.max_length

    if args.autocast is not None:
        profile = profile.replace(autocast=None if args.autocast == "none" else args.autocast)
    backbone = backbone_for_profile(profile)
    pairs = load_pairs("truthfulqa:train", max_pairs=(args.n + 1) // 2)
    texts = [text for pair in pairs for text in format_pair(backbone.tokenizer, pair)][: args.n]
    lengths = [len(activations._encode(backbone.tokenizer, t, max_length).ids) for t in texts]
    n_tokens = sum(lengths)
    n_padded = sum(activations._padded_width(n) for n in lengths)
    print(
        f"{backbone.model_id} ({backbone.source}), layer {layer} of {backbone.num_layers}, "
        f"{len(texts)} texts, {n_tokens} tokens, batch {batch_size}, "
        f"{torch.get_num_threads()} threads, device {backbone.device}, "
        f"{'autocast ' + str(backbone.autocast) if backbone.autocast else 'no autocast'}"
    )

    runs = {
        "early exit": lambda: last_token_states(
            backbone, texts, layer, max_length=max_length, batch_size=batch_size, cache=False, progress=False
        ),
        "all blocks": lambda: full_forward_states(backbone, texts, layer, max_length, batch_size, False),
        "full LM": lambda: full_forward_states(backbone, texts, layer, max_length, batch_size, True),
    }
    if args.compiled:
        forward = compiled_early_exit(backbone, layer)
        start = time.perf_counter()
        batched_last_token_states(backbone, texts, max_length, batch_size, forward)
        print(f"compiled early exit: compiling and the first pass took {time.perf_counter() - start:.1f} s")
        runs["compiled EE"] = lambda: batched_last_token_states(backbone, texts, max_length, batch_size, forward)
    last_token_states(backbone, texts[:batch_size], layer, cache=False, progress=False)  # warm-up
    seconds, results = {name: float("inf") for name in runs}, {}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            results[name] = run()
            seconds[name] = min(seconds[name], time.perf_counter() - start)

    print(f"{'method':<12}{'seconds':>9}{'texts/s':>10}{'tokens/s':>10}{'EE speedup':>12}{'max |diff|':>12}")
    for name in runs:
        diff = (results[name] - results["early exit"]).abs().max().item()
        print(
            f"{name:<12}{seconds[name]:>9.2f}{len(texts) / seconds[name]:>10.1f}"
            f"{n_tokens / seconds[name]:>10.0f}{seconds[name] / seconds['early exit']:>12.2f}"
            f"{diff:>12.1e}"
        )
    print(
        f"expected early-exit speed-up over all blocks ≈ {backbone.num_layers}/{layer + 1} = "
        f"{backbone.num_layers / (layer + 1):.2f}"
    )
    config, dtype = backbone.model.config, backbone.autocast or torch.float32
    rate = matmul_rate(batch_size * n_tokens // len(texts), config.hidden_size, config.intermediate_size, dtype)
    bound = n_tokens * (layer + 1) * projection_flops_per_token(config) / rate
    print(
        f"GEMM bound of the early exit ({torch.get_num_threads()} threads, {rate / 1e9:.1f} GFLOP/s on one "
        f"batch's shape in {dtype}): {bound:.2f} s; measured {seconds['early exit']:.2f} s, "
        f"{100 * bound / seconds['early exit']:.0f}% of the bound"
    )
    print(
        f"padding: the blocks ran {n_padded} token positions for {n_tokens} real tokens "
        f"({100 * (n_padded - n_tokens) / n_padded:.0f}% of them padding, widths in multiples of "
        f"{activations._PAD_MULTIPLE}); the bound counts real tokens only"
    )
    if args.compiled:
        print(f"compiled early exit: {100 * bound / seconds['compiled EE']:.0f}% of the bound")
        if backbone.autocast is not None:
            print_distance_from_float32(backbone, texts, results, layer, max_length, batch_size)
    print_batch_invariance(backbone, texts, results["early exit"], layer, max_length, batch_size)


def print_distance_from_float32(backbone, texts, results, layer: int, max_length: int, batch_size: int) -> None:
    """How far each way of reading under autocast is from the same states read in float32
    (relative norm of the difference over all texts): whether compiling moves the states more
    than autocast itself does."""
    autocast, backbone.autocast = backbone.autocast, None
    try:
        exact = last_token_states(
            backbone, texts, layer, max_length=max_length, batch_size=batch_size, cache=False, progress=False
        )
    finally:
        backbone.autocast = autocast
    for name in ("early exit", "compiled EE"):
        distance = ((results[name] - exact).norm() / exact.norm()).item()
        print(f"{name}: states {distance:.1e} from a float32 read (relative)")


def print_batch_invariance(backbone, texts, batched, layer: int, max_length: int, batch_size: int) -> None:
    """How many of the early exit's states (read in batches of `batch_size` on torch's threads)
    are the same bits when each text is read alone on one thread: `srlib.activations`'s batch
    invariance, which holds in float32 and not under autocast, where the matrix products' last
    bits depend on how many rows a product has and on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = last_token_states(
            backbone, texts, layer, max_length=max_length, batch_size=1, cache=False, progress=False
        )
    finally:
        torch.set_num_threads(threads)
    same = sum(torch.equal(a, b) for a, b in zip(alone, batched, strict=True))
    relative = ((batched - alone).norm(dim=1) / alone.norm(dim=1)).max().item()
    print(
        f"batch invariance: {same}/{len(texts)} states the same bits read alone on one thread as in batches of "
        f"{batch_size} on {threads} thread(s); largest relative difference {relative:.1e}"
    )


if __name__ == "__main__":
    main()
