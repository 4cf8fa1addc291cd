"""srlib.sae: source parsing, the pretrained path (mocked), metrics with known answers, training."""

import dataclasses
import json
import os
from types import SimpleNamespace

import pytest
import torch
from sae_lens import SAE, TopKSAE, TopKSAEConfig

import srlib.sae as sae_mod
from srlib import activations
from srlib.activations import _decoder_layers, iter_token_activations_at_layers
from srlib.backbone import format_pair, format_text, load_backbone
from srlib.data import load_pairs
from srlib.errors import ConfigError, DataError
from srlib.profiles import TINY_MODEL_ID, SAETrainingConfig, get_profile
from srlib.sae import (
    INFO_FILENAME,
    SAESource,
    encode,
    parse_sae_source,
    sae_for_profile,
    sae_info,
    sae_report,
    train_sae,
)

GEMMA = "sae-lens:gemma-scope-2b-pt-res-canonical/layer_13/width_16k/canonical"


def identity_sae(d: int = 4) -> TopKSAE:
    """f = relu([z, -z]) and z_hat = relu(z) - relu(-z) = z exactly (k = d_sae keeps all)."""
    sae = TopKSAE(TopKSAEConfig(d_in=d, d_sae=2 * d, k=2 * d, rescale_acts_by_decoder_norm=False))
    eye = torch.eye(d)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], dim=1))
        sae.W_dec.copy_(torch.cat([eye, -eye], dim=0))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    return sae


# ---------------------------------------------------------------------------- sources


def test_parse_sae_source():
    assert parse_sae_source("train") == SAESource("train")
    src = parse_sae_source(GEMMA)
    assert (src.kind, src.release, src.sae_id) == (
        "sae-lens",
        "gemma-scope-2b-pt-res-canonical",
        "layer_13/width_16k/canonical",
    )


def test_parse_sae_source_local_folder(tmp_path):
    identity_sae().save_model(tmp_path / "mine")
    src = parse_sae_source(str(tmp_path / "mine"))
    assert src.kind == "disk" and src.path == tmp_path / "mine"


@pytest.mark.parametrize(
    "bad", ["sae-lens:gemma-scope", "sae-lens:/layer_13", "sae-lens:rel/", "gemma-scope-2b", "", "TRAIN"]
)
def test_bad_sae_source_is_one_line_config_error(bad, tmp_path):
    with pytest.raises(ConfigError, match="bad sae_source") as err:
        parse_sae_source(bad)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        parse_sae_source(str(tmp_path))  # a folder without cfg.json


def fake_backbone(hidden_size: int):
    return SimpleNamespace(hidden_size=hidden_size, device=torch.device("cpu"))


def test_paper_profile_loads_gemma_scope_through_from_pretrained(monkeypatch):
    calls = []

    def from_pretrained(release, sae_id, device="cpu", **kw):
        calls.append((release, sae_id, device))
        sae = TopKSAE(TopKSAEConfig(d_in=2304, d_sae=8, k=2))
        sae.cfg.metadata.hook_name = "blocks.13.hook_resid_post"
        return sae

    monkeypatch.setattr(SAE, "from_pretrained", from_pretrained)
    sae = sae_for_profile(get_profile("paper"), fake_backbone(2304))
    assert calls == [("gemma-scope-2b-pt-res-canonical", "layer_13/width_16k/canonical", "cpu")]
    assert sae.cfg.d_in == 2304
    with pytest.raises(ConfigError, match="width mismatch.*2304.*2048"):
        sae_for_profile(get_profile("paper"), fake_backbone(2048))
    with pytest.raises(ConfigError, match="layer mismatch"):
        sae_for_profile(get_profile("paper").replace(layer=12), fake_backbone(2304))


def test_pretrained_failure_is_one_line_config_error(monkeypatch):
    def from_pretrained(release, sae_id, device="cpu", **kw):
        raise ValueError(f"Release {release} not found.\nValid releases are: ...")

    monkeypatch.setattr(SAE, "from_pretrained", from_pretrained)
    with pytest.raises(ConfigError, match="cannot load SAE nope/x") as err:
        sae_mod.load_pretrained_sae("nope", "x")
    assert "\n" not in str(err.value)


