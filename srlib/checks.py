"""Checks for the chapters' exercises: give your function, get "correct" or the first mismatch.

Each check calls the learner's function on a few fixed, seeded inputs (including an edge
case), compares the result with srlib's own implementation and either prints one line
saying it is correct or raises `AssertionError` naming the case that differs and how, e.g.

    >>> from srlib import checks
    >>> def my_scores(mu_w, mu_l): return mu_w - mu_l, mu_l - mu_w
    >>> checks.separation_scores(my_scores)
    separation_scores: correct on 3 cases
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

_ATOL = 1e-5


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _compare(name: str, case: str, got: Any, expected: Any) -> None:
    """Raise AssertionError explaining how `got` differs from `expected`."""
    if isinstance(expected, tuple):
        if not isinstance(got, (tuple, list)) or len(got) != len(expected):
            raise AssertionError(
                f"{name} ({case}): expected a tuple of {len(expected)} results, got {type(got).__name__}"
            )
        for index, (g, e) in enumerate(zip(got, expected, strict=True)):
            _compare(name, f"{case}, result {index}", g, e)
        return
    expected = torch.as_tensor(expected, dtype=torch.float32)
    try:
        got = torch.as_tensor(got, dtype=torch.float32)
    except (TypeError, ValueError, RuntimeError):
        raise AssertionError(f"{name} ({case}): expected a tensor, got {type(got).__name__}") from None
    if got.shape != expected.shape:
        raise AssertionError(f"{name} ({case}): expected shape {tuple(expected.shape)}, got {tuple(got.shape)}")
    if not torch.allclose(got, expected, atol=_ATOL, rtol=1e-4):
        where = (got - expected).abs().flatten().argmax().item()
        raise AssertionError(
            f"{name} ({case}): value {where} (flattened) is {got.flatten()[where].item():.6g}, "
            f"expected {expected.flatten()[where].item():.6g}"
        )


def _run(name: str, fn: Callable, reference: Callable, cases: Iterable[tuple[str, tuple]]) -> None:
    count = 0
    for case, args in cases:
        _compare(name, case, fn(*[a.clone() if isinstance(a, Tensor) else a for a in args]), reference(*args))
        count += 1
    print(f"{name}: correct on {count} cases")


def _latents(seed: int, n: int, m: int, density: float) -> Tensor:
    g = _generator(seed)
    values = torch.rand(n, m, generator=g)
    return torch.where(torch.rand(n, m, generator=g) < density, values, torch.zeros(()))


def activation_frequencies(fn: Callable[[Tensor], Tensor]) -> None:
    """Check eq. 6-8: `fn(latents [n, M]) -> [M]`, the share of rows where each latent is > 0."""
    from srlib.directions import activation_frequencies as reference

    cases = [
        ("random 50x20", (_latents(0, 50, 20, 0.3),)),
        ("a latent that never fires", (torch.cat([_latents(1, 10, 5, 0.5), torch.zeros(10, 1)], 1),)),
        ("negative values do not count", (torch.tensor([[-1.0, 0.0, 2.0], [3.0, -0.5, 0.0]]),)),
    ]
    _run("activation_frequencies", fn, reference, cases)


def separation_scores(fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> None:
    """Check eq. 9: `fn(mu_w, mu_l) -> (nabla, delta)`."""
    from srlib.directions import separation_scores as reference

    g = _generator(2)
    cases = [
        ("random frequencies", (torch.rand(30, generator=g), torch.rand(30, generator=g))),
        ("equal frequencies", (torch.full((4,), 0.5), torch.full((4,), 0.5))),
        ("one-hot", (torch.tensor([1.0, 0.0, 0.0]), torch.tensor([0.0, 0.0, 1.0]))),
    ]
    _run("separation_scores", fn, reference, cases)


def top_k_latents(fn: Callable[[Tensor, int], Tensor]) -> None:
    """Check top-K selection: `fn(scores [M], k) -> indices [k]`, best first, ties by lower index."""
    from srlib.directions import rank_latents

    def reference(scores: Tensor, k: int) -> Tensor:
        return rank_latents(scores)[:k].float()

    g = _generator(3)
    cases = [
        ("random scores, k=5", (torch.randn(40, generator=g), 5)),
        ("ties are broken by the lower index", (torch.tensor([0.2, 0.5, 0.2, 0.5, -1.0]), 3)),
        ("k equal to the number of latents", (torch.tensor([0.0, 1.0, -1.0]), 3)),
    ]
    _run("top_k_latents", lambda s, k: torch.as_tensor(fn(s, k)).float(), reference, cases)


def projection_features(fn: Callable[[Tensor, Tensor, Tensor, Tensor], Tensor]) -> None:
    """Check eq. 10-12: `fn(Z [n, d], W_dec [M, d], idx_w [K], idx_l [K]) -> v_p [n, 2K]`."""

    def reference(Z: Tensor, W_dec: Tensor, idx_w: Tensor, idx_l: Tensor) -> Tensor:
        return torch.cat([Z @ W_dec[idx_w].T, Z @ W_dec[idx_l].T], dim=1)

    g = _generator(4)
    Z, W = torch.randn(6, 8, generator=g), torch.randn(32, 8, generator=g)
    cases = [
        ("random, K=3", (Z, W, torch.tensor([3, 0, 7]), torch.tensor([1, 30, 2]))),
        ("one sample, K=1", (Z[:1], W, torch.tensor([5]), torch.tensor([6]))),
    ]
    _run("projection_features", fn, reference, cases)


def margin_loss(fn: Callable[[Tensor, Tensor, float], Tensor]) -> None:
    """Check eq. 13: `fn(s_w, s_l, gamma) -> mean of max(0, gamma - (s_w - s_l))`."""
    from srlib.reward import margin_loss as reference

    g = _generator(5)
    cases = [
        ("random scores, gamma=1", (torch.randn(16, generator=g), torch.randn(16, generator=g), 1.0)),
        ("all pairs beyond the margin", (torch.tensor([5.0, 4.0]), torch.tensor([0.0, 1.0]), 1.0)),
        ("gamma=0.3", (torch.tensor([0.1, 0.0]), torch.tensor([0.0, 0.2]), 0.3)),
    ]
    _run("margin_loss", fn, reference, cases)


def bt_loss(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check the Bradley-Terry loss: `fn(s_w, s_l) -> mean of -log sigmoid(s_w - s_l)`."""
    from srlib.reward import bt_loss as reference

    g = _generator(6)
    cases = [
        ("random scores", (torch.randn(16, generator=g), torch.randn(16, generator=g))),
        ("large differences stay finite", (torch.tensor([100.0, -100.0]), torch.tensor([0.0, 0.0]))),
    ]
    _run("bt_loss", fn, reference, cases)


