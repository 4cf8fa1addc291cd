"""Reading and steering a SparseRM: which selected directions drive a score, and what turning them off does.

Each of a SparseRM's 2K inputs is one selected SAE latent: the projection of the hidden state
on its decoder row (kind ``projection``) or the latent's own activation (kind ``latents``),
from the chosen-side list I_w (the first K inputs) or the rejected-side list I_l (the last K),
as `srlib.directions.select_directions` recorded them (``latent_indices`` in config.json).

**Attribution** (`attribute`). The head standardises its inputs, u = (x − mean) / std, and
applies an MLP f. The baseline input is the training mean of the head's inputs, i.e. u = 0,
so the **baseline score** f(0) is what the head says of an answer that is average on every
direction. The contribution of input j is its integrated gradient from u = 0 to u, in float64:
u_j ∫₀¹ ∂f/∂u_j(αu) dα. Integrated gradients are complete: baseline + Σ contributions = f(u).
For the default ReLU head the integral is exact (each hidden unit is on for a known share of
the path from 0 to u, so no quadrature is needed); for GELU/tanh heads a Gauss-Legendre rule
doubles its nodes until |baseline + Σ − score| < 1e-4 in float64.

**Steering** (`steer`). ``{latent: factor}`` multiplies the *standardised* input u_j of that
latent by the factor (0 masks it). Scaling after standardisation scales the input around its
training mean: masking sets it to the baseline value, so masking every direction leaves exactly
the baseline score, and a factor of 2 doubles how far the answer sits from an average one on
that direction. Scaling the raw projection instead would move a masked input to
(0 − mean) / std, a value no training answer had. A latent that is in both lists (possible when
one side ran short of separating latents) is scaled in both places. The steered model is a
`SteeredSparseRM`: it scores, saves and loads like any reward model, with the edit in its
config.json under ``steering``.

**Faithfulness** (`deletion_curve`). For m = 1..M, mask each pair's top-m directions by margin
attribution (contribution to s_chosen − s_rejected) and, for comparison, m directions drawn at
random among the 2K; the margin drop has a 95% interval over pairs, and
`srlib.evaluate.compare_paired` gives the verdict on the accuracy after each deletion.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
from torch import Tensor, nn

from srlib.errors import ConfigError, SrlibError
from srlib.evaluate import PairedComparison, compare_paired, pair_outcomes, seed_interval
from srlib.progress import progress_bar
from srlib.reward import FeatureRM, RewardHead, SparseRM

#: Completeness tolerance of the attribution (|baseline + Σ contributions − score|).
TOLERANCE = 1e-4
#: Kinds of SparseRM whose inputs are SAE latents (``random`` directions have no latent).
EXPLAINABLE_KINDS = ("projection", "latents")
SIDES = {"w": "chosen", "l": "rejected"}


class NotExplainableError(SrlibError):
    """A reward model whose inputs are not selected SAE latents (DenseRM, random directions, a baseline)."""


# ----------------------------------------------------------------------------- the inputs of a SparseRM


def require_sae_inputs(model: Any) -> FeatureRM:
    """`model` if its head reads selected SAE latents; a one-line `NotExplainableError` otherwise."""
    name = type(model).__name__
    if not isinstance(model, FeatureRM):
        raise NotExplainableError(f"a {name} has no SAE directions to explain or steer; use a SparseRM")
    kind = getattr(model.features, "kind", None)
    if kind == "dense":
        raise NotExplainableError(
            f"a {name} reads the hidden state itself and has no SAE directions to "
            "explain or steer; use a SparseRM (python -m srlib fit --features projection)"
        )
    if kind not in EXPLAINABLE_KINDS or model.indices_w is None:
        raise NotExplainableError(
            f"this {name} reads {kind!r} features, not selected SAE latents: nothing to "
            "explain or steer; use a projection or latents SparseRM"
        )
    model.require_fitted()
    return model


def _sae_head(model: Any) -> RewardHead:
    """The fitted head of a model whose inputs are selected SAE latents (`require_sae_inputs`)."""
    return require_sae_inputs(model).require_fitted().head


def input_latents(model: FeatureRM) -> list[tuple[int, str]]:
    """(latent index, side) of each of the head's 2K inputs, in input order: I_w ('chosen') then I_l ('rejected')."""
    require_sae_inputs(model)
    indices_w, indices_l = model.indices_w or [], model.indices_l or []
    return [(int(i), SIDES["w"]) for i in indices_w] + [(int(i), SIDES["l"]) for i in indices_l]


