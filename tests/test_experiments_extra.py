"""The chapter 1-3 helpers of srlib.experiments: inspecting latents, selection stability, the
layer x K sweep. Synthetic latents and states; a real (random) sae-lens TopK SAE."""

import pytest
import torch
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

from srlib import experiments as ex
from srlib import present
from srlib.data import PreferencePair
from srlib.errors import ConfigError, DataError
from srlib.profiles import get_profile
from srlib.reward_config import HeadConfig

PAIRS = [
    PreferencePair(f"Question {i}?", f"Right answer {i}", f"Wrong answer {i}", group_id=f"q{i // 2}") for i in range(4)
]
# 4 pairs x 5 latents: latent 0 fires on chosen only, latent 1 on rejected only, latent 2 on both.
LAT_W = torch.tensor(
    [[1.0, 0.0, 0.5, 0.0, 0.0], [2.0, 0.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0, 0.3], [3.0, 0.0, 0.5, 0.0, 0.0]]
)
LAT_L = torch.tensor(
    [[0.0, 1.0, 0.5, 0.0, 0.0], [0.0, 4.0, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.0, 0.0], [0.5, 2.0, 0.5, 0.0, 0.0]]
)
W_DEC = torch.eye(5, 3)


def _sae(d_in: int = 3, d_sae: int = 8, k: int = 2, seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k))


def test_top_latents_strongest_first_and_only_active():
    assert ex.top_latents(LAT_W[:1], 3) == [[(0, 1.0), (2, 0.5)]]
    assert ex.top_latents(torch.zeros(1, 5), 2) == [[]]


def test_pair_latent_table_names_latents_the_other_answer_lacks():
    table = ex.pair_latent_table(PAIRS[:2], LAT_W[:2], LAT_L[:2], n=2, chars=12)
    assert list(table["answer"]) == ["chosen", "rejected", "chosen", "rejected"]
    assert table.loc[0, "strongest latents (activation)"] == "0 (1.00), 2 (0.50)"
    assert table.loc[0, "strongest of those the other answer lacks"] == "0 (1.00)"
    assert table.loc[1, "strongest of those the other answer lacks"] == "1 (1.00)"
    assert table.loc[0, "text"] == "Right answe…" and table.loc[0, "active latents"] == 2


def test_max_activating_and_separated_pairs():
    assert ex.max_activating(LAT_W, 0, n=2) == [(3, 3.0), (1, 2.0)]
    assert ex.max_activating(LAT_W, 3, n=2) == []  # a latent that never fires
    assert ex.separated_pairs(LAT_W, LAT_L, 0, "w").tolist() == [0, 1]  # pair 3 fires on both sides
    assert ex.separated_pairs(LAT_W, LAT_L, 1, "l").tolist() == [0, 1, 3]
    assert ex.separated_pairs(LAT_W, LAT_L, 2, "w").tolist() == []
    with pytest.raises(ConfigError, match="side"):
        ex.separated_pairs(LAT_W, LAT_L, 0, "x")


def test_pair_text_is_one_line_and_cut():
    pair = PreferencePair("Why\nso?", "Because   of this.", "No.")
    assert ex.pair_text(pair) == "Why so? → Because of this."
    assert ex.pair_text(pair, "rejected") == "Why so? → No."
    assert ex.pair_text(pair, chars=8) == "Why so?…"


def test_neuronpedia_url_from_the_sae_lens_registry():
    paper = get_profile("paper").sae_source
    assert ex.neuronpedia_url(paper, 42) == "https://www.neuronpedia.org/gemma-2-2b/13-gemmascope-res-16k/42"
    nine = "sae-lens:gemma-scope-9b-pt-res-canonical/layer_31/width_131k/canonical"
    assert ex.neuronpedia_url(nine, 7) == "https://www.neuronpedia.org/gemma-2-9b/31-gemmascope-res-131k/7"
    assert ex.neuronpedia_url("train", 42) is None
    # any release sae-lens lists a neuronpedia_id for, not only Gemma Scope
    assert (
        ex.neuronpedia_url("sae-lens:llama_scope_lxr_8x/l15r_8x", 1)
        == "https://www.neuronpedia.org/llama3.1-8b/15-llamascope-res-32k/1"
    )
    assert ex.neuronpedia_url("sae-lens:no-such-release/layer_1", 1) is None


