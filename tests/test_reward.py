"""Tests for srlib.reward: feature maps, losses, the head and its training, save/load, errors."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass

import pytest
import torch
from sae_lens import StandardSAE, StandardSAEConfig

from srlib.errors import ConfigError, SrlibError
from srlib.reward import (
    ACTIVATIONS,
    LOSSES,
    DenseFeatures,
    DenseRM,
    RandomFeatures,
    RewardHead,
    RewardModel,
    SparseRM,
    bce_loss,
    bt_loss,
    fit_head,
    get_loss,
    make_features,
    margin_loss,
    pair_accuracy,
)
from srlib.reward_config import ACTIVATION_NAMES, LOSS_NAMES, HeadConfig, SparseRMConfig

pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class FakeDirections:
    """The parts of srlib.directions.Directions that srlib.reward reads."""

    indices_w: torch.Tensor
    indices_l: torch.Tensor
    vectors: torch.Tensor
    normalized: bool = False

    @property
    def k(self) -> int:
        return int(self.indices_w.numel())

    @property
    def indices(self) -> torch.Tensor:
        return torch.cat([self.indices_w, self.indices_l])


def small_sae(d_in: int = 8, d_sae: int = 32, seed: int = 0) -> StandardSAE:
    torch.manual_seed(seed)
    sae = StandardSAE(StandardSAEConfig(d_in=d_in, d_sae=d_sae))
    with torch.no_grad():
        sae.W_dec.copy_(torch.randn(d_sae, d_in))
        sae.W_enc.copy_(torch.randn(d_in, d_sae))
    return sae


def directions_from_sae(sae, indices_w, indices_l) -> FakeDirections:
    idx_w, idx_l = torch.tensor(indices_w), torch.tensor(indices_l)
    return FakeDirections(idx_w, idx_l, sae.W_dec.detach()[torch.cat([idx_w, idx_l])].clone())


def separable_pairs(n: int, d: int, seed: int, margin: float = 0.5):
    """Pairs of Gaussian states where the chosen one is higher along a fixed direction w*."""
    g = torch.Generator().manual_seed(seed)
    w_star = torch.randn(d, generator=torch.Generator().manual_seed(1234))
    A, B = torch.randn(4 * n, d, generator=g), torch.randn(4 * n, d, generator=g)
    gap = (A - B) @ w_star / w_star.norm()
    keep = gap.abs() > margin
    A, B, gap = A[keep][:n], B[keep][:n], gap[keep][:n]
    chosen = torch.where((gap > 0)[:, None], A, B)
    rejected = torch.where((gap > 0)[:, None], B, A)
    assert chosen.shape == (n, d)
    return chosen, rejected


@dataclass
class FakeBackbone:
    """A stand-in with the Backbone attributes srlib.reward checks before extracting states."""

    hidden_size: int = 8
    model_id: str = "fake"
    identity: str = "fake-0"


def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert message and "\n" not in message
    return message


# ----------------------------------------------------------------------------- feature maps


def test_projection_equals_decoder_rows_of_selected_latents():
    sae = small_sae()
    dirs = directions_from_sae(sae, [3, 7, 11], [1, 30, 5])
    Z = torch.randn(5, 8)
    v = make_features("projection", directions=dirs)(Z)
    W_dec = sae.W_dec.detach()
    assert v.shape == (5, 6)
    torch.testing.assert_close(v, Z @ W_dec[[3, 7, 11, 1, 30, 5]].T)
    # first K columns are z·F_w, the next K are z·F_l (eq. 12)
    torch.testing.assert_close(v[:, 0], Z @ W_dec[3])
    torch.testing.assert_close(v[:, 3], Z @ W_dec[1])


def test_latent_features_are_the_sae_activations_of_the_selected_latents():
    pytest.importorskip("srlib.sae")
    sae = small_sae()
    dirs = directions_from_sae(sae, [3, 7], [1, 30])
    Z = torch.randn(6, 8)
    features = make_features("latents", directions=dirs, sae=sae)
    with torch.no_grad():
        expected = sae.encode(Z)[:, [3, 7, 1, 30]]
    assert features.out_dim == 4
    torch.testing.assert_close(features(Z), expected)


def test_random_features_are_seeded_unit_directions():
    a, b, c = RandomFeatures(16, 10, seed=0), RandomFeatures(16, 10, seed=0), RandomFeatures(16, 10, seed=1)
    assert a.vectors.shape == (10, 16)
    torch.testing.assert_close(a.vectors.norm(dim=1), torch.ones(10))
    assert torch.equal(a.vectors, b.vectors)
    assert not torch.allclose(a.vectors, c.vectors)
    dirs = directions_from_sae(small_sae(), [1, 2, 3], [4, 5, 6])
    assert make_features("random", directions=dirs, seed=3).vectors.shape == (6, 8)


def test_dense_features_are_the_identity():
    Z = torch.randn(4, 8)
    assert torch.equal(DenseFeatures(8)(Z), Z)


# ----------------------------------------------------------------------------- losses


def test_margin_loss_hand_value():
    # diffs s_w - s_l = [2, -1]; max(0, 1-2) = 0, max(0, 1+1) = 2; mean = 1.0
    assert margin_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), gamma=1.0).item() == pytest.approx(1.0)
    # gamma 3: max(0, 3-2) = 1, max(0, 3+1) = 4; mean = 2.5
    assert margin_loss(torch.tensor([2.0, 0.0]), torch.tensor([0.0, 1.0]), gamma=3.0).item() == pytest.approx(2.5)


def test_bt_loss_hand_value():
    # diff ln 3: sigma = 3/4, -log 0.75 = 0.2876821; diff 0: -log 0.5 = 0.6931472; mean = 0.4904146
    s_w = torch.tensor([math.log(3.0), 0.0])
    assert bt_loss(s_w, torch.zeros(2)).item() == pytest.approx(0.4904146, abs=1e-6)


def test_bce_loss_uses_absolute_labels():
    # s_w = s_l = 5: chosen -log sigma(5) = ln(1 + e^-5) = 0.0067153, rejected -log(1 - sigma(5))
    # = ln(1 + e^5) = 5.0067153; mean over both = 2.5067153. The pairwise losses only see the
    # difference 0: BT gives ln 2 = 0.6931472, margin gives gamma = 1.
    five = torch.tensor([5.0])
    assert bce_loss(five, five).item() == pytest.approx(2.5067153, abs=1e-6)
    assert bce_loss(torch.zeros(1), torch.zeros(1)).item() == pytest.approx(0.6931472, abs=1e-6)
    # s_w = 5 (label 1): ln(1 + e^-5) = 0.0067153; s_l = 0 (label 0): ln 2 = 0.6931472; mean 0.3499312
    assert bce_loss(five, torch.zeros(1)).item() == pytest.approx(0.3499312, abs=1e-6)
    assert bt_loss(five, five).item() == pytest.approx(0.6931472, abs=1e-6)
    assert margin_loss(five, five).item() == pytest.approx(1.0)


def test_loss_registry_and_bad_names():
    assert set(LOSSES) == {"margin", "bt", "bce"}
    assert tuple(LOSSES) == LOSS_NAMES and tuple(ACTIVATIONS) == ACTIVATION_NAMES  # HeadConfig allows these
    assert (LOSSES["margin"], LOSSES["bt"], LOSSES["bce"]) == (margin_loss, bt_loss, bce_loss)
    assert (ACTIVATIONS["relu"], ACTIVATIONS["gelu"], ACTIVATIONS["tanh"]) == (
        torch.nn.ReLU,
        torch.nn.GELU,
        torch.nn.Tanh,
    )
    assert get_loss("margin", gamma=2.0)(torch.tensor([0.0]), torch.tensor([0.0])).item() == pytest.approx(2.0)
    with pytest.raises(ConfigError) as error:
        get_loss("hinge")
    assert "hinge" in one_line(error)
    with pytest.raises(ConfigError):
        get_loss("margin", gamma=0.0)


def test_pair_accuracy_counts_ties_as_wrong():
    # pairs: 1 > 0 right, 2 = 2 tie (wrong), 3 < 4 wrong -> 1/3
    assert pair_accuracy(torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.0, 2.0, 4.0])) == pytest.approx(1 / 3)


# ----------------------------------------------------------------------------- head and training


def test_parameter_count_matches_the_paper_head():
    assert RewardHead(256).num_trainable_parameters() == 256 * 512 + 512 + 512 + 1 == 132_097
    assert RewardHead(576).num_trainable_parameters() == 295_937  # DenseRM on SmolLM2 (measurements.md)


def test_fit_reaches_high_accuracy_on_a_separable_problem():
    X_w, X_l = separable_pairs(300, 12, seed=0)
    Xv_w, Xv_l = separable_pairs(200, 12, seed=1)
    head, history = fit_head(X_w, X_l, Xv_w, Xv_l, HeadConfig(epochs=30, seed=0))
    with torch.no_grad():
        accuracy = pair_accuracy(head(Xv_w), head(Xv_l))
    assert accuracy > 0.95
    assert accuracy == history.best_val_accuracy
    assert history.train_loss[-1] < history.train_loss[0]


def test_fit_is_deterministic_given_the_seed():
    X_w, X_l = separable_pairs(100, 12, seed=0)
    Xv_w, Xv_l = separable_pairs(50, 12, seed=1)
    runs = [fit_head(X_w, X_l, Xv_w, Xv_l, HeadConfig(epochs=5, seed=seed))[0].state_dict() for seed in (0, 0, 1)]
    assert all(torch.equal(runs[0][name], runs[1][name]) for name in runs[0])
    assert not torch.equal(runs[0]["net.0.weight"], runs[2]["net.0.weight"])


def test_early_stopping_keeps_the_best_epoch():
    # The validation pairs are held-out pairs with chosen and rejected swapped: the better the
    # head learns the task, the worse it does there, so the best epoch comes early.
    X_w, X_l = separable_pairs(200, 12, seed=0)
    Xv_l, Xv_w = separable_pairs(100, 12, seed=1)
    head, history = fit_head(X_w, X_l, Xv_w, Xv_l, HeadConfig(epochs=40, patience=3, seed=0))
    assert history.stopped_early
    assert history.epochs_run == history.best_epoch + 3 < 40
    best = max(history.val_accuracy)
    assert history.best_epoch == history.val_accuracy.index(best) + 1
    assert history.val_accuracy[-1] < best
    with torch.no_grad():
        assert pair_accuracy(head(Xv_w), head(Xv_l)) == best


def test_without_validation_all_epochs_run():
    X_w, X_l = separable_pairs(64, 12, seed=0)
    _, history = fit_head(X_w, X_l, config=HeadConfig(epochs=4, seed=0))
    assert history.epochs_run == 4 and history.best_epoch == 4
    assert history.val_accuracy == [] and history.best_val_accuracy is None


def test_standardisation_is_fitted_on_both_sides_stored_and_applied():
    X_w, X_l = separable_pairs(50, 6, seed=0)
    X_w = X_w * 10 + 3
    X_l = X_l * 10 + 3
    X_w[:, 5] = 7.0  # a constant feature keeps scale 1
    X_l[:, 5] = 7.0
    head, _ = fit_head(X_w, X_l, config=HeadConfig(epochs=1, seed=0))
    both = torch.cat([X_w, X_l])
    torch.testing.assert_close(head.mean, both.mean(dim=0))
    torch.testing.assert_close(head.std[:5], both.std(dim=0, unbiased=False)[:5])
    assert head.std[5].item() == 1.0
    assert {"mean", "std"} <= set(head.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(head(X_w), head.net((X_w - head.mean) / head.std).squeeze(-1))
    plain, _ = fit_head(X_w, X_l, config=HeadConfig(epochs=1, seed=0, standardize=False))
    assert torch.equal(plain.mean, torch.zeros(6)) and torch.equal(plain.std, torch.ones(6))


def test_with_standardisation_rescaling_the_directions_changes_nothing():
    Z_w, Z_l = separable_pairs(120, 8, seed=0)
    sae = small_sae()
    dirs = directions_from_sae(sae, [0, 1, 2, 3], [4, 5, 6, 7])
    unit = FakeDirections(dirs.indices_w, dirs.indices_l, dirs.vectors / dirs.vectors.norm(dim=1, keepdim=True))
    Z = torch.randn(20, 8)
    scores = [SparseRM(d).fit_states(Z_w, Z_l, head=HeadConfig(epochs=5, seed=0)).score_states(Z) for d in (dirs, unit)]
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-3, atol=1e-3)


# ----------------------------------------------------------------------------- models, save / load


def fitted_sparse_rm(kind: str = "projection", k: int = 3, **kwargs) -> tuple[SparseRM, torch.Tensor]:
    sae = small_sae()
    dirs = directions_from_sae(sae, list(range(k)), list(range(k, 2 * k)))
    Z_w, Z_l = separable_pairs(80, 8, seed=0)
    Zv_w, Zv_l = separable_pairs(40, 8, seed=1)
    rm = SparseRM(dirs, kind=kind, sae=sae, layer=2, sae_source="test:small", **kwargs)
    rm.fit_states(Z_w, Z_l, Zv_w, Zv_l, head=HeadConfig(epochs=6, seed=0, loss="bt"))
    return rm, torch.randn(10, 8)


@pytest.mark.parametrize("kind", ["projection", "random"])
def test_save_load_round_trip_gives_identical_scores(tmp_path, kind):
    rm, Z = fitted_sparse_rm(kind)
    rm.save_pretrained(tmp_path / "rm")
    assert sorted(p.name for p in (tmp_path / "rm").iterdir()) == ["README.md", "config.json", "model.safetensors"]
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert type(loaded) is SparseRM
    assert torch.equal(loaded.score_states(Z), rm.score_states(Z))
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert config["rm_class"] == "SparseRM" and config["config"]["features"] == kind
    assert config["config"]["k"] == 3 and config["latent_indices"] == {"w": [0, 1, 2], "l": [3, 4, 5]}
    assert config["config"]["head"] == {**HeadConfig(epochs=6, seed=0, loss="bt").to_dict()}
    assert config["config"]["layer"] == 2 and config["config"]["sae_source"] == "test:small"
    assert loaded.rm_config == rm.rm_config and loaded.rm_config.head.loss == "bt"
    assert config["sae"]["source"] == "test:small" and config["sae"]["d_sae"] == 32
    assert config["history"]["best_epoch"] == rm.history.best_epoch
    assert loaded.num_trainable_parameters() == rm.num_trainable_parameters() == 6 * 512 + 1025


def test_save_load_round_trip_latent_features(tmp_path):
    pytest.importorskip("srlib.sae")
    rm, Z = fitted_sparse_rm("latents")
    rm.save_pretrained(tmp_path / "rm")
    loaded = SparseRM.from_pretrained(tmp_path / "rm")
    assert torch.equal(loaded.score_states(Z), rm.score_states(Z))


def test_dense_rm_round_trip_and_parameter_count(tmp_path):
    Z_w, Z_l = separable_pairs(60, 8, seed=0)
    rm = DenseRM().fit_states(Z_w, Z_l, head=HeadConfig(epochs=3, seed=0))
    assert rm.num_trainable_parameters() == 8 * 512 + 1025
    rm.save_pretrained(tmp_path / "dense")
    loaded = RewardModel.from_pretrained(tmp_path / "dense")
    assert type(loaded) is DenseRM
    Z = torch.randn(5, 8)
    assert torch.equal(loaded.score_states(Z), rm.score_states(Z))


def test_sparse_rm_parameter_count_for_k_128():
    d = 16
    sae = small_sae(d_in=d, d_sae=300)
    dirs = directions_from_sae(sae, list(range(128)), list(range(128, 256)))
    Z_w, Z_l = separable_pairs(20, d, seed=0)
    assert SparseRM(dirs).fit_states(Z_w, Z_l, head=HeadConfig(epochs=1)).num_trainable_parameters() == 132_097


def test_saving_again_replaces_the_folder(tmp_path):
    rm, Z = fitted_sparse_rm()
    rm.save_pretrained(tmp_path / "rm")
    dense = DenseRM().fit_states(*separable_pairs(30, 8, seed=0), head=HeadConfig(epochs=1))
    dense.save_pretrained(tmp_path / "rm")
    assert type(RewardModel.from_pretrained(tmp_path / "rm")) is DenseRM
    assert [p.name for p in tmp_path.iterdir()] == ["rm"]  # no temporary folder left behind


# ----------------------------------------------------------------------------- errors


def test_loading_a_folder_that_is_not_a_reward_model(tmp_path):
    with pytest.raises(SrlibError) as error:
        RewardModel.from_pretrained(tmp_path)
    assert one_line(error) == f"{tmp_path} is not a saved reward model: config.json missing"
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(SrlibError) as error:
        RewardModel.from_pretrained(tmp_path)
    assert "not a saved reward model" in one_line(error)


def test_bad_feature_kind():
    with pytest.raises(ConfigError) as error:
        make_features("pca", d=8)
    assert "pca" in one_line(error)
    dirs = directions_from_sae(small_sae(), [0], [1])
    with pytest.raises(ConfigError):
        SparseRM(dirs, kind="dense")


def test_k_larger_than_the_sae_and_widths_that_disagree():
    sae = small_sae(d_in=8, d_sae=32)
    with pytest.raises(ConfigError) as error:
        SparseRM.fit(FakeBackbone(hidden_size=8), ["pair"], config=SparseRMConfig(layer=0, k=33), sae=sae)
    assert "32 latents" in one_line(error)
    with pytest.raises(ConfigError) as error:
        SparseRM.fit(FakeBackbone(hidden_size=12), ["pair"], config=SparseRMConfig(layer=0, k=4), sae=sae)
    assert "width 8" in one_line(error) and "12" in one_line(error)
    dirs = FakeDirections(torch.tensor([0]), torch.tensor([1]), torch.randn(2, 10))
    with pytest.raises(ConfigError):
        SparseRM(dirs, sae=sae)  # directions of width 10, SAE of width 8


def test_bad_state_shapes_and_empty_sets():
    dirs = directions_from_sae(small_sae(), [0, 1], [2, 3])
    rm = SparseRM(dirs)
    with pytest.raises(ConfigError) as error:
        rm.fit_states(torch.randn(10, 8), torch.randn(9, 8))
    assert "differ in shape" in one_line(error)
    with pytest.raises(ConfigError) as error:
        rm.fit_states(torch.randn(10, 6), torch.randn(10, 6))
    assert "width" in one_line(error)
    with pytest.raises(ConfigError) as error:
        rm.fit_states(torch.zeros(0, 8), torch.zeros(0, 8))
    assert "empty" in one_line(error)
    with pytest.raises(ConfigError):
        rm.fit_states(torch.randn(10, 8), torch.randn(10, 8), torch.randn(5, 8))
    with pytest.raises(ConfigError) as error:
        rm.score_states(torch.randn(3, 8))
    assert "not fitted" in one_line(error)
    with pytest.raises(ConfigError) as error:
        SparseRM.fit(FakeBackbone(), [], config=SparseRMConfig(layer=0, k=2), sae=small_sae())
    assert "empty" in one_line(error)


# ----------------------------------------------------------------------------- from text, through a backbone


def tiny_pairs(n: int, offset: int = 0):
    from srlib.data import PreferencePair

    return [
        PreferencePair(
            prompt=f"Question {i}: is {i} even?",
            chosen=f"{'Yes' if i % 2 == 0 else 'No'}, {i}.",
            rejected=f"{'No' if i % 2 == 0 else 'Yes'}, {i}!",
            pair_id=str(i),
        )
        for i in range(offset, offset + n)
    ]


def test_dense_rm_fits_from_pairs_and_scores_through_a_reloaded_backbone(tiny_backbone, isolated_cache, tmp_path):
    from srlib.activations import pair_states

    train, val, test = tiny_pairs(16), tiny_pairs(8, 100), tiny_pairs(6, 200)
    config = SparseRMConfig(features="dense", k=None, layer=1, max_length=64, head=HeadConfig(epochs=3))
    rm = DenseRM.fit(tiny_backbone, train, val, config=config, progress=False)
    assert rm.rm_config == config
    assert rm.layer == 1 and rm.backbone_record["identity"] == tiny_backbone.identity
    s_w, s_l = rm.score_pairs(test)
    Z_w, Z_l = pair_states(tiny_backbone, test, 1, max_length=64, progress=False)
    assert s_w.dtype == torch.float32 and s_w.shape == (6,)
    assert torch.equal(s_w, rm.score_states(Z_w)) and torch.equal(s_l, rm.score_states(Z_l))
    rm.save_pretrained(tmp_path / "rm")
    assert SparseRMConfig.from_dict(json.loads((tmp_path / "rm" / "config.json").read_text())["config"]) == config
    loaded = RewardModel.from_pretrained(tmp_path / "rm")  # no backbone: loaded from the saved id on use
    assert all(torch.equal(a, b) for a, b in zip(loaded.score_pairs(test), (s_w, s_l), strict=True))
    assert [t.shape for t in loaded.score_pairs([])] == [(0,), (0,)]


def test_a_model_read_under_autocast_reloads_its_backbone_the_same_way(isolated_cache, tmp_path):
    from srlib.backbone import load_backbone
    from srlib.profiles import TINY_MODEL_ID

    low = load_backbone(TINY_MODEL_ID, device="cpu", autocast=torch.bfloat16)
    config = SparseRMConfig(features="dense", k=None, layer=1, max_length=64, head=HeadConfig(epochs=3))
    rm = DenseRM.fit(low, tiny_pairs(16), tiny_pairs(8, 100), config=config, progress=False)
    scores = rm.score_pairs(tiny_pairs(6, 200))
    rm.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())["backbone"]
    assert saved["autocast"] == "bfloat16" and saved["identity"] == low.identity
    loaded = RewardModel.from_pretrained(tmp_path / "rm")  # no backbone: loaded as it was read, under autocast
    assert all(torch.equal(a, b) for a, b in zip(loaded.score_pairs(tiny_pairs(6, 200)), scores, strict=True))
    assert loaded.backbone.autocast is torch.bfloat16


def test_sparse_rm_fits_from_pairs(tiny_backbone, isolated_cache):
    pytest.importorskip("srlib.sae")
    sae = small_sae(d_in=tiny_backbone.hidden_size, d_sae=64)
    config = SparseRMConfig(k=4, layer=1, max_length=64, head=HeadConfig(epochs=2))
    rm = SparseRM.fit(tiny_backbone, tiny_pairs(16), tiny_pairs(8, 100), config=config, sae=sae, progress=False)
    assert rm.k == 4 and len(rm.indices_w) == len(rm.indices_l) == 4
    torch.testing.assert_close(rm.features.vectors, sae.W_dec.detach()[rm.directions.indices])
    assert rm.score_pairs(tiny_pairs(3, 200))[0].shape == (3,)


@pytest.mark.parametrize("kind", ["projection", "latents", "random"])
def test_fit_builds_the_model_its_config_describes(tiny_backbone, isolated_cache, tmp_path, kind):
    """SparseRM.fit(config=...) is the states the config reads, `select_directions`, the config's
    feature map (random directions drawn with the head's seed) and `fit_head` with `config.head`:
    the same directions and the same head weights; `rm_config` and config.json give the config back."""
    from srlib.activations import pair_states
    from srlib.directions import select_directions
    from srlib.sae import encode

    sae = small_sae(d_in=tiny_backbone.hidden_size, d_sae=64)
    head_config = HeadConfig(epochs=3, hidden=16, seed=3)
    config = SparseRMConfig(
        features=kind, k=4, layer=1, sae_source="test:small", position="answer", max_length=64, head=head_config
    )
    train, val = tiny_pairs(16), tiny_pairs(8, 100)
    rm = SparseRM.fit(tiny_backbone, train, val, config=config, sae=sae, progress=False)

    Z_w, Z_l = pair_states(tiny_backbone, train, 1, max_length=64, position="answer", progress=False)
    Zv_w, Zv_l = pair_states(tiny_backbone, val, 1, max_length=64, position="answer", progress=False)
    directions = select_directions(sae, encode(sae, Z_w), encode(sae, Z_l), 4)
    features = make_features(kind, directions=directions, sae=sae, seed=3)
    head, history = fit_head(features(Z_w), features(Z_l), features(Zv_w), features(Zv_l), head_config)

    assert (rm.indices_w, rm.indices_l) == (directions.indices_w.tolist(), directions.indices_l.tolist())
    assert rm.features.state_dict().keys() == features.state_dict().keys()
    assert all(torch.equal(t, features.state_dict()[name]) for name, t in rm.features.state_dict().items())
    assert rm.head.state_dict().keys() == head.state_dict().keys()
    assert all(torch.equal(t, head.state_dict()[name]) for name, t in rm.head.state_dict().items())
    assert rm.history.best_epoch == history.best_epoch
    assert rm.rm_config == config
    rm.save_pretrained(tmp_path / "rm")
    assert SparseRMConfig.from_dict(json.loads((tmp_path / "rm" / "config.json").read_text())["config"]) == config


def test_a_config_fit_cannot_build_is_refused_in_one_line_before_any_state_is_read(monkeypatch):
    import srlib.activations

    def no_extraction(*args, **kwargs):
        raise AssertionError("hidden states were extracted")

    monkeypatch.setattr(srlib.activations, "pair_states", no_extraction)
    with pytest.raises(ConfigError) as error:
        SparseRMConfig(k=4, layr=1)  # a typo fails where the config is written
    assert "unknown SparseRMConfig field 'layr' (did you mean 'layer'?)" in one_line(error)
    cases = [
        (SparseRM, {"k": 4, "layer": 1}, "SparseRM.fit takes config=SparseRMConfig(...), got dict"),
        (SparseRM, SparseRMConfig(features="dense", k=None, layer=1), "cannot fit features='dense'; use DenseRM.fit"),
        (DenseRM, SparseRMConfig(layer=1), "DenseRM.fit cannot fit features='projection'; use SparseRM.fit"),
        (SparseRM, SparseRMConfig(k=4), "SparseRM.fit needs config.layer"),
        (SparseRM, SparseRMConfig(k=33, layer=1), "k=33 is out of range: the SAE has 32 latents"),
    ]
    for cls, config, message in cases:
        sae = {"sae": small_sae()} if cls is SparseRM else {}
        with pytest.raises(ConfigError) as error:
            cls.fit(FakeBackbone(), ["pair"], config=config, **sae)
        assert message in one_line(error)


def test_a_saved_and_loaded_sparserm_scores_the_same_bits(tmp_path, smoke_profile, tiny_backbone):
    """A loaded model scores exactly as the model that was saved (the direction matrix read from
    the file once sent the one-row products down another kernel: last-bit differences)."""
    import os

    if not os.environ.get("SRLIB_DATA_DIR"):
        pytest.skip("SRLIB_DATA_DIR is unset: set it to the folder with truthfulqa/, ...")
    from srlib.experiments import dataset_states, fit_variant, select_for
    from srlib.sae import sae_for_profile

    sae = sae_for_profile(smoke_profile, tiny_backbone, progress=False)
    for name in ("hh-harmless", "truthfulqa"):
        states = dataset_states(tiny_backbone, name, smoke_profile, progress=False)
        model, _ = fit_variant(states, features="projection", directions=select_for(states, sae, 8), seed=0)
        model.save_pretrained(tmp_path / name)
        loaded = RewardModel.from_pretrained(tmp_path / name, backbone=tiny_backbone)
        Z = torch.cat([states.test.chosen, states.test.rejected])
        assert torch.equal(loaded.score_states(Z), model.score_states(Z))