def standardized_inputs(model: FeatureRM, Z: Tensor) -> tuple[Tensor, Tensor]:
    """(x, u) for hidden states Z [n, d]: the head's raw inputs x [n, 2K] (float32) and the
    standardised, steered inputs u [n, 2K] (float64) its MLP reads."""
    features, head, _ = require_sae_inputs(model).require_fitted()
    x = features(Z)
    u = (x.double() - head.mean.double()) / head.std.double()
    return x, u * input_scale(head).double()


def input_scale(head: RewardHead) -> Tensor:
    """The steering factor of each input ([in_dim], ones for a head that is not steered)."""
    return getattr(head, "scale", torch.ones(head.in_dim))


def _mlp64(head: RewardHead) -> nn.Sequential:
    """A float64 copy of the head's MLP (the part after standardisation and steering)."""
    import copy

    return copy.deepcopy(head.net).double().eval()


# ----------------------------------------------------------------------------- attribution


@dataclass
class Attribution:
    """The scores of n texts split over the head's 2K inputs.

    `contributions` [n, 2K] (float64) plus `baseline` equal `scores` [n] (the float64 head) to
    within `TOLERANCE`; `activations` [n, 2K] are the head's raw inputs (projections, or latent
    activations for kind ``latents``); `latents`/`sides` name each input; `nodes` is the number
    of quadrature nodes used (0: the exact ReLU path integral).
    """

    latents: list[int]
    sides: list[str]
    activations: Tensor
    contributions: Tensor
    baseline: float
    scores: Tensor
    nodes: int = 0

    @property
    def completeness_error(self) -> float:
        """max over texts of |baseline + Σ contributions − score|."""
        total = self.baseline + self.contributions.sum(dim=1)
        return float((total - self.scores).abs().max()) if len(self.scores) else 0.0

    def top(self, row: int, n: int = 10) -> tuple[list[dict[str, Any]], float]:
        """The `n` largest contributions (by size) of text `row` as records (latent, side,
        activation, contribution), and `rest`: the sum of all the others."""
        contributions = self.contributions[row]
        order = contributions.abs().argsort(descending=True, stable=True)[:n].tolist()
        records = [
            {
                "latent": self.latents[j],
                "side": self.sides[j],
                "input": j,
                "activation": float(self.activations[row, j]),
                "contribution": float(contributions[j]),
            }
            for j in order
        ]
        rest = float(contributions.sum() - contributions[order].sum())
        return records, rest


def _relu_path_shares(pre0: Tensor, slope: Tensor) -> Tensor:
    """For hidden pre-activations b + α·a along α ∈ [0, 1], the share of the path on which each is > 0."""
    safe = torch.where(slope != 0, slope, torch.ones_like(slope))
    crossing = (-pre0 / safe).clamp(0, 1)
    rising = torch.where(slope > 0, 1 - crossing, crossing)
    return torch.where(slope == 0, (pre0 > 0).double(), rising)


def _relu_gradients(net: nn.Sequential, u: Tensor) -> Tensor:
    """∫₀¹ ∇f(αu) dα exactly, for f = Linear → ReLU → Linear ([n, in_dim])."""
    first, last = cast(nn.Linear, net[0]), cast(nn.Linear, net[2])
    slope = u @ first.weight.T  # [n, hidden]: how each pre-activation moves along the path
    shares = _relu_path_shares(first.bias.expand_as(slope), slope)
    return (shares * last.weight[0]) @ first.weight


def _quadrature_gradients(net: nn.Sequential, u: Tensor, nodes: int) -> Tensor:
    """∫₀¹ ∇f(αu) dα by the Gauss-Legendre rule with `nodes` nodes ([n, in_dim])."""
    alphas, weights = np.polynomial.legendre.leggauss(nodes)
    total = torch.zeros_like(u)
    for alpha, weight in zip((alphas + 1) / 2, weights / 2, strict=True):
        point = (float(alpha) * u).requires_grad_(True)
        (grad,) = torch.autograd.grad(net(point).sum(), point)
        total += float(weight) * grad
    return total