def test_latent_cards_one_row_per_shown_latent():
    d = ex.select_directions(W_DEC, LAT_W, LAT_L, k=2)
    cards = ex.latent_cards(d, LAT_W, LAT_L, PAIRS, n_latents=1, n_texts=2, sae_source="train")
    assert list(cards["latent"]) == [0, 1]
    first = cards.iloc[0]
    assert first["pairs separated"] == 2 and first["μ_w"] == 0.75 and first["dashboard"] is None
    assert first["max-activating answers"][0].startswith("[chosen, 3.00] Question 3? → Right answer 3")
    assert "rejected: Wrong answer 1" in first["example pair"]  # pair 1 fires latent 0 harder than pair 0


def test_latent_cards_show_a_conversation_prompt_as_its_turns():
    """A pair in TRL's conversational format (a tuple of turns) is shown as "User: ..." text, as
    `prompt_text` writes it for a table, not as a tuple (nor a crash when it is cut)."""
    turns = (
        {"role": "user", "content": "Hi?"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": "Why?"},
    )
    pairs = [PreferencePair(turns, p.chosen, p.rejected, group_id=p.group_id) for p in PAIRS]
    assert ex.pair_text(pairs[0]) == "User: Hi? Assistant: Hello. User: Why? → Right answer 0"
    d = ex.select_directions(W_DEC, LAT_W, LAT_L, k=2)
    cards = ex.latent_cards(d, LAT_W, LAT_L, pairs, n_latents=1, n_texts=2, sae_source="train")
    assert cards.iloc[0]["example pair"].startswith("User: Hi? Assistant: Hello. User: Why? | chosen: Right answer")


def test_jaccard():
    assert ex.jaccard([1, 2, 3], [2, 3, 4]) == 0.5
    assert ex.jaccard(torch.tensor([1]), torch.tensor([1])) == 1.0
    assert ex.jaccard([], []) == 1.0


def test_selection_stability_identical_halves_overlap_fully():
    lat_w, lat_l = torch.cat([LAT_W, LAT_W]), torch.cat([LAT_L, LAT_L])
    groups = ["a", "b", "c", "d", "a", "b", "c", "d"]
    table = ex.selection_stability(W_DEC, lat_w, lat_l, groups, [1, 2])
    assert list(table["K"]) == [1, 2]
    assert (table["Jaccard I_w"] > 0).all() and (table["Jaccard I_l"] > 0).all()
    assert table.loc[0, "chance"] == pytest.approx(1 / 9)
    with pytest.raises(DataError, match="two groups"):
        ex.selection_stability(W_DEC, LAT_W, LAT_L, ["a"] * 4, [1])


def test_latent_statistics_matches_direct_encoding():
    sae = _sae()
    Z = torch.randn(50, 3, generator=torch.Generator().manual_seed(1))
    stats = ex.latent_statistics(sae, Z, chunk=7)
    active = sae.encode(Z).detach() > 0
    assert torch.equal(stats.active_per_row, active.sum(1))
    assert torch.allclose(stats.frequency, active.float().mean(0))
    assert (stats.active_per_row <= 2).all()
    with pytest.raises(DataError):
        ex.latent_statistics(sae, torch.zeros(0, 3))


def test_profile_at_layer_trained_and_gemma_scope():
    cpu = get_profile("cpu")
    moved = ex.profile_at_layer(cpu, 8, sae_tokens=1000, sae_corpus_tokens=5000)
    assert moved.layer == 8 and moved.sae_training.training_tokens == 1000
    assert moved.sae_corpus_tokens == 5000 and cpu.sae_corpus_tokens != 5000
    assert moved.sae_training.d_sae == cpu.sae_training.d_sae
    assert ex.profile_at_layer(cpu, 8).sae_training == cpu.sae_training
    paper = ex.profile_at_layer(get_profile("paper"), 20)
    assert paper.sae_source == "sae-lens:gemma-scope-2b-pt-res-canonical/layer_20/width_16k/canonical"
    odd = get_profile("paper").replace(sae_source="sae-lens:some-release/some-id")
    with pytest.raises(ConfigError, match="layer_"):
        ex.profile_at_layer(odd, 20)


def _fake_states(layer: int, n: int = 64, d: int = 3) -> ex.DatasetStates:
    g = torch.Generator().manual_seed(layer)
    shift = torch.tensor([1.0, 0.0, 0.0])

    def split(m: int) -> ex.SplitStates:
        base = torch.randn(m, d, generator=g)
        return ex.SplitStates([PAIRS[0]] * m, base + shift, base - shift)

    return ex.DatasetStates("toy", layer, split(n), split(n // 4), split(n // 2))


def test_layer_k_sweep_one_row_per_layer_k_seed(monkeypatch):
    import srlib.sae

    calls = []

    def fake_sae_for_profile(profile, backbone, corpus_texts=None, *, progress=True):
        calls.append((profile.layer, profile.sae_training.training_tokens))
        return _sae(d_sae=16, k=4, seed=profile.layer)

    monkeypatch.setattr(srlib.sae, "sae_for_profile", fake_sae_for_profile)
    monkeypatch.setattr(
        ex, "dataset_states", lambda backbone, dataset, profile, *, layer, progress: _fake_states(layer)
    )
    monkeypatch.setattr(ex, "warm_states", lambda *args, **kwargs: None)  # fake states need no backbone
    monkeypatch.setattr(srlib.sae, "extract_sae_corpora", lambda *args, **kwargs: [])  # nor SAE corpora
    trials = ex.layer_k_sweep(
        None,
        get_profile("smoke"),
        layers=[1, 2],
        ks=[2, 4],
        dataset="toy",
        seeds=[0, 1],
        sae_tokens=512,
        progress=False,
        head=HeadConfig(epochs=3),
    )
    assert calls == [(1, 512), (2, 512)]
    assert len(trials) == 2 * 2 * 2
    assert set(trials["k"]) == {2, 4} and set(trials["layer"]) == {1, 2}
    assert trials["test_accuracy"].between(0, 1).all()
    summary = ex.summarize(trials, by=("layer", "k"), value="val_accuracy")
    best = ex.best_setting(trials, ("layer", "k"), select_on="val_accuracy")
    assert set(best) == {"layer", "k", "mean", "std", "se", "count", "label", "tied"}
    assert best["mean"] >= summary["mean"].max() - summary["se"].max()


def test_shuffled_separation_is_a_relabelling():
    g = torch.Generator().manual_seed(3)
    lat_w, lat_l = torch.rand(200, 6, generator=g) - 0.3, torch.rand(200, 6, generator=g) - 0.6
    null = ex.shuffled_separation(lat_w, lat_l, seed=1)
    true = (lat_w > 0).float().mean(0) - (lat_l > 0).float().mean(0)
    assert null.shape == (6,)
    assert null.abs().max() < true.abs().min()  # swapping half the pairs cancels the real gap
    assert (null.abs() <= (lat_w > 0).float().mean(0) + (lat_l > 0).float().mean(0)).all()
    assert torch.equal(null, ex.shuffled_separation(lat_w, lat_l, seed=1))


def test_latent_cards_html_escapes_and_can_leave_texts_out():
    pairs = [PreferencePair("Is 2 < 3 & $5 *cheap*?", "Yes <b>", "No", group_id="q0")] * 2
    lat_w, lat_l = torch.tensor([[1.0, 0.0], [1.0, 0.0]]), torch.tensor([[0.0, 1.0], [0.0, 0.0]])
    d = ex.select_directions(torch.eye(2), lat_w, lat_l, k=1)
    cards = ex.latent_cards(d, lat_w, lat_l, pairs, n_latents=1, sae_source=get_profile("paper").sae_source)
    html = present.latent_cards_html(cards)
    assert "2 &lt; 3 &amp; $5 *cheap*? → Yes &lt;b&gt;" in html and "<b>" in html
    assert html.count('href="https://www.neuronpedia.org/gemma-2-2b/13-gemmascope-res-16k/') == 2
    assert "<li>" not in present.latent_cards_html(cards, quote_texts=False)


def test_split_first_keeps_pairs_and_their_states_together():
    pairs = [PreferencePair(f"q{i}", f"c{i}", f"r{i}", pair_id=f"p{i}", group_id=f"g{i}") for i in range(5)]
    split = ex.SplitStates(pairs, torch.arange(10.0).reshape(5, 2), -torch.arange(10.0).reshape(5, 2))
    head = split.first(3)
    assert [p.pair_id for p in head.pairs] == ["p0", "p1", "p2"]
    assert torch.equal(head.chosen, split.chosen[:3]) and torch.equal(head.rejected, split.rejected[:3])
    assert len(split.first(99)) == 5