def test_profile_with_a_local_sae_folder(tmp_path):
    identity_sae(4).save_model(tmp_path / "mine")
    profile = get_profile("smoke").replace(sae_source=str(tmp_path / "mine"))
    sae = sae_for_profile(profile, fake_backbone(4))
    torch.testing.assert_close(sae.W_dec, identity_sae(4).W_dec)
    with pytest.raises(ConfigError, match="width mismatch"):
        sae_for_profile(profile, fake_backbone(5))


# ---------------------------------------------------------------------------- metrics


def test_encode_is_relu_of_both_signs():
    z = torch.randn(10, 4)
    f = encode(identity_sae(), z)
    assert f.dtype == torch.float32 and f.shape == (10, 8)
    torch.testing.assert_close(f, torch.cat([z.relu(), (-z).relu()], dim=1))


def test_width_mismatch_is_one_line_config_error():
    with pytest.raises(ConfigError, match="4-dimensional.*5") as err:
        encode(identity_sae(4), torch.randn(3, 5))
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        sae_report(identity_sae(4), torch.randn(3, 5))


def test_report_of_an_exact_reconstruction():
    z = torch.randn(200, 4)
    z[:, 0] = z[:, 0].abs() + 0.1  # latent 4 (= relu(-z_0)) never fires
    report = sae_report(identity_sae(), z)
    assert report.fve == pytest.approx(1.0, abs=1e-6)
    assert report.l0 == 4.0  # one of relu(z_i), relu(-z_i) per coordinate
    assert report.dead_fraction == 1 / 8
    assert report.n == 200
    assert report.as_dict() == {"l0": 4.0, "fve": report.fve, "dead_fraction": 0.125, "n": 200}


def test_report_of_a_zero_decoder():
    z = torch.randn(100, 4) + 3.0
    sae = identity_sae()
    with torch.no_grad():
        sae.W_dec.zero_()
    assert sae_report(sae, z).fve < -1  # predicts 0, far from the mean of 3
    with torch.no_grad():
        sae.b_dec.copy_(z.mean(dim=0))  # predicts the mean: FVE exactly 0
    assert sae_report(sae, z).fve == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(DataError):
        sae_report(sae, torch.zeros(0, 4))


# ---------------------------------------------------------------------------- training data