def attribute(model: FeatureRM, Z: Tensor, *, max_nodes: int = 4096) -> Attribution:
    """Integrated-gradient attribution of the scores of hidden states Z [n, d] to the 2K inputs,
    from the baseline u = 0 (every input at its training mean), complete to within `TOLERANCE`.

    ReLU heads: exact. Other activations: Gauss-Legendre with 16, 32, ... nodes until complete;
    a `ConfigError` if `max_nodes` do not suffice.
    """
    head = _sae_head(model)
    pairs = input_latents(model)
    x, u = standardized_inputs(model, Z)
    net = _mlp64(head)
    with torch.no_grad():
        baseline = float(net(torch.zeros(1, head.in_dim, dtype=torch.float64)).squeeze())
        scores = net(u).squeeze(-1)
    if head.activation == "relu":
        with torch.no_grad():
            gradients, nodes = _relu_gradients(net, u), 0
    else:
        nodes = 16
        while True:
            gradients = _quadrature_gradients(net, u, nodes)
            error = (baseline + (u * gradients).sum(1) - scores).abs().max() if len(u) else 0.0
            if error < TOLERANCE:
                break
            if nodes * 2 > max_nodes:
                raise ConfigError(
                    f"the attribution is not complete with {nodes} quadrature nodes "
                    f"(error {float(error):.2e} > {TOLERANCE}); raise max_nodes"
                )
            nodes *= 2
    return Attribution(
        latents=[i for i, _ in pairs],
        sides=[s for _, s in pairs],
        activations=x,
        contributions=u * gradients,
        baseline=baseline,
        scores=scores.detach(),
        nodes=nodes,
    )


def explain_records(
    model: FeatureRM, pairs: Sequence, Z_w: Tensor, Z_l: Tensor, *, top: int = 10, dashboard: bool = True
) -> list[dict[str, Any]]:
    """One JSON-able record per pair: `pair_id`, and for `chosen` and `rejected` the model's
    `score`, the `baseline`, the `top` contributions (latent, side, activation, contribution,
    and the latent's public dashboard where the SAE has one) and `rest`, the sum of the others."""
    from srlib.experiments import neuronpedia_url

    source = (model.sae_info or {}).get("source") or ""
    records = [{"pair_id": pair.pair_id} for pair in pairs]
    for name, Z in (("chosen", Z_w), ("rejected", Z_l)):
        attribution = attribute(model, Z)
        scores = model.score_states(Z)
        for row, record in enumerate(records):
            contributions, rest = attribution.top(row, top)
            for item in contributions:
                item.pop("input")
                url = neuronpedia_url(source, item["latent"]) if dashboard else None
                if url:
                    item["dashboard"] = url
            record[name] = {
                "score": float(scores[row]),
                "baseline": attribution.baseline,
                "contributions": contributions,
                "rest": rest,
            }
    return records


def contribution_frame(attribution: Attribution, row: int, *, top: int = 10, labels: Mapping[int, str] | None = None):
    """The `top` contributions of text `row` as a DataFrame (latent, side, activation,
    contribution, label: what the latent fires on, from `labels`), plus a final `rest` row."""
    import pandas as pd

    records, rest = attribution.top(row, top)
    frame = pd.DataFrame(records).drop(columns="input")
    frame["label"] = [(labels or {}).get(latent, "") for latent in frame["latent"]]
    rest_row = {
        "latent": -1,
        "side": "",
        "activation": float("nan"),
        "contribution": rest,
        "label": f"all other {len(attribution.latents) - len(records)} inputs",
    }
    return pd.concat([frame, pd.DataFrame([rest_row])], ignore_index=True)


def card_labels(cards, *, chars: int = 60) -> dict[int, str]:
    """A short label per latent from `srlib.experiments.latent_cards`: the start of its most
    strongly activating training answer (what the latent fires on), without the question."""
    labels = {}
    for card in cards.to_dict("records"):
        answers = card["max-activating answers"]
        if answers and card["latent"] not in labels:
            text = answers[0].split("] ", 1)[-1].split(" → ", 1)[-1]
            labels[card["latent"]] = text if len(text) <= chars else text[: chars - 1] + "…"
    return labels


# ----------------------------------------------------------------------------- steering


