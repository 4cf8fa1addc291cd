"""Settings are chosen on validation data (srlib.experiments.best_setting, validation_study);
the token a reward model reads is a parameter that travels with it; a text's hidden state, and
so its score, is the same bits whatever it was batched with and whether the cache was cold."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

import srlib.activations as activations
from srlib import experiments as ex
from srlib.activations import POSITIONS, last_token_states, token_states
from srlib.backbone import format_pair, format_text
from srlib.data import PreferencePair
from srlib.errors import ConfigError
from srlib.profiles import get_profile
from srlib.reward import RewardModel, SparseRM
from srlib.reward_config import HeadConfig, SparseRMConfig


def _trials(rows: list[tuple[str, int, float, float]]) -> pd.DataFrame:
    """Trials with (variant, seed, val_accuracy, test_accuracy) per row."""
    return pd.DataFrame(
        [{"dataset": "toy", "variant": v, "seed": s, "val_accuracy": va, "test_accuracy": te} for v, s, va, te in rows]
    )


# --------------------------------------------------------------------------- selection on validation


def test_the_validation_choice_wins_when_the_test_column_disagrees():
    trials = _trials(
        [
            ("A", 0, 0.80, 0.60),
            ("A", 1, 0.82, 0.61),
            ("A", 2, 0.81, 0.59),
            ("B", 0, 0.70, 0.90),
            ("B", 1, 0.71, 0.91),
            ("B", 2, 0.69, 0.92),
        ]
    )
    best = ex.best_setting(trials, ("variant",), select_on="val_accuracy")
    assert best["variant"] == "A" and best["mean"] == pytest.approx(81.0) and best["tied"] == []
    with pytest.raises(ConfigError, match="test column"):
        ex.best_setting(trials, ("variant",), select_on="test_accuracy")
    with pytest.raises(TypeError):
        ex.best_setting(trials, ("variant",))  # no default column to fall back on
    with pytest.raises(TypeError):
        ex.summarize(trials)
    table = ex.summarize(trials, ("variant",), value="val_accuracy")
    assert list(table["mean"].round(6)) == [81.0, 70.0] and list(table["se"].round(6)) == [round(1 / 3**0.5, 6)] * 2


def test_a_tie_within_one_standard_error_goes_to_the_simpler_setting():
    # K=64 is best by 0.5 points, but its standard error is 1 point: tied with K=8, the simpler.
    trials = pd.DataFrame(
        [
            {"layer": 2, "k": k, "seed": s, "val_accuracy": v}
            for k, values in ((64, (0.735, 0.745, 0.755)), (8, (0.74, 0.74, 0.74)), (16, (0.60, 0.61, 0.62)))
            for s, v in enumerate(values)
        ]
    )
    best = ex.best_setting(trials, ("layer", "k"), select_on="val_accuracy", simpler=lambda s: s["k"])
    assert (best["layer"], best["k"]) == (2, 8) and best["tied"] == [{"layer": 2, "k": 64}]
    unordered = ex.best_setting(trials, ("layer", "k"), select_on="val_accuracy")
    assert unordered["k"] == 64  # without a simplicity order, the first listed of the tied settings


def test_settings_scored_on_the_same_items_are_compared_item_by_item():
    # "strong" gets 4 items right that "weak" gets wrong and 2 wrong that it gets right, of 50:
    # +4 points. Every seed gives the same outcomes, so the spread over seeds is zero and by it
    # "strong" wins; but which 50 items were drawn is uncertain, and paired over the items the
    # difference is within one standard error: a tie, and the simpler "weak" is chosen.
    weak = [1.0] * 30 + [0.0] * 20
    strong = weak[:]
    for i in (30, 31, 32, 33):
        strong[i] = 1.0
    for i in (0, 1):
        strong[i] = 0.0
    trials = pd.DataFrame(
        [
            {"variant": name, "dataset": "toy", "seed": seed, "val_accuracy": sum(o) / len(o), "outcomes": o}
            for seed in range(3)
            for name, o in (("weak", weak), ("strong", strong))
        ]
    )
    simpler = {"weak": 0, "strong": 1}
    by_seeds = ex.best_setting(trials, ("variant",), select_on="val_accuracy", simpler=lambda s: simpler[s["variant"]])
    assert by_seeds["variant"] == "strong" and by_seeds["tied"] == []
    paired = ex.best_setting(
        trials, ("variant",), select_on="val_accuracy", simpler=lambda s: simpler[s["variant"]], outcomes="outcomes"
    )
    assert paired["variant"] == "weak" and paired["tied"] == [{"variant": "strong"}]
    assert paired["mean"] == pytest.approx(60.0)
    short = trials.assign(
        outcomes=[o if v == "weak" else o[:40] for v, o in zip(trials.variant, trials.outcomes, strict=True)]
    )
    with pytest.raises(ConfigError, match="needs every setting scored on the same items"):
        ex.best_setting(short, ("variant",), select_on="val_accuracy", outcomes="outcomes")


def _toy_states(layer: int, position: str = "last", n: int = 40, d: int = 3) -> ex.DatasetStates:
    g = torch.Generator().manual_seed(layer * 10 + POSITIONS.index(position))
    shift = torch.tensor([1.0, 0.0, 0.0]) * (0.2 + 0.3 * layer)
    pairs = [PreferencePair(f"Q{i}?", "yes", "no", group_id=f"q{i}") for i in range(n)]

    def split(m: int) -> ex.SplitStates:
        base = torch.randn(m, d, generator=g)
        return ex.SplitStates(pairs[:m], base + shift, base - shift)

    return ex.DatasetStates("toy", layer, split(n), split(n // 2), split(n // 2), position=position)


def test_validation_study_scores_the_test_split_once_for_the_selection(monkeypatch):
    import srlib.sae

    def fake_positions(backbone, dataset, profile, positions, *, layer=None, progress=True, **_):
        return {p: _toy_states(profile.layer if layer is None else layer, p) for p in positions}

    monkeypatch.setattr(ex, "states_at_positions", fake_positions)
    monkeypatch.setattr(ex, "warm_states", lambda *args, **kwargs: None)  # toy states need no backbone
    monkeypatch.setattr(srlib.sae, "extract_sae_corpora", lambda *args, **kwargs: [])  # nor SAE corpora
    monkeypatch.setattr(
        srlib.sae,
        "sae_for_profile",
        lambda profile, backbone, *a, progress=True, **k: TopKSAE(TopKSAEConfig(d_in=3, d_sae=8, k=2)),
    )
    profile = get_profile("smoke")
    sae = TopKSAE(TopKSAEConfig(d_in=3, d_sae=8, k=2))
    study = ex.validation_study(
        None,
        profile.replace(k=2),
        sae,
        dataset="toy",
        layers=[1, 2],
        ks=[1, 2],
        seeds=[0, 1, 2],
        progress=False,
        head=HeadConfig(epochs=3),
    )
    assert len(study.reading) == 3 * 2 * 3 and len(study.grid) == 2 * 2 * 3 and len(study.test) == 3
    assert study.reading["test_accuracy"].isna().all() and study.grid["test_accuracy"].isna().all()
    assert study.test["test_accuracy"].between(0, 1).all()
    assert set(study.selected) == {"position", "standardize", "layer", "k"}
    assert study.selected["position"] == study.choices["reading"]["position"]
    assert (study.selected["layer"], study.selected["k"]) == (
        study.choices["grid"]["layer"],
        study.choices["grid"]["k"],
    )
    assert set(study.grid["layer"]) == {1, 2}
    both = study.both_columns()
    assert list(both.columns[-2:]) == ["validation accuracy (%)", "test accuracy (%)"]
    matches = study.defaults_match(profile)
    assert matches == {
        key: getattr(profile.head if key == "standardize" else profile, key) == value
        for key, value in study.selected.items()
    }


# --------------------------------------------------------------------------- read positions


def test_read_positions_name_the_newline_the_end_of_turn_and_the_answer(tiny_backbone):
    tok = tiny_backbone.tokenizer
    text = format_text(tok, "Why is the sky blue?", "Because of scattering")
    encoded = activations._encode(tok, text, 512, suffix=activations._template_suffix(tok))
    names = tok.convert_ids_to_tokens(encoded.ids)
    assert activations._template_suffix(tok) == "<|im_end|>\n"
    assert {p: names[i] for p, i in encoded.reads.items()} == {
        "last": names[-1],
        "end_of_turn": "<|im_end|>",
        "answer": names[-3],
    }
    assert names[-1] == tok.convert_ids_to_tokens(tok("\n", add_special_tokens=False)["input_ids"])[-1]
    assert (
        tok.decode(encoded.ids[encoded.reads["answer"]]).strip()
        == tok.decode(tok("Because of scattering", add_special_tokens=False)["input_ids"][-1:]).strip()
    )
    plain = activations._encode(tok, "no template here", 512, suffix=activations._template_suffix(tok))
    assert set(plain.reads.values()) == {-1}  # no template suffix: every position is the last token
    with pytest.raises(ConfigError, match="unknown read position 'middle'"):
        last_token_states(tiny_backbone, [text], 1, position="middle", cache=False, progress=False)


def test_one_pass_reads_every_position_and_caches_each_apart(tiny_backbone, isolated_cache):
    tok = tiny_backbone.tokenizer
    texts = [format_text(tok, f"Question {i}?", "An answer " * (i + 1)) for i in range(3)]
    calls = []
    handle = tiny_backbone.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        states = token_states(tiny_backbone, texts, 2, positions=POSITIONS, progress=False)
    finally:
        handle.remove()
    widths = {activations._padded_width(len(activations._encode(tok, t, 512).ids)) for t in texts}
    assert len(calls) == len(widths)  # one pass per batch, not one per position
    with torch.inference_mode():
        for i, text in enumerate(texts):
            ids = activations._encode(tok, text, 512).ids
            hidden = tiny_backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[3][0]
            for offset, position in ((-1, "last"), (-2, "end_of_turn"), (-3, "answer")):
                torch.testing.assert_close(states[position][i], hidden[offset], atol=1e-5, rtol=0)
    folders = {p.parent.parent.name for p in isolated_cache.rglob("*.safetensors")}
    assert folders == {f"layer2-max512-{p}" for p in POSITIONS}
    again = token_states(tiny_backbone, texts, 2, positions=("answer",), progress=False)
    assert torch.equal(again["answer"], states["answer"])


def _tiny_rm(backbone, pairs, position: str) -> SparseRM:
    torch.manual_seed(0)
    sae = TopKSAE(TopKSAEConfig(d_in=backbone.hidden_size, d_sae=32, k=4))
    config = SparseRMConfig(k=4, layer=2, position=position, max_length=96, head=HeadConfig(epochs=2))
    return SparseRM.fit(backbone, pairs, pairs, config=config, sae=sae, progress=False)


PAIRS = [
    PreferencePair(f"Question {i}: is {i} even?", "Yes it is " * (i % 3 + 1), "No " * (i % 4 + 1), group_id=f"q{i}")
    for i in range(8)
]


def test_the_read_position_travels_with_a_saved_reward_model(tiny_backbone, isolated_cache, tmp_path):
    model = _tiny_rm(tiny_backbone, PAIRS, "answer")
    model.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm", backbone=tiny_backbone)
    assert loaded.position == "answer" and loaded.rm_config.position == "answer"
    s_w, s_l = loaded.score_pairs(PAIRS, cache=False)
    texts = [format_pair(tiny_backbone.tokenizer, p)[0] for p in PAIRS]
    at_answer = last_token_states(
        tiny_backbone, texts, 2, position="answer", max_length=96, cache=False, progress=False
    )
    assert torch.equal(s_w, loaded.score_states(at_answer))
    at_last = last_token_states(tiny_backbone, texts, 2, max_length=96, cache=False, progress=False)
    assert not torch.equal(s_w, loaded.score_states(at_last))


# --------------------------------------------------------------------------- same input, same bytes


def test_a_state_does_not_depend_on_the_batch(tiny_backbone):
    tok = tiny_backbone.tokenizer
    texts = [format_text(tok, f"Question {i}?", "word " * (i % 5 + 1)) for i in range(12)]
    alone = torch.stack([last_token_states(tiny_backbone, [t], 2, cache=False, progress=False)[0] for t in texts])
    for batch_size in (2, 16):
        together = last_token_states(tiny_backbone, texts, 2, batch_size=batch_size, cache=False, progress=False)
        assert torch.equal(together, alone)
    shuffled = last_token_states(tiny_backbone, texts[::-1] + ["another text " * 9], 2, cache=False, progress=False)
    assert torch.equal(shuffled[:12], alone.flip(0))


def test_scores_are_the_same_bits_from_a_cold_and_a_warm_cache(tiny_backbone, tmp_path, monkeypatch):
    monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path / "fit-cache"))
    model = _tiny_rm(tiny_backbone, PAIRS, "last")  # fitting warms the cache with the pairs' texts
    texts = [text for pair in PAIRS[2:5] for text in format_pair(tiny_backbone.tokenizer, pair)]
    warm = model.score(texts)  # read from entries computed in the fit's batches
    monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path / "cold-cache"))
    cold = model.score(texts, batch_size=1)  # computed now, one text at a time
    assert torch.equal(warm, cold)
    assert torch.equal(warm, model.score(texts, batch_size=4, cache=False))
    assert torch.equal(torch.stack(model.score_pairs(PAIRS[2:5]), 1).flatten(), warm)
    Z = last_token_states(tiny_backbone, texts, 2, max_length=96, progress=False)
    alone = torch.cat([model.score_states(Z[i : i + 1]) for i in range(len(Z))])
    assert torch.equal(model.score_states(Z), alone)  # a score does not depend on the rows scored with it


def test_a_layer_sweep_reads_every_layer_from_one_pass(tiny_backbone, isolated_cache, smoke_profile):
    import os

    if not os.environ.get("SRLIB_DATA_DIR"):
        pytest.skip("SRLIB_DATA_DIR is unset: set it to the folder with truthfulqa/, ...")
    profile = smoke_profile.replace(max_pairs=6)
    passes = []
    handle = tiny_backbone.model.register_forward_pre_hook(lambda module, args: passes.append(1))
    try:
        ex.warm_states(tiny_backbone, "truthfulqa", profile, [1, 2], progress=False)
        warm = len(passes)
        states = {
            layer: ex.dataset_states(tiny_backbone, "truthfulqa", profile, layer=layer, progress=False)
            for layer in (1, 2)
        }
        assert warm > 0 and len(passes) == warm  # the sweep's layers were all read by the warm pass
    finally:
        handle.remove()
    texts = [format_pair(tiny_backbone.tokenizer, p)[0] for p in states[1].val.pairs]
    for layer in (1, 2):  # the same bits a pass to that layer alone gives
        alone = last_token_states(
            tiny_backbone, texts, layer, max_length=profile.max_length, cache=False, progress=False
        )
        assert torch.equal(states[layer].val.chosen, alone)
