"""Tests for srlib.reward_config: HeadConfig and SparseRMConfig are validated where they are
built, round-trip through their versioned dict form, and are what a saved reward model's
config.json stores; folders saved before them (format 1) still load and score the same."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from test_reward import directions_from_sae, separable_pairs, small_sae

from srlib.errors import ConfigError, SrlibError
from srlib.profiles import PROFILES
from srlib.reward import DenseRM, RewardModel, SparseRM, fit_head
from srlib.reward_config import HeadConfig, SparseRMConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def one_line(error: pytest.ExceptionInfo) -> str:
    text = str(error.value)
    assert "\n" not in text, text
    return text


# ----------------------------------------------------------------------------- construction


def test_a_typod_field_fails_at_construction_naming_it_and_the_fields():
    with pytest.raises(ConfigError) as error:
        HeadConfig(epoch=3)
    text = one_line(error)
    assert "'epoch'" in text and "did you mean 'epochs'" in text and "patience" in text
    with pytest.raises(ConfigError, match="did you mean 'loss'"):
        dataclasses.replace(HeadConfig(), los="bt")  # a study varying one field misspells it


@pytest.mark.parametrize(
    "field, value, allowed",
    [
        ("loss", "mragin", "margin, bt, bce"),
        ("activation", "sigmoid", "relu, gelu, tanh"),
        ("lr", 0.0, "finite number > 0"),
        ("gamma", float("inf"), "finite number > 0"),
        ("weight_decay", -1e-4, "finite number >= 0"),
        ("epochs", 0, "integer >= 1"),
        ("batch_size", 8.0, "integer >= 1"),
        ("patience", True, "integer >= 1"),
        ("hidden", -5, "integer >= 1"),
        ("seed", "0", "integer >= 0"),
        ("standardize", 1, "True or False"),
    ],
)
def test_a_bad_value_fails_at_construction_naming_the_field_and_the_allowed_values(field, value, allowed):
    with pytest.raises(ConfigError) as error:
        HeadConfig(**{field: value})
    text = one_line(error)
    assert text.startswith(f"HeadConfig.{field}={value!r} is not allowed") and allowed in text


def test_head_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        HeadConfig().loss = "bt"  # type: ignore[misc]


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(features="quantum"), "features"),
        (dict(position="first"), "position"),
        (dict(k=0), "k"),
        (dict(features="projection", k=None), "k"),
        (dict(layer=-1), "layer"),
        (dict(max_length=0), "max_length"),
        (dict(head={"loss": "bt"}), "head"),
        (dict(features="dense"), "k"),  # the default K of 128: a DenseRM has none
        (dict(features="dense", k=None, sae_source="train"), "sae_source"),
    ],
)
def test_sparse_rm_config_validates_its_fields(changes, field):
    with pytest.raises(ConfigError, match=rf"^SparseRMConfig\.{field}="):
        SparseRMConfig(**changes)
    assert SparseRMConfig(features="dense", k=None).k is None  # DenseRM has no K


def test_fit_head_takes_a_head_config():
    X = torch.randn(8, 3)
    with pytest.raises(ConfigError, match="HeadConfig"):
        fit_head(X + 1, X, config={"epochs": 1})  # type: ignore[arg-type]
    head, history = fit_head(X + 1, X, config=HeadConfig(epochs=2, hidden=3, activation="tanh"))
    assert history.epochs_run == 2 and head.hidden == 3 and head.activation == "tanh"
    assert history.head_config() == HeadConfig(epochs=2, hidden=3, activation="tanh")


# ----------------------------------------------------------------------------- the dict form


def test_to_dict_from_dict_round_trip_through_json():
    head = HeadConfig(
        loss="bce",
        gamma=0.5,
        lr=3e-3,
        weight_decay=1e-5,
        epochs=7,
        batch_size=16,
        patience=2,
        hidden=32,
        activation="gelu",
        standardize=False,
        seed=4,
    )
    config = SparseRMConfig(
        features="latents", k=16, layer=3, sae_source="train", position="answer", max_length=96, head=head
    )
    data = json.loads(json.dumps(config.to_dict()))
    assert data["config_version"] == 1 and data["head"]["config_version"] == 1 and data["head"]["loss"] == "bce"
    assert SparseRMConfig.from_dict(data) == config
    assert HeadConfig.from_dict(json.loads(json.dumps(head.to_dict()))) == head
    assert HeadConfig.from_dict({"config_version": 1, "loss": "bt"}) == HeadConfig(loss="bt")  # the rest: defaults


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"config_version": 2, "loss": "bt"}, "config_version 2 is not one this srlib reads (1); upgrade srlib"),
        ({"loss": "bt"}, "config_version None"),
        ({"config_version": 1, "learning_rate": 0.1}, "unknown HeadConfig field 'learning_rate'; fix or remove it"),
        ({"config_version": 1, "epochs": 0}, "HeadConfig.epochs=0 is not allowed"),
        (["margin"], "not a JSON object"),
    ],
)
def test_from_dict_refuses_an_unknown_version_or_key_in_one_line_naming_the_file(data, expected):
    with pytest.raises(ConfigError) as error:
        HeadConfig.from_dict(data, source="rm/config.json")
    text = one_line(error)
    assert text.startswith("rm/config.json: ") and expected in text, text


def test_a_misspelt_key_in_a_nested_head_names_the_file():
    data = SparseRMConfig(k=4).to_dict()
    data["head"]["gama"] = 2.0
    with pytest.raises(ConfigError, match=r"^x/config.json: unknown HeadConfig field 'gama' \(did you mean 'gamma'"):
        SparseRMConfig.from_dict(data, source="x/config.json")


# ----------------------------------------------------------------------------- saved reward models


def _fitted_sparse_rm(head: HeadConfig) -> SparseRM:
    sae = small_sae()
    rm = SparseRM(directions_from_sae(sae, [0, 1, 2], [3, 4, 5]), layer=2, sae_source="test:small", position="answer")
    return rm.fit_states(*separable_pairs(60, 8, seed=0), *separable_pairs(30, 8, seed=1), head=head)


def test_saved_config_json_holds_the_head_config_and_loading_rebuilds_it(tmp_path):
    head = HeadConfig(loss="bt", epochs=4, hidden=16, seed=3, patience=2)
    rm = _fitted_sparse_rm(head)
    rm.save_pretrained(tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "config.json").read_text())
    assert saved["format_version"] == 2
    assert (
        saved["config"]
        == SparseRMConfig(
            features="projection", k=3, layer=2, sae_source="test:small", position="answer", max_length=512, head=head
        ).to_dict()
    )
    loaded = RewardModel.from_pretrained(tmp_path / "rm")
    assert loaded.rm_config == rm.rm_config and loaded.rm_config.head == head
    Z = torch.randn(7, 8)
    assert torch.equal(loaded.score_states(Z), rm.score_states(Z))


def _as_format_1(config: dict) -> dict:
    """A format-2 config.json written the way srlib wrote it before `SparseRMConfig` (format 1):
    the model's settings as top-level keys, the head's shape under "head", its training settings
    only in the history."""
    rm = config.pop("config")
    return {
        **config,
        "format_version": 1,
        "feature_kind": rm["features"],
        "head": {
            "in_dim": config["features"]["out_dim"],
            "hidden": rm["head"]["hidden"],
            "activation": rm["head"]["activation"],
        },
        "layer": rm["layer"],
        "max_length": rm["max_length"],
        "position": rm["position"],
        "k": rm["k"],
        "loss": rm["head"]["loss"],
        "gamma": rm["head"]["gamma"],
        "seed": rm["head"]["seed"],
    }


@pytest.mark.parametrize("kind", ["sparse", "dense", "dense before read positions"])
def test_an_old_format_folder_still_loads_and_scores_identically(tmp_path, kind):
    head = HeadConfig(epochs=3, hidden=8, seed=1)
    if kind == "sparse":
        rm = _fitted_sparse_rm(head)
    else:
        rm = DenseRM(8, layer=1, max_length=32).fit_states(*separable_pairs(40, 8, seed=0), head=head)
    folder = tmp_path / "rm"
    rm.save_pretrained(folder)
    old = _as_format_1(json.loads((folder / "config.json").read_text()))
    if kind == "dense before read positions":
        del old["position"], old["backbone"]["weights"]
    (folder / "config.json").write_text(json.dumps(old))
    loaded = RewardModel.from_pretrained(folder)
    assert type(loaded) is type(rm)
    Z = torch.randn(9, 8)
    assert torch.equal(loaded.score_states(Z), rm.score_states(Z))
    assert loaded.rm_config == rm.rm_config and loaded.rm_config.head == head
    loaded.save_pretrained(tmp_path / "again")  # and is saved again in the new format
    assert json.loads((tmp_path / "again" / "config.json").read_text())["config"]["head"] == head.to_dict()


def test_a_bad_value_in_a_saved_config_is_one_line_naming_the_file(tmp_path):
    rm = DenseRM(8, layer=1).fit_states(*separable_pairs(20, 8, seed=0), head=HeadConfig(epochs=1, hidden=4))
    rm.save_pretrained(tmp_path / "rm")
    path = tmp_path / "rm" / "config.json"
    config = json.loads(path.read_text())
    config["config"]["head"]["loss"] = "hinge"
    path.write_text(json.dumps(config))
    with pytest.raises(SrlibError) as error:
        RewardModel.from_pretrained(tmp_path / "rm")
    assert one_line(error).startswith(f"{path}: HeadConfig.loss='hinge' is not allowed; choose one of")


# ----------------------------------------------------------------------------- where the config comes from


def test_every_profile_holds_a_valid_default_head_config():
    for profile in PROFILES.values():
        assert isinstance(profile.head, HeadConfig)
    assert PROFILES["cpu"].head == HeadConfig()  # the book's defaults: margin loss, standardised inputs


@pytest.mark.parametrize("name", list(PROFILES))
def test_a_profiles_reward_model_config_comes_from_its_own_fields(name):
    profile = PROFILES[name].replace(k=7, position="answer", head=HeadConfig(epochs=2))
    config = profile.sparserm_config("latents")
    assert config == SparseRMConfig(
        features="latents",
        k=7,
        layer=profile.layer,
        sae_source=profile.sae_source,
        position="answer",
        max_length=profile.max_length,
        head=HeadConfig(epochs=2),
    )
    assert profile.sparserm_config().features == "projection"
    dense = profile.sparserm_config("dense", head=HeadConfig(loss="bt"))
    assert (dense.k, dense.sae_source, dense.layer, dense.head) == (None, None, profile.layer, HeadConfig(loss="bt"))
    with pytest.raises(ConfigError, match=r"^SparseRMConfig\.features='pca' is not allowed"):
        profile.sparserm_config("pca")


def test_a_study_varies_one_field_of_the_profiles_head(monkeypatch):
    """fit_variant trains with the states' (the profile's) HeadConfig unless given one; the trial's
    seed sets the head's seed; a changed field reaches the saved settings."""
    from srlib import experiments as ex

    Z_w, Z_l = separable_pairs(60, 8, seed=0)
    Zv_w, Zv_l = separable_pairs(20, 8, seed=1)
    split = lambda a, b: ex.SplitStates([None] * len(a), a, b)  # noqa: E731
    states = ex.DatasetStates(
        "toy", 1, split(Z_w, Z_l), split(Zv_w, Zv_l), split(Zv_w, Zv_l), head=HeadConfig(epochs=3, hidden=8)
    )
    model, trial = ex.fit_variant(states, features="dense", seed=2)
    assert model.rm_config.head == HeadConfig(epochs=3, hidden=8, seed=2)
    bt = dataclasses.replace(states.head, loss="bt")
    model, _ = ex.fit_variant(states, features="dense", seed=5, head=bt)
    assert model.rm_config.head == dataclasses.replace(bt, seed=5) and model.history.settings["loss"] == "bt"