class SteeredHead(RewardHead):
    """A RewardHead whose standardised inputs are multiplied by `scale` before the MLP.

    `scale` is not saved with the weights (a steered model saves the same tensors as its base);
    it is rebuilt from the ``steering`` entry of config.json.
    """

    scale: Tensor  # a buffer (registered in __init__), typed for the checker

    def __init__(self, in_dim: int, hidden: int = 512, activation: str = "relu"):
        super().__init__(in_dim, hidden, activation)
        self.register_buffer("scale", torch.ones(in_dim), persistent=False)

    @classmethod
    def from_head(cls, head: RewardHead, scale: Tensor) -> SteeredHead:
        """A steered copy of `head` (the same weights and standardisation)."""
        steered = cls(**head.config())
        steered.load_state_dict(head.state_dict())
        steered.scale.copy_(scale)
        return steered.eval()

    def forward(self, x: Tensor) -> Tensor:
        return self.net((x - self.mean) / self.std * self.scale).squeeze(-1)


def _check_scales(model: FeatureRM, scales: Mapping[int, float]) -> dict[int, float]:
    """`scales` as {int latent: float factor}; an unknown latent or a factor that is not finite is refused."""
    known = {latent for latent, _ in input_latents(model)}
    checked = {}
    for latent, factor in scales.items():
        if not isinstance(latent, (int, np.integer)) or int(latent) not in known:
            example = ", ".join(str(i) for i in sorted(known)[:5])
            raise ConfigError(
                f"latent {latent!r} is not one of this SparseRM's {len(known)} selected latents "
                f"(e.g. {example}); explain a pair to see which latents it uses"
            )
        if not isinstance(factor, (int, float, np.floating)) or not math.isfinite(float(factor)):
            raise ConfigError(f"the factor for latent {latent} must be a finite number, got {factor!r}")
        checked[int(latent)] = float(factor)
    if not checked:
        raise ConfigError("steering needs at least one LATENT=FACTOR")
    return checked


class SteeredSparseRM(SparseRM):
    """A SparseRM with some of its directions scaled or masked (`steer`). It scores, saves and
    loads like any reward model; config.json records the edit under ``steering``."""

    def __init__(self, *, steering: Mapping[int, float], head: RewardHead, **parts):
        """A fitted SparseRM's parts (`FeatureRM.fitted_parts`: features, head, history, latent
        indices, ...) whose head multiplies its standardised input for each latent in `steering`
        ({latent: factor}) by the factor. `head` may itself be steered: its weights are copied
        into a new head, so the model it came from is not changed."""
        super().__init__(head=head, **parts)
        self.steering: dict[int, float] = dict(steering)
        scale = torch.tensor([self.steering.get(latent, 1.0) for latent, _ in input_latents(self)])
        base = RewardHead(**head.config())
        base.load_state_dict(head.state_dict())  # a SteeredHead's scale is not in its state dict
        self.head = SteeredHead.from_head(base, scale)

    @classmethod
    def from_model(cls, model: FeatureRM, steering: Mapping[int, float]) -> SteeredSparseRM:
        """`model`'s fitted parts with `steering` (the factors as given: `steer` checks and combines them)."""
        return cls(**model.fitted_parts(), steering=steering)

    def config(self) -> dict[str, Any]:
        return {
            **super().config(),
            "steering": {
                "scales": {str(latent): factor for latent, factor in self.steering.items()},
                "applied_to": "standardised head inputs (x - mean) / std: 0 sets an input to its training mean",
            },
        }

    @classmethod
    def _load(cls, directory: Path, config: dict, backbone=None) -> SteeredSparseRM:
        scales = {int(latent): float(factor) for latent, factor in config["steering"]["scales"].items()}
        return cls(**cls._saved_parts(directory, config, backbone), steering=scales)


def steer(model: FeatureRM, scales: Mapping[int, float]) -> SteeredSparseRM:
    """A copy of the SparseRM `model` whose inputs for the latents in `scales` are multiplied
    by their factors after standardisation (0 masks a latent: its input sits at the training
    mean). Steering a steered model multiplies the factors. `model` itself is not changed."""
    require_sae_inputs(model)
    scales = _check_scales(model, scales)
    combined = dict(getattr(model, "steering", {}))
    for latent, factor in scales.items():
        combined[latent] = combined.get(latent, 1.0) * factor
    return SteeredSparseRM.from_model(model, combined)


