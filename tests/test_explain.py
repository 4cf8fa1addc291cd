"""srlib.explain and the `explain` / `steer` commands: complete attributions, steering that
saves and loads, a deletion curve that finds the one input a toy head reads, one-line errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from toy_data import error_line, toy_pairs  # tests/ is on sys.path under pytest

from srlib import explain
from srlib.cli import main
from srlib.data import write_jsonl
from srlib.directions import Directions
from srlib.reward import DenseRM, RewardHead, RewardModel, SparseRM
from srlib.reward_config import HeadConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def toy_rm(
    seed: int = 0, *, d: int = 12, k: int = 4, activation: str = "relu", kind: str = "projection", epochs: int = 3
) -> tuple[SparseRM, torch.Tensor, torch.Tensor]:
    """A SparseRM on random directions of R^d (latents 0, 3, 6, ... chosen side; 1, 4, 7, ...
    rejected side), its head fitted briefly on random states, and those states."""
    g = torch.Generator().manual_seed(seed)
    directions = Directions(
        indices_w=torch.arange(k) * 3,
        indices_l=torch.arange(k) * 3 + 1,
        scores_w=torch.ones(k),
        scores_l=torch.ones(k),
        mu_w=torch.zeros(3 * k),
        mu_l=torch.zeros(3 * k),
        vectors=torch.randn(2 * k, d, generator=g),
    )
    model = SparseRM(directions, kind=kind)
    Z_w, Z_l = torch.randn(40, d, generator=g) + 0.5, torch.randn(40, d, generator=g)
    model.fit_states(Z_w, Z_l, head=HeadConfig(epochs=epochs, seed=seed, activation=activation, hidden=24))
    return model, Z_w, Z_l


def randomise_head(model: SparseRM, seed: int) -> None:
    """Random weights and biases of order one (many ReLU kinks on every path), random standardisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in (*model.head.parameters(), model.head.mean):
            tensor.copy_(torch.randn(tensor.shape, generator=g))
        model.head.std.copy_(torch.rand(model.head.in_dim, generator=g) + 0.5)


# ----------------------------------------------------------------------------- attribution


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_attribution_is_complete_on_random_heads(activation, seed):
    model, Z_w, _ = toy_rm(seed, activation=activation)
    randomise_head(model, seed)
    attribution = explain.attribute(model, Z_w)
    scores = model.score_states(Z_w).double()
    assert attribution.completeness_error < 1e-4
    assert torch.allclose(attribution.scores, scores, atol=1e-5)
    assert (attribution.baseline + attribution.contributions.sum(1) - scores).abs().max() < 1e-4
    assert attribution.contributions.abs().sum() > 0.1  # a random head gives weight to the inputs
    if activation == "relu":
        assert attribution.nodes == 0  # the exact path integral, no quadrature
    else:
        assert attribution.nodes >= 16


def test_attribution_names_each_input_with_its_latent_side_and_activation():
    model, Z_w, _ = toy_rm()
    attribution = explain.attribute(model, Z_w[:3])
    assert attribution.latents == [0, 3, 6, 9, 1, 4, 7, 10]
    assert attribution.sides == ["chosen"] * 4 + ["rejected"] * 4
    assert torch.allclose(attribution.activations, Z_w[:3] @ model.features.vectors.T)
    records, rest = attribution.top(0, 3)
    assert [abs(r["contribution"]) for r in records] == sorted((abs(r["contribution"]) for r in records), reverse=True)
    assert attribution.baseline + sum(r["contribution"] for r in records) + rest == pytest.approx(
        float(attribution.scores[0]), abs=1e-9
    )


def test_a_linear_head_gets_the_exact_linear_decomposition():
    """For f(u) = w·u + b every method agrees: contribution_j = w_j u_j."""
    model, Z_w, _ = toy_rm(3)
    randomise_head(model, 3)
    with torch.no_grad():  # all hidden units on along every path: the head is linear there
        model.head.net[0].bias.fill_(1e4)
    attribution = explain.attribute(model, Z_w)
    _, u = explain.standardized_inputs(model, Z_w)
    w = (model.head.net[2].weight.double() @ model.head.net[0].weight.double())[0]
    assert torch.allclose(attribution.contributions, u * w, atol=1e-8)