def fraction_of_variance_explained(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check FVE: `fn(z [n, d], z_hat [n, d]) -> 1 - sum|z - z_hat|^2 / sum|z - mean(z)|^2`."""

    def reference(z: Tensor, z_hat: Tensor) -> Tensor:
        return 1 - ((z - z_hat) ** 2).sum() / ((z - z.mean(0)) ** 2).sum()

    g = _generator(7)
    z = torch.randn(20, 6, generator=g) + 3.0
    cases = [
        ("a noisy reconstruction", (z, z + 0.1 * torch.randn(20, 6, generator=g))),
        ("perfect reconstruction", (z, z.clone())),
        ("predicting the mean", (z, z.mean(0, keepdim=True).expand_as(z).clone())),
    ]
    _run("fraction_of_variance_explained", fn, reference, cases)


def mc2(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check TruthfulQA MC2: `fn(logp_correct [a], logp_incorrect [b]) -> normalised probability
    mass on the correct answers`."""

    def reference(correct: Tensor, incorrect: Tensor) -> Tensor:
        p = torch.cat([correct, incorrect]).softmax(0)
        return p[: correct.numel()].sum()

    cases = [
        ("two against two", (torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -3.0]))),
        ("very negative log-probs", (torch.tensor([-300.0]), torch.tensor([-301.0, -302.0]))),
    ]
    _run("mc2", fn, reference, cases)


