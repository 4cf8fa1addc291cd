"""srlib.backbone on the tiny in-process model: loading, identity, text formatting."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from srlib.activations import last_token_states
from srlib.backbone import (
    _identity,
    backbone_for_profile,
    format_pair,
    format_text,
    load_backbone,
    load_recorded_backbone,
    pretrained_path,
)
from srlib.data import PreferencePair
from srlib.errors import ConfigError
from srlib.profiles import TINY_MODEL_ID

TINY_HEADER = "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n"


def test_tiny_backbone_shape_and_mode(tiny_backbone):
    assert (tiny_backbone.num_layers, tiny_backbone.hidden_size) == (4, 64)
    assert tiny_backbone.source == "tiny" and tiny_backbone.model_id == TINY_MODEL_ID
    assert not tiny_backbone.model.training
    assert next(tiny_backbone.model.parameters()).dtype == torch.float32
    tok = tiny_backbone.tokenizer
    assert tok.bos_token == "<s>" and tok.pad_token == "<pad>" and tok.eos_token == "<|im_end|>"
    assert tok("hi")["input_ids"][0] == tok.bos_token_id


def test_tiny_model_is_deterministic(tiny_backbone):
    rng_before = torch.random.get_rng_state()
    again = load_backbone(TINY_MODEL_ID, device="cpu")
    assert torch.equal(rng_before, torch.random.get_rng_state()), "building must not touch the global RNG"
    first, second = tiny_backbone.model.state_dict(), again.model.state_dict()
    assert first.keys() == second.keys()
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert again.tokenizer.get_vocab() == tiny_backbone.tokenizer.get_vocab()
    assert again.identity == tiny_backbone.identity


def test_identity_follows_the_weights(tiny_backbone):
    other = load_backbone(TINY_MODEL_ID, device="cpu")
    with torch.no_grad():
        other.model.model.layers[1].mlp.up_proj.weight[0, 0] += 1.0
    assert _identity(TINY_MODEL_ID, other.model, other.tokenizer) != tiny_backbone.identity


def test_format_text_uses_the_chat_template(tiny_backbone):
    text = format_text(tiny_backbone.tokenizer, "Is the sky blue?", "Yes.")
    assert text == (
        TINY_HEADER + "<|im_start|>user\nIs the sky blue?<|im_end|>\n<|im_start|>assistant\nYes.<|im_end|>\n"
    )


def test_format_text_turns_a_transcript_into_turns(tiny_backbone):
    prompt = "Human: Hi there\n\nAssistant: Hello!\n\nHuman: How do I bake bread?"
    text = format_text(tiny_backbone.tokenizer, prompt, "Use flour.")
    assert text == (
        TINY_HEADER + "<|im_start|>user\nHi there<|im_end|>\n"
        "<|im_start|>assistant\nHello!<|im_end|>\n"
        "<|im_start|>user\nHow do I bake bread?<|im_end|>\n"
        "<|im_start|>assistant\nUse flour.<|im_end|>\n"
    )


def test_format_text_plain_fallback_without_template():
    no_template = types.SimpleNamespace(chat_template=None)
    assert format_text(no_template, "Is the sky blue?", "Yes.") == "User: Is the sky blue?\nAssistant: Yes."


def test_format_pair(tiny_backbone):
    pair = PreferencePair(prompt="Q?", chosen="good", rejected="bad")
    chosen, rejected = format_pair(tiny_backbone.tokenizer, pair)
    assert chosen == format_text(tiny_backbone.tokenizer, "Q?", "good")
    assert rejected == format_text(tiny_backbone.tokenizer, "Q?", "bad")


def test_backbone_for_profile(smoke_profile):
    backbone = backbone_for_profile(smoke_profile, device="cpu")
    assert backbone.model_id == smoke_profile.model_id == TINY_MODEL_ID
    assert backbone_for_profile("smoke", device="cpu").identity == backbone.identity


def test_autocast_reads_close_states_under_their_own_identity_and_cache(tiny_backbone, isolated_cache):
    low = load_backbone(TINY_MODEL_ID, device="cpu", autocast=torch.bfloat16)
    assert low.autocast is torch.bfloat16 and low.identity != tiny_backbone.identity
    assert _identity(TINY_MODEL_ID, low.model, low.tokenizer) == tiny_backbone.identity  # float32 identity unchanged
    texts = [format_text(tiny_backbone.tokenizer, "Q?", f"An answer of {n} words.") for n in range(6)]
    exact = last_token_states(tiny_backbone, texts, 3, progress=False)
    lowered = last_token_states(low, texts, 3, progress=False)
    assert lowered.dtype == torch.float32
    error = (lowered - exact).norm(dim=1) / exact.norm(dim=1)
    assert 0 < error.max() < 0.05  # bfloat16 products: close to float32, not the same bits
    identities = sorted(path.name for path in (isolated_cache / "activations").iterdir())
    assert identities == sorted([tiny_backbone.identity, low.identity])  # the two never share an entry
    assert torch.equal(last_token_states(low, texts, 3, progress=False), lowered)  # read back from its own cache


def test_a_profile_names_its_autocast_and_a_bad_one_is_one_line(smoke_profile):
    assert backbone_for_profile(smoke_profile, device="cpu").autocast is None
    assert backbone_for_profile(smoke_profile.replace(autocast="bfloat16"), device="cpu").autocast is torch.bfloat16
    with pytest.raises(ConfigError, match="autocast must be None or one of bfloat16, float16; got 'bf16'"):
        backbone_for_profile(smoke_profile.replace(autocast="bf16"), device="cpu")
    with pytest.raises(ConfigError, match="autocast must be None or torch.bfloat16 or torch.float16"):
        load_backbone(TINY_MODEL_ID, device="cpu", autocast=torch.float64)


def test_pretrained_path_round_trips_through_a_local_dir(tiny_backbone, isolated_cache):
    path = pretrained_path(tiny_backbone)
    assert path.startswith(str(isolated_cache))
    assert pretrained_path(tiny_backbone) == path  # saved once
    local = load_backbone(path, device="cpu")
    assert local.source == "local" and local.path == path
    texts = [format_text(tiny_backbone.tokenizer, "Q?", "An answer.")]
    assert torch.allclose(
        last_token_states(local, texts, 2, cache=False, progress=False),
        last_token_states(tiny_backbone, texts, 2, cache=False, progress=False),
        atol=1e-6,
    )


def test_unknown_model_offline_is_a_one_line_config_error(monkeypatch, isolated_cache):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match=r"cannot load 'nobody/no-such-model'") as error:
        load_backbone("nobody/no-such-model", device="cpu")
    assert "\n" not in str(error.value)


def test_backbone_is_a_plain_dataclass(tiny_backbone):
    renamed = dataclasses.replace(tiny_backbone, identity="x")
    assert renamed.model is tiny_backbone.model and renamed.identity == "x"


def test_a_saved_models_backbone_record_reloads_the_same_backbone(tiny_backbone):
    assert tiny_backbone.record == {
        "model_id": TINY_MODEL_ID,
        "identity": tiny_backbone.identity,
        "weights": tiny_backbone.weights,
    }  # float32: no "autocast" key, the record saved before autocast existed
    low = load_backbone(TINY_MODEL_ID, device="cpu", autocast=torch.bfloat16)
    assert low.record["autocast"] == "bfloat16"
    reloaded = load_recorded_backbone(low.record)
    assert reloaded.identity == low.identity and reloaded.autocast is torch.bfloat16
    assert load_recorded_backbone(tiny_backbone.record).identity == tiny_backbone.identity
    with pytest.raises(ConfigError, match="no backbone attached or recorded"):
        load_recorded_backbone({"model_id": None, "identity": None, "weights": None})


@pytest.mark.parametrize("training", [True, False])
def test_eval_mode_restores_the_mode_also_when_the_block_raises(training):
    from srlib.backbone import eval_mode

    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Dropout(0.5)).train(training)
    with eval_mode(model):
        assert not model.training and not model[1].training
    assert model.training is training and model[1].training is training
    with pytest.raises(RuntimeError), eval_mode(model):
        raise RuntimeError("a batch failed")
    assert model.training is training and model[1].training is training