def parse_scales(items: Sequence[str]) -> dict[int, float]:
    """`["123=0", "7=2.5"]` (the command line's LATENT=FACTOR) as {123: 0.0, 7: 2.5}; a malformed item
    or a factor that is not finite is refused in one line."""
    scales = {}
    for item in items:
        latent, sep, factor = item.partition("=")
        try:
            value = float(factor)
            scales[int(latent)] = value
        except ValueError:
            raise ConfigError(f"--scale {item!r} is not LATENT=FACTOR (e.g. 123=0 masks latent 123)") from None
        if not sep or not math.isfinite(value):
            raise ConfigError(f"--scale {item!r}: the factor must be a finite number (e.g. 123=0 masks latent 123)")
    return scales


@dataclass
class SteeringResult:
    """Accuracy of a model before and after steering on the same pairs, and which pairs flipped."""

    accuracy_before: float
    accuracy_after: float
    flipped_to_wrong: list[str]
    flipped_to_right: list[str]
    comparison: PairedComparison

    def as_dict(self) -> dict[str, Any]:
        return {
            "accuracy_before": self.accuracy_before,
            "accuracy_after": self.accuracy_after,
            "flipped_to_wrong": self.flipped_to_wrong,
            "flipped_to_right": self.flipped_to_right,
            "verdict": self.comparison.verdict(),
        }


def steering_effect(model: FeatureRM, steered: FeatureRM, pairs: Sequence, Z_w: Tensor, Z_l: Tensor) -> SteeringResult:
    """Score the pairs with both models: accuracies (ties count 1/2, as in every comparison of
    the book), the pairs whose outcome flipped, and `compare_paired`'s verdict (steered vs base)."""
    before = pair_outcomes(model.score_states(Z_w), model.score_states(Z_l))
    after = pair_outcomes(steered.score_states(Z_w), steered.score_states(Z_l))
    ids = [pair.pair_id for pair in pairs]
    return SteeringResult(
        accuracy_before=float(before.mean()),
        accuracy_after=float(after.mean()),
        flipped_to_wrong=[i for i, b, a in zip(ids, before, after, strict=True) if a < b],
        flipped_to_right=[i for i, b, a in zip(ids, before, after, strict=True) if a > b],
        comparison=compare_paired(after, before, name_a="steered", name_b="unsteered"),
    )


def latents_tracking(model: FeatureRM, Z: Tensor, values: Sequence[float], n: int = 5):
    """The `n` inputs whose raw value correlates most (|Spearman ρ|) with a surface property of
    the texts (`values`, e.g. answer length): a DataFrame of latent, side, rho, sorted by |rho|."""
    import pandas as pd
    from scipy import stats

    x, _ = standardized_inputs(model, Z)
    if len(values) != len(x) or len(x) < 3:
        raise ConfigError(f"latents_tracking needs one value per text (at least 3), got {len(values)} for {len(x)}")
    rhos = [stats.spearmanr(x[:, j].numpy(), values).statistic for j in range(x.shape[1])]
    rows = [
        {"latent": latent, "side": side, "rho": 0.0 if not np.isfinite(rho) else float(rho)}
        for (latent, side), rho in zip(input_latents(model), rhos, strict=True)
    ]
    frame = pd.DataFrame(rows)
    return (
        frame.reindex(frame["rho"].abs().sort_values(ascending=False, kind="stable").index)
        .head(n)
        .reset_index(drop=True)
    )


# ----------------------------------------------------------------------------- faithfulness