def test_the_latents_kind_is_explained_and_dense_or_random_features_are_refused():
    model, Z_w, _ = toy_rm(kind="random")
    with pytest.raises(explain.NotExplainableError, match="random"):
        explain.attribute(model, Z_w)
    dense = DenseRM(12).fit_states(Z_w, Z_w.flip(0), head=HeadConfig(epochs=1))
    with pytest.raises(explain.NotExplainableError, match="DenseRM reads the hidden state itself"):
        explain.steer(dense, {0: 0.0})
    with pytest.raises(explain.NotExplainableError, match="no SAE directions"):
        explain.require_sae_inputs(object())


# ----------------------------------------------------------------------------- steering


def test_masking_every_direction_leaves_the_baseline_score():
    model, Z_w, Z_l = toy_rm(1)
    randomise_head(model, 1)
    baseline = explain.attribute(model, Z_w).baseline
    masked = explain.steer(model, {latent: 0 for latent, _ in explain.input_latents(model)})
    scores = masked.score_states(torch.cat([Z_w, Z_l]))
    assert torch.allclose(scores.double(), torch.full_like(scores, baseline).double(), atol=1e-5)
    assert scores.std() < 1e-6 and abs(float(model.score_states(Z_w).std())) > 1e-3


def test_masking_one_direction_removes_about_its_contribution_and_leaves_the_base_model_alone():
    model, Z_w, _ = toy_rm(2)
    before = model.score_states(Z_w)
    masked = explain.steer(model, {3: 0.0})
    assert torch.equal(model.score_states(Z_w), before)  # the base model is not changed
    attribution = explain.attribute(masked, Z_w)
    assert (attribution.contributions[:, 1] == 0).all()  # a masked input contributes nothing
    assert attribution.completeness_error < 1e-4
    assert not torch.equal(masked.score_states(Z_w), before)


def test_a_steered_copy_is_built_by_its_constructor_and_leaves_the_model_alone(monkeypatch, tmp_path):
    model, Z_w, _ = toy_rm(6)
    weights, scores = {name: t.clone() for name, t in model.head.state_dict().items()}, model.score_states(Z_w)
    built = []
    init = explain.SteeredSparseRM.__init__

    def spy(self, **parts):
        built.append(sorted(parts))
        init(self, **parts)

    monkeypatch.setattr(explain.SteeredSparseRM, "__init__", spy)
    unit, unsteered = explain.steer(model, {3: 1.0}), explain.SteeredSparseRM.from_model(model, {})
    assert built == [sorted([*model.fitted_parts(), "steering"])] * 2
    for copy in (unit, unsteered):
        assert type(copy) is explain.SteeredSparseRM and copy.head is not model.head
        assert torch.equal(copy.score_states(Z_w), scores)  # factors of one: the original's scores
    assert (unit.steering, unsteered.steering) == ({3: 1.0}, {})
    assert type(model) is SparseRM and type(model.head) is RewardHead and not hasattr(model, "steering")
    assert all(torch.equal(t, weights[name]) for name, t in model.head.state_dict().items())
    unit.save_pretrained(tmp_path / "rm")
    RewardModel.from_pretrained(tmp_path / "rm")
    assert len(built) == 3  # loading goes through the constructor too