def filter_rule(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check the paper's filter (§3.3): `fn(s_w [n], s_l [n]) -> keep [n]` (booleans), True
    exactly where the reward model scores the answer asked to be good strictly higher; a tie
    is dropped. Compared with `srlib.alignment.filter_tuples` on tuples with distinct answers."""
    from srlib.alignment import filter_tuples
    from srlib.data import PreferencePair

    class _Scores:
        """A stand-in reward model that returns fixed scores."""

        def __init__(self, s_w: Tensor, s_l: Tensor):
            self.s_w, self.s_l = s_w, s_l

        def score_pairs(self, pairs):
            return self.s_w, self.s_l

    def reference(s_w: Tensor, s_l: Tensor) -> Tensor:
        tuples = [PreferencePair(f"x{i}", f"good {i}", f"bad {i}") for i in range(len(s_w))]
        return torch.tensor(filter_tuples(tuples, _Scores(s_w, s_l)).keep, dtype=torch.float32)

    g = _generator(8)
    cases = [
        ("random scores", (torch.randn(20, generator=g), torch.randn(20, generator=g))),
        ("ties are dropped", (torch.tensor([0.5, 1.0, -2.0, 3.0]), torch.tensor([0.5, 0.0, -2.0, 3.5]))),
        ("negative scores", (torch.tensor([-3.0, -1.0]), torch.tensor([-2.0, -4.0]))),
    ]
    _run("filter_rule", lambda w, r: torch.as_tensor(fn(w, r)).float(), reference, cases)


def agreement(fn: Callable[[Tensor, Tensor], float]) -> None:
    """Check the agreement of two filters (chapter 6): `fn(keep_a [n], keep_b [n]) -> the share
    of positions where both keep or both drop`, against `srlib.shift.agreement_counts`."""
    from srlib.shift import agreement_counts

    def reference(keep_a: Tensor, keep_b: Tensor) -> Tensor:
        return torch.tensor(agreement_counts(keep_a, keep_b)["agreement"])

    g = _generator(9)
    cases = [
        ("random decisions", (torch.rand(40, generator=g) < 0.5, torch.rand(40, generator=g) < 0.7)),
        ("identical filters", (torch.tensor([True, False, True]), torch.tensor([True, False, True]))),
        ("opposite filters", (torch.tensor([True, False]), torch.tensor([False, True]))),
    ]
    _run("agreement", lambda a, b: torch.as_tensor(fn(a, b), dtype=torch.float32), reference, cases)


def nearest_similarity(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check chapter 6's primary shift measure: `fn(samples [n, d], training [m, d]) -> [n]`,
    each sample's largest cosine to a training row after both are centered on the training
    mean, against `srlib.shift.similarity_to_training(aggregate="nearest", center=True)`."""
    from srlib.shift import similarity_to_training

    def reference(samples: Tensor, training: Tensor) -> Tensor:
        return similarity_to_training(samples, training, aggregate="nearest", center=True)

    g = _generator(10)
    training = torch.randn(30, 8, generator=g) + 2.0
    cases = [
        ("random samples", (torch.randn(7, 8, generator=g) + 2.0, training)),
        ("a sample equal to a training row", (training[3:4].clone(), training)),
        (
            "one training row far from the rest",
            (torch.randn(5, 8, generator=g), torch.cat([training, 10 * torch.ones(1, 8)])),
        ),
    ]
    _run("nearest_similarity", fn, reference, cases)


def paired_difference(fn: Callable[[Sequence[float], Sequence[float]], tuple[float, float]]) -> None:
    """Check chapter 7's paired comparison: `fn(after [n], before [n]) -> (mean of after - before,
    its standard error)`, the mean against `srlib.evaluate.compare_paired` (which reports it in
    points) and the standard error against `scipy.stats.sem` of the differences."""
    import numpy as np
    from scipy import stats

    from srlib.evaluate import compare_paired

    def reference(after: Tensor, before: Tensor) -> tuple[Tensor, Tensor]:
        comparison = compare_paired(after.numpy(), before.numpy(), name_a="after", name_b="before", n_boot=10)
        return (torch.tensor(comparison.difference / 100), torch.tensor(stats.sem(np.subtract(after, before))))

    g = _generator(11)
    correct = (torch.rand(50, generator=g) < 0.6).float()
    cases = [
        ("per-item correctness", (correct, (torch.rand(50, generator=g) < 0.5).float())),
        ("per-item scores", (torch.rand(30, generator=g), torch.rand(30, generator=g))),
        ("one item changed", (torch.tensor([1.0, 1.0, 0.0, 1.0]), torch.tensor([1.0, 0.0, 0.0, 1.0]))),
    ]
    _run(
        "paired_difference",
        lambda a, b: tuple(torch.as_tensor(v, dtype=torch.float32) for v in fn(a, b)),
        reference,
        cases,
    )


def path_share(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check chapter 9's exact integrated gradients: `fn(b [n], a [n]) -> [n]`, for each hidden
    unit the share of α in [0, 1] on which its pre-activation b + α·a is positive (the share of
    the path from the baseline on which a ReLU passes its gradient)."""
    from srlib.explain import _relu_path_shares

    g = _generator(12)
    cases = [
        ("random units", (torch.randn(40, generator=g).double(), torch.randn(40, generator=g).double())),
        ("no slope: on or off all the way", (torch.tensor([1.0, -1.0, 0.0]).double(), torch.zeros(3).double())),
        (
            "crossing zero inside and outside the path",
            (torch.tensor([-0.5, 0.5, -2.0, 2.0]).double(), torch.tensor([1.0, -1.0, 1.0, -1.0]).double()),
        ),
    ]
    _run("path_share", fn, _relu_path_shares, cases)


def top_m_mask(fn: Callable[[Tensor, int], Tensor]) -> None:
    """Check chapter 9's deletion: `fn(contributions [n, M], m) -> [n, M]` booleans, True at each
    row's m largest contributions (signed: the ones that push the margin up most)."""
    from srlib.explain import top_m_mask as reference

    g = _generator(13)
    cases = [
        ("random rows, m = 3", (torch.randn(6, 10, generator=g), 3)),
        ("negative contributions are the last to go", (torch.tensor([[-5.0, 1.0, 0.5, -0.1]]), 2)),
        ("m = M deletes everything", (torch.randn(2, 5, generator=g), 5)),
    ]
    _run("top_m_mask", lambda c, m: fn(c, m).float(), lambda c, m: reference(c, m).float(), cases)


def alive_fraction(fn: Callable[[Tensor], float]) -> None:
    """Check chapter 11's alive share: `fn(latents [n, d_sae]) -> float`, the share of latents
    that fire (> 0) on at least one row (`srlib.sae.alive_fraction`)."""
    from srlib.sae import alive_fraction as reference

    cases = [
        ("random 40x30, sparse", (_latents(14, 40, 30, 0.02),)),
        ("half the latents never fire", (torch.cat([_latents(15, 8, 6, 0.9), torch.zeros(8, 6)], 1),)),
        ("one row; negative values do not count", (torch.tensor([[-1.0, 0.0, 2.0, 0.5]]),)),
    ]
    _run("alive_fraction", lambda z: torch.tensor(float(fn(z))), lambda z: torch.tensor(reference(z)), cases)


def gap_change(fn: Callable[[Tensor, Tensor, Tensor], float]) -> None:
    """Check chapter 11's change of the top-K − random gap between two SAEs, in points:
    `fn(best [n], weakest [n], random [n]) -> float` for per-pair outcomes (1, 0, 1/2) on the
    same pairs; the reference is `srlib.evaluate.compare_paired(best, weakest).difference`
    (the random control is common to both gaps, so it cancels)."""
    from srlib.evaluate import compare_paired

    def reference(best: Tensor, weakest: Tensor, random: Tensor) -> Tensor:
        return torch.tensor(
            compare_paired(best.numpy(), weakest.numpy(), name_a="best", name_b="weakest", n_boot=10).difference
        )

    g = _generator(16)
    outcomes = [(torch.rand(3, 60, generator=g) < p).float() for p in (0.7, 0.6, 0.5)]
    cases = [
        ("60 pairs", tuple(o[0] for o in outcomes)),
        (
            "ties count one half",
            (
                torch.tensor([1.0, 0.5, 0.5, 0.0]),
                torch.tensor([0.5, 0.5, 0.0, 0.0]),
                torch.tensor([1.0, 1.0, 0.0, 0.0]),
            ),
        ),
        ("same SAE twice: no change", (outcomes[1][0], outcomes[1][0], outcomes[2][0])),
    ]
    _run("gap_change", lambda *a: torch.tensor(float(fn(*a))), reference, cases)


def lora_parameters(fn: Callable[[Any, int], int]) -> None:
    """Check StandardRM's trainable count: `fn(config, r)` -> rank-`r` LoRA on every block's q and
    v projections (A: r × d_in, B: d_out × r) plus the 1 × d score head, for a Llama-style config
    (grouped-query attention included: v projects to `num_key_value_heads` heads)."""
    from types import SimpleNamespace

    def reference(config: Any, r: int) -> int:
        head_dim = config.hidden_size // config.num_attention_heads
        q_out, v_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
        return config.num_hidden_layers * r * (2 * config.hidden_size + q_out + v_out) + config.hidden_size

    def config(d: int, heads: int, kv_heads: int, layers: int) -> SimpleNamespace:
        return SimpleNamespace(
            hidden_size=d, num_attention_heads=heads, num_key_value_heads=kv_heads, num_hidden_layers=layers
        )

    cases = [
        ("SmolLM2-135M's shape, r=8", (config(576, 9, 3, 30), 8)),
        ("every head its own key/value, r=4", (config(64, 4, 4, 2), 4)),
        ("one block, r=1", (config(32, 8, 2, 1), 1)),
    ]
    for case, args in cases:
        got, expected = fn(*args), reference(*args)
        if got != expected:
            raise AssertionError(f"lora_parameters ({case}): got {got}, expected {expected}")
    print(f"lora_parameters: correct on {len(cases)} cases")


def judge_preference(fn: Callable[[Tensor, Tensor], Tensor]) -> None:
    """Check a pairwise judge's preference: `fn(logits_chosen_as_a [n, 2], logits_chosen_as_b [n, 2])`
    -> P(chosen is better) from the softmax over the verdicts "A" and "B", averaged over both orders."""
    from srlib.baselines.models import verdict_preference as reference

    g = _generator(11)
    always_a = torch.tensor([[5.0, 0.0], [2.0, -1.0]])
    cases = [
        ("random logits", (3 * torch.randn(16, 2, generator=g), 3 * torch.randn(16, 2, generator=g))),
        ("a judge that always says 'A' (0.5: its bias cancels)", (always_a, always_a)),
    ]
    _run("judge_preference", fn, reference, cases)