@dataclass
class DeletionCurve:
    """Margin drops after masking each pair's top-m attributed inputs, and m random ones.

    `top_drop[m]` [n] and `random_drop[m]` [draws, n]: s_w − s_l before minus after the deletion;
    `top_outcomes[m]` [n], `random_outcomes[m]` [draws, n]: pair outcomes after it.
    """

    ms: list[int]
    top_drop: dict[int, np.ndarray]
    random_drop: dict[int, np.ndarray]
    top_outcomes: dict[int, np.ndarray]
    random_outcomes: dict[int, np.ndarray]

    def frame(self, confidence: float = 0.95):
        """One row per (m, deletion): mean margin drop with its interval over pairs, accuracy after."""
        import pandas as pd

        rows = []
        for m in self.ms:
            for name, drop, outcomes in (
                ("top-m attributed", self.top_drop[m], self.top_outcomes[m]),
                ("random m", self.random_drop[m].mean(0), self.random_outcomes[m]),
            ):
                mean, low, high = seed_interval(drop, confidence)
                rows.append(
                    {
                        "m": m,
                        "deleted": name,
                        "margin drop": mean,
                        "low": low,
                        "high": high,
                        "accuracy after (%)": 100 * float(np.mean(outcomes)),
                    }
                )
        return pd.DataFrame(rows)

    def gap(self, m: int, confidence: float = 0.95) -> tuple[float, float, float]:
        """Mean over pairs of (top-m drop − random-m drop) and its interval."""
        return seed_interval(self.top_drop[m] - self.random_drop[m].mean(0), confidence)

    def comparison(self, m: int) -> PairedComparison:
        """`compare_paired` on the accuracy after deleting m random vs the top-m inputs: a
        faithful attribution makes the top-m deletion cost more."""
        return compare_paired(
            self.random_outcomes[m], self.top_outcomes[m], name_a=f"random {m} deleted", name_b=f"top {m} deleted"
        )


def top_m_mask(contributions: Tensor, m: int) -> Tensor:
    """[n, 2K] booleans: True at each row's `m` largest contributions (equal ones: the lower input first)."""
    order = contributions.argsort(dim=1, descending=True, stable=True)
    return _mask_of(order, m)


def _mask_of(order: Tensor, m: int) -> Tensor:
    """[n, width] booleans, True at the first `m` entries of each row of `order` (input indices)."""
    return torch.zeros(order.shape, dtype=torch.bool).scatter_(1, order[:, :m], True)


def _masked_margins(net: nn.Sequential, u_w: Tensor, u_l: Tensor, masks: Tensor) -> np.ndarray:
    """s_w − s_l with the inputs where `masks` [n, 2K] is True set to the baseline (u = 0)."""
    with torch.no_grad():
        keep = (~masks).double()
        return (net(u_w * keep) - net(u_l * keep)).squeeze(-1).numpy()


def deletion_curve(
    model: FeatureRM,
    Z_w: Tensor,
    Z_l: Tensor,
    ms: Sequence[int],
    *,
    draws: int = 5,
    seed: int = 0,
    progress: bool = False,
) -> DeletionCurve:
    """For each m in `ms`: mask, in both answers of each pair, the m inputs with the largest
    contribution to its margin s_w − s_l (`attribute`), and, `draws` times, m inputs drawn at
    random without replacement; record how much the margin drops and the outcomes after."""
    head = _sae_head(model)
    width = head.in_dim
    if not ms or min(ms) < 1 or max(ms) > width:
        raise ConfigError(f"the deletion sizes m must lie in 1..{width}, got {list(ms)}")
    if draws < 1:
        raise ConfigError(f"draws must be >= 1, got {draws}")
    margin_contributions = attribute(model, Z_w).contributions - attribute(model, Z_l).contributions
    _, u_w = standardized_inputs(model, Z_w)
    _, u_l = standardized_inputs(model, Z_l)
    net = _mlp64(head)
    n = len(u_w)
    margin = _masked_margins(net, u_w, u_l, torch.zeros(n, width, dtype=torch.bool))
    generator = torch.Generator().manual_seed(seed)
    random_orders = [torch.stack([torch.randperm(width, generator=generator) for _ in range(n)]) for _ in range(draws)]
    curve = DeletionCurve(list(ms), {}, {}, {}, {})
    for m in progress_bar(list(ms), desc="deletion curve", disable=not progress):
        results = []
        for masks in [top_m_mask(margin_contributions, m)] + [_mask_of(order, m) for order in random_orders]:
            after = _masked_margins(net, u_w, u_l, masks)
            results.append((margin - after, pair_outcomes(after, np.zeros_like(after))))
        curve.top_drop[m], curve.top_outcomes[m] = results[0]
        curve.random_drop[m] = np.stack([drop for drop, _ in results[1:]])
        curve.random_outcomes[m] = np.stack([outcome for _, outcome in results[1:]])
    return curve