def test_a_model_fitted_on_states_reads_texts_as_the_states_were_read():
    """The layer, token position and length limit of the states travel to the fitted model (and its
    saved config), so it scores new texts the way its training pairs were read."""
    from srlib import experiments as ex

    Z_w, Z_l = separable_pairs(40, 8, seed=0)
    split = lambda a, b: ex.SplitStates([None] * len(a), a, b)  # noqa: E731
    states = ex.DatasetStates(
        "toy", 3, split(Z_w, Z_l), split(Z_w, Z_l), split(Z_w, Z_l), position="answer", max_length=96,
        head=HeadConfig(epochs=2, hidden=8),
    )  # fmt: skip
    model, _ = ex.fit_variant(states, features="dense", score_test=False)
    config = model.rm_config
    assert (config.layer, config.position, config.max_length) == (3, "answer", 96)


@pytest.mark.parametrize("flags, field", [(["--seed", "-1"], "seed"), (["--gamma", "0"], "gamma")])
def test_the_cli_refuses_a_bad_head_setting_in_one_line_before_loading_anything(
    flags, field, tmp_path, capsys, monkeypatch
):
    import srlib.backbone
    import srlib.data
    from srlib.cli import main

    def never(*args, **kwargs):
        raise AssertionError("loaded data or a backbone before checking the head's settings")

    monkeypatch.setattr(srlib.backbone, "backbone_for_profile", never)
    monkeypatch.setattr(srlib.data, "load_pairs", never)
    code = main(["fit", "--profile", "smoke", "--train", "truthfulqa:train", "--out", str(tmp_path / "rm"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and f"HeadConfig.{field}=" in err, err
    assert not (tmp_path / "rm").exists()