def test_batches_mix_in_the_last_token_share():
    tokens, last = torch.zeros(50, 3), torch.ones(7, 3)
    batches = sae_mod._mixed_batches(tokens, last, 8, 0.25, torch.Generator().manual_seed(0))
    for _ in range(10):
        batch = next(batches)
        assert batch.shape == (8, 3) and int(batch[:, 0].sum()) == 2
    only_tokens = sae_mod._mixed_batches(tokens, last, 8, 0.0, torch.Generator().manual_seed(0))
    assert next(only_tokens).sum() == 0
    only_read_rows = sae_mod._mixed_batches(tokens, last, 8, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(next(only_read_rows), torch.ones(8, 3))  # the lever's far end: every row a read state


def test_each_pass_is_a_permutation():
    rows = torch.arange(5.0).unsqueeze(1)
    chunks = sae_mod._shuffled_rows(rows, 2, torch.Generator().manual_seed(0))
    drawn = torch.cat([next(chunks) for _ in range(5)]).flatten().tolist()
    assert sorted(drawn[:5]) == [0, 1, 2, 3, 4] and sorted(drawn[5:]) == [0, 1, 2, 3, 4]


def test_outlier_rows_are_dropped():
    rows = torch.randn(100, 8)
    rows[17] *= 1000.0  # an attention-sink-like row
    kept = sae_mod._without_outliers(rows)
    assert len(kept) == 99 and not (kept.norm(dim=1) > 100).any()


# ---------------------------------------------------------------------------- training

TINY_CONFIG = SAETrainingConfig(d_sae=32, k=4, training_tokens=64 * 15, batch_size=64, lr=3e-3, lr_end=3e-4)


@pytest.fixture(scope="module")
def texts(tiny_backbone):
    subjects = ["the cat", "a dolphin", "my neighbour", "the river", "this recipe", "the moon"]
    verbs = ["sleeps in the sun", "is a mammal", "asked for help", "floods in spring", "needs more salt"]
    return [
        format_text(tiny_backbone.tokenizer, f"Tell me about {s}.", f"I think {s} {v}.")
        for s in subjects
        for v in verbs
    ]


@pytest.fixture
def count_trainings(monkeypatch):
    """Counts how many times an sae-lens SAETrainer is built (i.e. an SAE is trained)."""
    calls = []

    class Counting(sae_mod.SAETrainer):
        def __init__(self, cfg, *args, **kwargs):
            calls.append(1)
            windows.append(cfg.dead_feature_window)
            super().__init__(cfg, *args, **kwargs)

    windows: list[int] = []
    Counting.windows = windows

    monkeypatch.setattr(sae_mod, "SAETrainer", Counting)
    return calls


def test_train_sae_saves_a_loadable_sae_lens_sae(tiny_backbone, texts, isolated_cache, count_trainings):
    sae = train_sae(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64, progress=False)
    assert count_trainings == [1]
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 4
    assert sae.W_dec.shape == (32, tiny_backbone.hidden_size)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))  # folded at save
    (folder,) = (isolated_cache / "sae").iterdir()
    assert {"cfg.json", "sae_weights.safetensors", INFO_FILENAME} <= set(os.listdir(folder))
    reloaded = SAE.load_from_disk(folder)
    torch.testing.assert_close(reloaded.W_dec, sae.W_dec)
    info = json.loads((folder / INFO_FILENAME).read_text())
    assert info == sae_info(sae) == sae_info(reloaded)
    assert info["key_parts"]["layer"] == 2 and info["key_parts"]["n_texts"] == len(texts)
    assert info["corpus"]["n_heldout_texts"] == 2  # 5% of 30, rounded
    assert info["heldout"]["last_tokens"]["n"] == 2
    assert info["training"]["samples_seen"] == 64 * 15
    assert sae.cfg.metadata.hook_name == "blocks.2.hook_resid_post"
    assert sae_mod.SAETrainer.windows == [15 // 10]  # the default window: a tenth of 15 steps


def test_second_call_loads_and_another_config_trains_anew(
    tiny_backbone, texts, isolated_cache, count_trainings, monkeypatch
):
    extractions = []

    def counting_stream(*args, **kwargs):
        extractions.append(1)
        return iter_token_activations_at_layers(*args, **kwargs)

    monkeypatch.setattr(sae_mod, "iter_token_activations_at_layers", counting_stream)
    first = train_sae(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64, progress=False)
    assert count_trainings == [1] and extractions == [1, 1]  # training texts, held-out texts
    again = train_sae(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64, progress=False)
    assert count_trainings == [1] and extractions == [1, 1]
    torch.testing.assert_close(again.W_dec, first.W_dec)
    other = train_sae(tiny_backbone, 2, texts, dataclasses.replace(TINY_CONFIG, seed=1), max_length=64, progress=False)
    assert count_trainings == [1, 1]
    assert extractions == [1, 1]  # same corpus: its activations come from the cache
    assert sae_info(other)["training"]["activations_from_cache"]
    assert not torch.equal(other.W_dec, first.W_dec)
    train_sae(tiny_backbone, 1, texts, TINY_CONFIG, max_length=64, progress=False)  # other layer
    assert count_trainings == [1, 1, 1] and extractions == [1, 1, 1, 1]
    assert len(list((isolated_cache / "sae").iterdir())) == 3


class BlockCounter:
    """Counts forward calls of every decoder block of a model while active: {block: calls}."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.blocks, self.calls = _decoder_layers(model), {}

    def __enter__(self) -> "BlockCounter":
        self.calls = {i: 0 for i in range(len(self.blocks))}
        self.handles = [block.register_forward_pre_hook(self._counter(i)) for i, block in enumerate(self.blocks)]
        return self

    def _counter(self, i: int):
        def count(module, args) -> None:
            self.calls[i] += 1

        return count

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


CORPUS_TENSORS = ("train_tokens", "train_last", "heldout_tokens", "heldout_last")


def assert_same_corpus(a, b) -> None:
    for name in CORPUS_TENSORS:
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("key", "n_train_texts", "n_heldout_texts", "outlier_rows_dropped"):
        assert a.info[name] == b.info[name], name


def test_corpus_at_several_layers_equals_one_pass_per_layer_and_fills_their_cache(
    tiny_backbone, texts, tmp_path, monkeypatch
):
    monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path / "separate"))
    with BlockCounter(tiny_backbone.model) as separate:
        single = {layer: sae_mod.corpus_activations(tiny_backbone, layer, texts, progress=False) for layer in (0, 2)}
    monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path / "together"))
    with BlockCounter(tiny_backbone.model) as together:
        both = sae_mod.corpus_activations_at_layers(tiny_backbone, [2, 0], texts, progress=False)
    assert separate.calls[0] == 2 * together.calls[0] > 0  # block 0 ran once per text, not once per layer
    assert together.calls[2] == separate.calls[2]  # the deepest block ran as often as in its own pass
    assert set(both) == {0, 2} and not any(data.from_cache for data in both.values())
    assert not torch.equal(both[0].train_tokens, both[2].train_tokens)
    for layer in (0, 2):
        assert_same_corpus(both[layer], single[layer])
    with BlockCounter(tiny_backbone.model) as again:
        cached = {layer: sae_mod.corpus_activations(tiny_backbone, layer, texts, progress=False) for layer in (0, 2)}
        repeat = sae_mod.corpus_activations_at_layers(tiny_backbone, [0, 2], texts, progress=False)
    assert sum(again.calls.values()) == 0  # every layer is a cache hit of the single-layer function too
    for layer in (0, 2):
        assert cached[layer].from_cache and repeat[layer].from_cache
        assert_same_corpus(cached[layer], single[layer])


def test_a_cached_corpus_layer_is_read_and_only_the_missing_ones_run(tiny_backbone, texts, isolated_cache, monkeypatch):
    first = sae_mod.corpus_activations(tiny_backbone, 2, texts, progress=False)
    passes = []

    def recording_stream(backbone, texts, layers, **kwargs):
        passes.append(list(layers))
        return iter_token_activations_at_layers(backbone, texts, layers, **kwargs)

    monkeypatch.setattr(sae_mod, "iter_token_activations_at_layers", recording_stream)
    with BlockCounter(tiny_backbone.model) as counter:
        mixed = sae_mod.corpus_activations_at_layers(tiny_backbone, [1, 2], texts, progress=False)
    assert passes == [[1], [1]]  # training texts, held-out texts: layer 1 only
    assert counter.calls[2] == 0 and counter.calls[1] > 0  # the cached layer's block never ran
    assert mixed[2].from_cache and not mixed[1].from_cache
    assert_same_corpus(mixed[2], first)
    assert len(list((isolated_cache / "sae-corpus").iterdir())) == 2
    with pytest.raises(ConfigError, match="at least one layer"):
        sae_mod.corpus_activations_at_layers(tiny_backbone, [], texts, progress=False)


def test_a_layer_sweep_extracts_every_sae_corpus_in_one_pass(
    tiny_backbone, smoke_profile, texts, isolated_cache, count_trainings, monkeypatch
):
    from srlib.experiments import profile_at_layer

    monkeypatch.setattr(sae_mod, "default_sae_corpus", lambda tokenizer, **kwargs: list(texts))
    profile = smoke_profile.replace(sae_training=TINY_CONFIG)
    at_layers = [profile_at_layer(profile, layer) for layer in (1, 2)]
    with BlockCounter(tiny_backbone.model) as counter:
        assert sae_mod.extract_sae_corpora(tiny_backbone, at_layers, progress=False) == [1, 2]
    with BlockCounter(tiny_backbone.model) as training:
        saes = [sae_for_profile(at_layer, tiny_backbone, progress=False) for at_layer in at_layers]
    assert counter.calls[1] == counter.calls[2] > 0 and counter.calls[1] == counter.calls[0]  # one pass
    assert sum(training.calls.values()) == 0 and count_trainings == [1, 1]  # the SAEs trained on cached corpora
    assert [sae_info(sae)["training"]["activations_from_cache"] for sae in saes] == [True, True]
    assert sae_mod.extract_sae_corpora(tiny_backbone, at_layers, progress=False) == []  # SAEs cached: nothing to do
    pretrained = profile.replace(sae_source="sae-lens:some-release/some-id")
    assert sae_mod.extract_sae_corpora(tiny_backbone, [pretrained], progress=False) == []


def test_a_cold_cache_serves_the_sweep_from_the_passes_it_runs_anyway(
    tiny_backbone, smoke_profile, texts, isolated_cache, count_trainings, monkeypatch
):
    from srlib.chapter import with_the_sweep
    from srlib.experiments import sweep_profiles

    monkeypatch.setattr(sae_mod, "default_sae_corpus", lambda tokenizer, **kwargs: list(texts))
    warmed = []
    monkeypatch.setattr(
        "srlib.experiments.warm_states",
        lambda backbone, dataset, profile, layers, **kw: warmed.append((dataset, layers, kw)),
    )
    profile = smoke_profile.replace(sae_training=TINY_CONFIG)  # layer 2; sweep layers 1, 2, 3
    with BlockCounter(tiny_backbone.model) as counter:
        assert with_the_sweep(profile, tiny_backbone) == [1, 2]  # layer 3 would run a block more
    assert counter.calls[1] == counter.calls[2] > 0 and counter.calls[3] == 0  # one corpus pass, to block 2
    assert warmed == [("truthfulqa", [1, 2], {"positions": activations.POSITIONS, "progress": False})]
    with BlockCounter(tiny_backbone.model) as training:
        sae = sae_for_profile(sweep_profiles(profile)[0], tiny_backbone, progress=False)  # the layer-1 sweep SAE
    assert sum(training.calls.values()) == 0 and sae_info(sae)["training"]["activations_from_cache"]
    sae_for_profile(profile, tiny_backbone, progress=False)
    with BlockCounter(tiny_backbone.model) as cached:
        assert with_the_sweep(profile, tiny_backbone) == []  # its SAE is cached: nothing to pay for
    assert sum(cached.calls.values()) == 0 and len(warmed) == 1
    assert with_the_sweep(profile.replace(sae_source="sae-lens:some-release/some-id"), tiny_backbone) == []


def test_token_budget_is_shared_equally():
    def whitespace_tokenizer(texts):
        return {"input_ids": [text.split() for text in texts]}

    big = [f"{i} w w w w" for i in range(4)]  # 5 tokens each, 20 in all
    small = ["a", "b"]  # 2 in all
    mid = [f"{i} w w" for i in range(5)]  # 3 each, 15 in all
    # budget 15: small takes its 2 (share 5); mid gets 13/2 = 6.5 -> 2 texts (6);
    # big gets the 7 left -> 1 text (5).
    kept = sae_mod._share_token_budget(whitespace_tokenizer, [big, small, mid], 15)
    assert kept == [big[:1], small, mid[:2]]


def test_training_is_deterministic(tiny_backbone, texts, tmp_path, monkeypatch):
    weights = []
    for run in ("a", "b"):
        monkeypatch.setenv("SRLIB_CACHE_DIR", str(tmp_path / run))
        weights.append(train_sae(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64, progress=False).W_dec)
    assert torch.equal(weights[0], weights[1])


def test_an_sae_on_states_read_under_autocast_trains_under_it_and_is_cached_apart(
    tiny_backbone, texts, isolated_cache, monkeypatch
):
    low = load_backbone(TINY_MODEL_ID, device="cpu", autocast=torch.bfloat16)
    assert (
        sae_mod.sae_cache_key(low, 2, texts, TINY_CONFIG)[0]
        != sae_mod.sae_cache_key(tiny_backbone, 2, texts, TINY_CONFIG)[0]
    )
    settings = []

    class Recording(sae_mod.SAETrainer):
        def __init__(self, cfg, *args, **kwargs):
            settings.append(cfg.autocast)
            super().__init__(cfg, *args, **kwargs)

    monkeypatch.setattr(sae_mod, "SAETrainer", Recording)
    exact = train_sae(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64, progress=False)
    lowered = train_sae(low, 2, texts, TINY_CONFIG, max_length=64, progress=False)
    assert settings == [False, True]
    assert len(list((isolated_cache / "sae").iterdir())) == 2
    assert not torch.equal(exact.W_dec, lowered.W_dec)
    fve = [sae_info(sae)["heldout"]["all_tokens"]["fve"] for sae in (exact, lowered)]
    assert abs(fve[0] - fve[1]) < 0.02  # about the same reconstruction, not the same bits


def test_training_input_errors(tiny_backbone, texts, isolated_cache):
    with pytest.raises(DataError, match="at least 2 texts"):
        train_sae(tiny_backbone, 2, texts[:1], TINY_CONFIG, progress=False)
    bad_k = SAETrainingConfig(d_sae=8, k=9, training_tokens=64)
    with pytest.raises(ConfigError, match="k=9"):
        train_sae(tiny_backbone, 2, texts, bad_k, progress=False)
    with pytest.raises(ConfigError, match="layer 9"):
        train_sae(tiny_backbone, 9, texts, TINY_CONFIG, progress=False)


@pytest.mark.skipif(not os.environ.get("SRLIB_DATA_DIR"), reason="SRLIB_DATA_DIR is unset")
def test_smoke_profile_trains_on_the_train_splits(tiny_backbone, smoke_profile, isolated_cache):
    corpus = sae_mod.default_sae_corpus(tiny_backbone.tokenizer, max_pairs=smoke_profile.max_pairs)
    full = set(sae_mod.default_sae_corpus(tiny_backbone.tokenizer))
    held = {
        text
        for split in ("val", "test")
        for name in ("truthfulqa", "hh-harmless", "pku-saferlhf")
        for pair in load_pairs(f"{name}:{split}")
        for text in format_pair(tiny_backbone.tokenizer, pair)
    }
    assert set(corpus) <= full and not full & held
    sae = sae_for_profile(smoke_profile, tiny_backbone, progress=False)
    assert sae.cfg.d_sae == smoke_profile.sae_training.d_sae
    assert sae_info(sae)["corpus"]["n_texts"] == len(corpus)


# ---------------------------------------------------------------------------- training levers


def test_default_levers_keep_the_cache_key_of_earlier_saes(tiny_backbone, texts):
    """SAEs cached before the levers existed (today's cpu book) keep their key at the defaults."""
    key, parts = sae_mod.sae_cache_key(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64)
    before = {"d_sae", "k", "training_tokens", "batch_size", "lr", "lr_end", "seed", "last_token_share"}
    assert set(parts["config"]) == before and parts["dead_window_divisor"] == 10
    for change in (
        dict(architecture="batchtopk"),
        dict(sparsity_coefficient=0.5),
        dict(dead_window_divisor=5),
        dict(last_token_share=0.5),
    ):
        other, _ = sae_mod.sae_cache_key(
            tiny_backbone, 2, texts, dataclasses.replace(TINY_CONFIG, **change), max_length=64
        )
        assert other != key, change


@pytest.mark.parametrize(
    "architecture, saved_as", [("batchtopk", "JumpReLUSAE"), ("jumprelu", "JumpReLUSAE"), ("standard", "StandardSAE")]
)
def test_other_sae_lens_architectures_train_and_load(
    architecture, saved_as, tiny_backbone, texts, isolated_cache, count_trainings
):
    config = dataclasses.replace(TINY_CONFIG, architecture=architecture, sparsity_coefficient=0.01)
    sae = train_sae(tiny_backbone, 2, texts, config, max_length=64, progress=False)
    assert type(sae).__name__ == saved_as and sae.cfg.d_sae == 32
    assert sae_info(sae)["key_parts"]["config"]["architecture"] == architecture
    assert 0 < sae_info(sae)["heldout"]["all_tokens"]["l0"] <= 32


def test_dead_window_follows_its_divisor(tiny_backbone, texts, isolated_cache, count_trainings):
    train_sae(
        tiny_backbone, 2, texts, dataclasses.replace(TINY_CONFIG, dead_window_divisor=5), max_length=64, progress=False
    )
    assert sae_mod.SAETrainer.windows == [15 // 5]


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(architecture="gated"), "unknown SAE architecture 'gated'"),
        (dict(dead_window_divisor=0), "dead_window_divisor"),
        (dict(sparsity_coefficient=float("nan")), "sparsity_coefficient"),
        (dict(last_token_share=1.5), r"last_token_share must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_levers_are_one_line_config_errors(change, message, tiny_backbone, texts, isolated_cache):
    with pytest.raises(ConfigError, match=message) as error:
        train_sae(tiny_backbone, 2, texts, dataclasses.replace(TINY_CONFIG, **change), progress=False)
    assert "\n" not in str(error.value)


# ---------------------------------------------------------------------------- the gather training step


def _twin_training_saes(rescale: bool, architecture: str = "topk") -> tuple:
    """sae-lens's TopK (or BatchTopK) training SAE and srlib's gather one with the same
    (non-trivial) weights."""
    from sae_lens.saes.batchtopk_sae import BatchTopKTrainingSAE, BatchTopKTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

    from srlib.topk_training import GatherBatchTopKTrainingSAE, GatherTopKTrainingSAE

    classes = {
        "topk": (TopKTrainingSAEConfig, TopKTrainingSAE, GatherTopKTrainingSAE),
        "batchtopk": (BatchTopKTrainingSAEConfig, BatchTopKTrainingSAE, GatherBatchTopKTrainingSAE),
    }
    cfg_class, reference_class, gather_class = classes[architecture]
    cfg = cfg_class(d_in=12, d_sae=40, k=5, rescale_acts_by_decoder_norm=rescale)
    torch.manual_seed(0)
    reference = reference_class(cfg)
    with torch.no_grad():  # decoder rows of unequal norms, non-zero biases, pre-activations of
        # order 1 with b_enc low enough that some rows have fewer than k positive ones (the ReLU
        # after TopK acts) while most kept values are positive (the decode is exercised)
        reference.W_dec.mul_(torch.rand(40, 1) * 3 + 0.2)
        reference.W_enc.mul_(10)
        reference.b_dec.copy_(torch.randn(12) * 0.1)
        reference.b_enc.copy_(torch.randn(40) * 0.1 - 1.2)
    gather = gather_class(cfg)
    gather.load_state_dict(reference.state_dict())
    return reference, gather


def _step(sae, sae_in, dead) -> tuple[dict, dict, object]:
    from sae_lens.saes.sae import TrainStepInput

    sae.zero_grad()
    step = TrainStepInput(
        sae_in=sae_in, coefficients={}, dead_neuron_mask=dead, n_training_steps=0, is_logging_step=False
    )
    out = sae.training_forward_pass(step)
    out.loss.backward()
    losses = {name: float(value.detach()) for name, value in out.losses.items()}
    return losses, {name: p.grad.clone() for name, p in sae.named_parameters()}, out


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
@pytest.mark.parametrize("rescale", [True, False])
@pytest.mark.parametrize("n_dead", [0, 3, 40])
def test_the_gather_step_has_sae_lens_losses_and_gradients(architecture, rescale, n_dead):
    """The same loss terms and gradients as sae-lens's TopK (BatchTopK) step: reconstruction,
    and the AuxK loss with few dead latents (fewer than k_aux = d_in / 2) and with all of them
    dead; for BatchTopK also the same threshold after the step."""
    reference, gather = _twin_training_saes(rescale, architecture)
    sae_in = torch.randn(64, 12, generator=torch.Generator().manual_seed(1))
    dead = torch.zeros(40, dtype=torch.bool)
    dead[torch.randperm(40, generator=torch.Generator().manual_seed(2))[:n_dead]] = True
    want_losses, want_grads, want = _step(reference, sae_in, dead)
    got_losses, got_grads, got = _step(gather, sae_in, dead)
    assert got_losses.keys() == want_losses.keys()
    for name, value in want_losses.items():
        assert got_losses[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert (want_losses["auxiliary_reconstruction_loss"] > 0) == (n_dead > 0)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    firing = (want.feature_acts > 0).sum(-1)
    assert firing.min() < 5 and firing.float().mean() > 2.5  # the ReLU acts, and most values decode
    # the trainer counts firing latents from feature_acts: the same latents fire in both
    assert torch.equal(got.feature_acts.to_dense().bool(), want.feature_acts.bool())
    torch.testing.assert_close(got.sae_out, want.sae_out)
    if architecture == "batchtopk":  # rows keep different numbers of latents, k on average
        assert firing.max() > 5 and firing.sum() <= 5 * len(sae_in)
        assert reference.topk_threshold > 0 and float(gather.topk_threshold) == pytest.approx(
            float(reference.topk_threshold), rel=1e-5
        )


def test_outside_a_training_step_the_gather_sae_is_sae_lens_own():
    reference, gather = _twin_training_saes(rescale=True)
    x = torch.randn(8, 12)
    acts = gather.encode(x)
    assert not acts.is_sparse and torch.equal(acts, reference.encode(x))
    torch.testing.assert_close(gather.decode(acts), reference.decode(acts))


def test_a_trained_topk_sae_saves_as_a_plain_sae_lens_topk_sae(tiny_backbone, texts, isolated_cache):
    sae = train_sae(tiny_backbone, 2, texts, TINY_CONFIG, max_length=64, progress=False)
    assert type(sae) is TopKSAE


def test_a_hook_on_the_dense_activations_gets_sae_lens_own_step():
    """A hook that reads hook_sae_acts_post needs the dense tensor: then sae-lens's step runs."""
    reference, gather = _twin_training_saes(rescale=True)
    seen = []
    gather.hook_sae_acts_post.add_hook(lambda acts, hook: seen.append(acts.shape))
    sae_in = torch.randn(16, 12, generator=torch.Generator().manual_seed(3))
    _, want_grads, _ = _step(reference, sae_in, None)
    _, got_grads, got = _step(gather, sae_in, None)
    assert seen == [(16, 40)] and not got.feature_acts.is_sparse
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, msg=name)


@pytest.mark.parametrize("architecture", ["topk", "batchtopk"])
def test_the_gather_step_trains_the_same_sae_on_two_threads_every_time(architecture):
    """Two threads, three runs, the same weights to the bit: the step's backward must not add a
    repeated latent's terms in the order its threads finish (advanced indexing did, and two cold
    builds of one commit trained two profile SAEs)."""
    generator = torch.Generator().manual_seed(0)
    # states near an 8-dimensional subspace: many latents go dead, so the AuxK loss runs too
    basis = torch.randn(8, 128, generator=generator)
    tokens = torch.randn(8_192, 8, generator=generator) @ basis + 0.01 * torch.randn(8_192, 128, generator=generator)
    last = torch.randn(256, 128, generator=generator)
    config = SAETrainingConfig(
        d_sae=2_048, k=32, training_tokens=12 * 1_024, batch_size=1_024, architecture=architecture
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [sae_mod._fit(tokens, last, config, progress=False, autocast=True).state_dict() for _ in range(3)]
    finally:
        torch.set_num_threads(threads)
    for run in runs[1:]:
        for name, weight in runs[0].items():
            assert torch.equal(run[name], weight), name