def test_a_steered_model_saves_loads_and_records_its_edit(tmp_path):
    model, Z_w, _ = toy_rm(4)
    steered = explain.steer(explain.steer(model, {3: 2.0, 1: 0.0}), {3: 0.5})  # factors multiply
    assert steered.steering == {3: 1.0, 1: 0.0}
    steered.save_pretrained(tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["rm_class"] == "SteeredSparseRM"
    assert config["steering"]["scales"] == {"3": 1.0, "1": 0.0}
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert isinstance(loaded, explain.SteeredSparseRM) and loaded.steering == {3: 1.0, 1: 0.0}
    assert torch.equal(loaded.score_states(Z_w), steered.score_states(Z_w))
    assert not torch.equal(loaded.score_states(Z_w), model.score_states(Z_w))


@pytest.mark.parametrize(
    "scales, message",
    [
        ({99: 0.0}, "latent 99 is not one of"),
        ({3: math.inf}, "finite"),
        ({3: math.nan}, "finite"),
        ({}, "at least one"),
    ],
)
def test_bad_steering_is_refused_in_one_line(scales, message):
    model, _, _ = toy_rm()
    with pytest.raises(explain.ConfigError, match=message) as caught:
        explain.steer(model, scales)
    assert "\n" not in str(caught.value)


def test_parse_scales():
    assert explain.parse_scales(["3=0", "7=2.5", "-1=1"]) == {3: 0.0, 7: 2.5, -1: 1.0}
    for bad in ("3", "x=1", "3=inf", "3=nan", "3=abc"):
        with pytest.raises(explain.ConfigError, match="--scale"):
            explain.parse_scales([bad])


def test_steering_effect_reports_the_flipped_pairs():
    model, Z_w, Z_l = toy_rm(5, epochs=20)
    pairs = toy_pairs(len(Z_w))
    masked = explain.steer(model, {latent: 0 for latent, _ in explain.input_latents(model)})
    effect = explain.steering_effect(model, masked, pairs, Z_w, Z_l)
    right = (model.score_states(Z_w) > model.score_states(Z_l)).numpy()
    assert effect.accuracy_after == 0.5  # every pair is a tie at the baseline
    assert effect.accuracy_before == pytest.approx(right.mean())
    assert effect.flipped_to_wrong == [p.pair_id for p, r in zip(pairs, right, strict=True) if r]
    assert effect.flipped_to_right == [p.pair_id for p, r in zip(pairs, right, strict=True) if not r]


def test_latents_tracking_finds_the_input_that_follows_a_surface_property():
    model, Z_w, _ = toy_rm(6)
    length = (Z_w @ model.features.vectors[5]).numpy()  # input 5 is latent 4 on the rejected side
    frame = explain.latents_tracking(model, Z_w, length, n=2)
    assert frame.loc[0, "latent"] == 4 and frame.loc[0, "side"] == "rejected"
    assert frame.loc[0, "rho"] == pytest.approx(1.0)


# ----------------------------------------------------------------------------- deletion curve


def test_deletion_curve_on_a_head_that_reads_one_input():
    """Only input 2 (latent 6) matters: deleting the top-1 removes the whole margin; a random
    single deletion removes it only when it happens to draw input 2 (1 time in 8)."""
    model, Z_w, Z_l = toy_rm(7)
    with torch.no_grad():
        model.head.net[0].weight.zero_()
        model.head.net[0].weight[:, 2] = 1.0  # every hidden unit reads input 2 alone
        model.head.net[0].bias.zero_()
    s_w, s_l = model.score_states(Z_w).double(), model.score_states(Z_l).double()
    margin = (s_w - s_l).numpy()
    curve = explain.deletion_curve(model, Z_w, Z_l, [1, 2, 8], draws=40, seed=0)
    positive = margin > 1e-9
    assert np.allclose(curve.top_drop[1][positive], margin[positive], atol=1e-6)
    assert np.allclose(curve.top_drop[8], margin, atol=1e-6)  # everything deleted: margin 0
    assert np.allclose(curve.random_drop[8], margin, atol=1e-6)
    assert curve.random_drop[1].shape == (40, len(margin))
    moved = np.abs(margin) > 1e-6  # (both answers below zero on input 2: margin 0, nothing to remove)
    share = (np.abs(curve.random_drop[1] - margin) < 1e-6)[:, moved].mean()
    assert 0.05 < share < 0.25  # about 1 in 8 random draws hit input 2
    frame = curve.frame()
    assert list(frame["m"]) == [1, 1, 2, 2, 8, 8] and (frame["low"] <= frame["high"]).all()
    gap, low, high = curve.gap(1)
    assert low > 0 and gap == pytest.approx(float(np.mean(curve.top_drop[1] - curve.random_drop[1].mean(0))))
    comparison = curve.comparison(1)
    assert comparison.low > 0  # the top-1 deletion costs more accuracy than a random one
    assert comparison.verdict().startswith("random 1 deleted beats top 1 deleted")


def test_deletion_curve_checks_its_sizes():
    model, Z_w, Z_l = toy_rm()
    for ms in ([], [0], [9]):
        with pytest.raises(explain.ConfigError, match="1..8"):
            explain.deletion_curve(model, Z_w, Z_l, ms)


# ----------------------------------------------------------------------------- the command line (smoke)


@pytest.fixture(scope="module")
def smoke_rms(tmp_path_factory):
    """A smoke-profile SparseRM and DenseRM fitted by the CLI, and test pairs (one cache for the module)."""
    root = tmp_path_factory.mktemp("explain-cli")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SRLIB_CACHE_DIR", str(root / "cache"))
        files = {name: root / f"{name}.jsonl" for name in ("train", "val", "test")}
        for (name, path), offset in zip(files.items(), (0, 40, 52), strict=True):
            write_jsonl(toy_pairs(40 if name == "train" else 12, offset), path)
        for name, features in (("sparse", "projection"), ("dense", "dense")):
            assert (
                main(
                    [
                        "fit",
                        "--profile",
                        "smoke",
                        "--train",
                        str(files["train"]),
                        "--val",
                        str(files["val"]),
                        "--out",
                        str(root / name),
                        "--features",
                        features,
                        "--k",
                        "4",
                    ]
                )
                == 0
            )
        yield {"sparse": root / "sparse", "dense": root / "dense", "pairs": files["test"], "root": root}


def _last_json(out: str) -> dict:
    return json.loads(out.strip().splitlines()[-1])


def test_explain_writes_complete_records(smoke_rms, tmp_path, capsys):
    out = tmp_path / "explained.jsonl"
    assert (
        main(
            [
                "explain",
                "--rm",
                str(smoke_rms["sparse"]),
                "--pairs",
                str(smoke_rms["pairs"]),
                "--top",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert _last_json(capsys.readouterr().out)["n"] == 12
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["pair_id"] for r in records] == [f"p{i}" for i in range(52, 64)]
    config = json.loads((smoke_rms["sparse"] / "config.json").read_text())
    sides = {"chosen": config["latent_indices"]["w"], "rejected": config["latent_indices"]["l"]}
    model = RewardModel.from_pretrained(smoke_rms["sparse"])
    s_w, s_l = model.score_pairs(toy_pairs(12, 52))
    for record, a, b in zip(records, s_w.tolist(), s_l.tolist(), strict=True):
        for answer, score in (("chosen", a), ("rejected", b)):
            part = record[answer]
            assert part["score"] == pytest.approx(score, abs=1e-6)
            assert len(part["contributions"]) == 3
            total = part["baseline"] + sum(c["contribution"] for c in part["contributions"]) + part["rest"]
            assert abs(total - part["score"]) < 1e-4
            for item in part["contributions"]:
                assert item["latent"] in sides[item["side"]] and math.isfinite(item["activation"])
                assert "dashboard" not in item  # the smoke SAE is trained here: no public dashboard
    assert main(["explain", "--rm", str(smoke_rms["sparse"]), "--pairs", str(smoke_rms["pairs"])]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert (
        len(lines) == 12 and len(json.loads(lines[0])["chosen"]["contributions"]) == 8
    )  # --top 10 of 2K = 8 inputs: all of them


def test_steer_prints_accuracy_before_and_after_and_saves(smoke_rms, tmp_path, capsys):
    config = json.loads((smoke_rms["sparse"] / "config.json").read_text())
    latents = sorted(set(config["latent_indices"]["w"] + config["latent_indices"]["l"]))
    out = tmp_path / "steered"
    args = ["steer", "--rm", str(smoke_rms["sparse"]), "--pairs", str(smoke_rms["pairs"]), "--out", str(out)]
    assert main(args + [arg for latent in latents for arg in ("--scale", f"{latent}=0")]) == 0
    result = _last_json(capsys.readouterr().out)
    model = RewardModel.from_pretrained(smoke_rms["sparse"])
    s_w, s_l = model.score_pairs(toy_pairs(12, 52))
    before = ((s_w > s_l).float() + 0.5 * (s_w == s_l).float()).mean().item()
    assert result["accuracy_before"] == pytest.approx(before)
    assert result["accuracy_after"] == 0.5  # every direction masked: every pair ties at the baseline
    assert len(result["flipped_to_wrong"]) + len(result["flipped_to_right"]) == 12
    loaded = RewardModel.from_pretrained(out)
    assert json.loads((out / "config.json").read_text())["steering"]["scales"] == {str(i): 0.0 for i in latents}
    t_w, t_l = loaded.score_pairs(toy_pairs(12, 52))
    assert torch.equal(t_w, t_l)


@pytest.mark.parametrize(
    "case", ["unknown latent", "infinite factor", "nan factor", "dense", "dense explain", "not a pair"]
)
def test_bad_input_exits_2_with_one_line(smoke_rms, capsys, case):
    rm, pairs = str(smoke_rms["sparse"]), str(smoke_rms["pairs"])
    args = {
        "unknown latent": ["steer", "--rm", rm, "--scale", "999999=0"],
        "infinite factor": ["steer", "--rm", rm, "--scale", "0=inf"],
        "nan factor": ["steer", "--rm", rm, "--scale", "0=nan"],
        "dense": ["steer", "--rm", str(smoke_rms["dense"]), "--scale", "0=0"],
        "dense explain": ["explain", "--rm", str(smoke_rms["dense"]), "--pairs", pairs],
        "not a pair": ["steer", "--rm", rm, "--scale", "zero"],
    }[case]
    assert main(args) == 2
    line = error_line(capsys)
    expected = {
        "unknown latent": "latent 999999",
        "infinite factor": "finite",
        "nan factor": "finite",
        "dense": "DenseRM",
        "dense explain": "DenseRM",
        "not a pair": "LATENT=FACTOR",
    }[case]
    assert expected in line


# ----------------------------------------------------------------------------- figures, labels and exercise checks


def test_contribution_frame_and_bars_show_the_top_inputs_and_the_rest():
    import matplotlib.pyplot as plt

    from srlib import plots

    model, Z_w, _ = toy_rm(8)
    attribution = explain.attribute(model, Z_w[:2])
    frame = explain.contribution_frame(attribution, 0, top=3, labels={0: "careful answers"})
    assert len(frame) == 4 and frame["label"].iloc[-1] == "all other 5 inputs"
    assert attribution.baseline + frame["contribution"].sum() == pytest.approx(float(attribution.scores[0]), abs=1e-9)
    fig = plots.contribution_bars(
        {"chosen": frame, "rejected": explain.contribution_frame(attribution, 1, top=3)}, title="a pair"
    )
    left = fig.axes[0]
    widths = sorted(patch.get_width() for patch in left.patches)
    assert widths == pytest.approx(sorted(frame["contribution"]))
    ticks = [t.get_text() for t in left.get_yticklabels()]
    assert ticks[-1] == "all other 5 inputs"  # the rest is the bottom bar
    named = [t for t in ticks if t.startswith("careful answers")]
    assert all(t.endswith("0 (c)") for t in named)
    assert all(t.startswith("latent ") or t.startswith("careful") or t.startswith("all other") for t in ticks)
    plt.close(fig)


def test_card_labels_take_the_answer_of_the_strongest_card():
    import pandas as pd

    cards = pd.DataFrame(
        [
            {"latent": 5, "max-activating answers": ["[chosen, 0.90] Is it? → Yes, it is.", "[rejected, 0.20] Q → no"]},
            {"latent": 7, "max-activating answers": []},
        ]
    )
    assert explain.card_labels(cards) == {5: "Yes, it is."}
    assert explain.card_labels(cards, chars=5) == {5: "Yes,…"}


def test_deletion_curves_figure_has_a_panel_per_data_set():
    import matplotlib.pyplot as plt

    from srlib import plots

    model, Z_w, Z_l = toy_rm(9)
    frame = explain.deletion_curve(model, Z_w, Z_l, [1, 2, 4], draws=2).frame()
    fig = plots.deletion_curves({"A": frame, "B": frame}, title="t")
    assert [ax.get_title() for ax in fig.axes] == ["A", "B"]
    top = fig.axes[0].get_lines()[0]
    assert list(top.get_ydata()) == pytest.approx(list(frame[frame["deleted"] == "top-m attributed"]["margin drop"]))
    plt.close(fig)


def test_the_exercise_checks_pass_right_answers_and_catch_wrong_ones(capsys):
    from srlib import checks

    checks.path_share(explain._relu_path_shares)
    checks.top_m_mask(explain.top_m_mask)
    assert "correct on 3 cases" in capsys.readouterr().out
    with pytest.raises(AssertionError, match="path_share"):
        checks.path_share(lambda b, a: (b + a > 0).double())  # on or off at the end of the path only
    with pytest.raises(AssertionError, match="top_m_mask"):
        checks.top_m_mask(lambda c, m: explain.top_m_mask(c.abs(), m))  # by size, not by sign
