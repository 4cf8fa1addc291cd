"""srlib.activations on the tiny model: early exit, truncation, batching, cache, token streams."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

import srlib.activations as activations
from srlib.activations import iter_token_activations, last_token_states, pair_states
from srlib.backbone import format_pair, format_text
from srlib.data import PreferencePair
from srlib.errors import ConfigError

WORDS = "the cat sat on a mat while seven blue birds sang about rivers and old stone bridges".split()


def make_texts(tokenizer, n: int, seed: int = 0) -> list[str]:
    """n chat-formatted texts of shuffled, clearly different lengths."""
    rng = random.Random(seed)
    lengths = list(range(1, 3 * n + 1, 3))
    rng.shuffle(lengths)
    return [
        format_text(
            tokenizer,
            f"Question {i}: " + " ".join(rng.choices(WORDS, k=length)),
            " ".join(rng.choices(WORDS, k=length % 5 + 1)),
        )
        for i, length in enumerate(lengths)
    ]


def full_hidden_states(backbone, text: str, max_length: int = 10_000) -> tuple[torch.Tensor, ...]:
    """transformers' own hidden states of one unpadded text, via the same tokenisation."""
    ids = activations._encode(backbone.tokenizer, text, max_length).ids
    with torch.inference_mode():
        out = backbone.model(input_ids=torch.tensor([ids]), output_hidden_states=True)
    return tuple(h[0] for h in out.hidden_states)


class ForwardCounter:
    """Counts calls of a module's forward while active."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.calls = module, 0

    def __enter__(self) -> ForwardCounter:
        self.handle = self.module.register_forward_pre_hook(self._count)
        return self

    def _count(self, module, args) -> None:
        self.calls += 1

    def __exit__(self, *exc) -> None:
        self.handle.remove()


@pytest.mark.parametrize("layer", [0, 1, 2])
def test_early_exit_matches_output_hidden_states(tiny_backbone, layer):
    texts = make_texts(tiny_backbone.tokenizer, 7)
    states = last_token_states(tiny_backbone, texts, layer, batch_size=3, cache=False, progress=False)
    assert states.shape == (7, 64) and states.dtype == torch.float32
    expected = torch.stack([full_hidden_states(tiny_backbone, t)[layer + 1][-1] for t in texts])
    torch.testing.assert_close(states, expected, atol=1e-5, rtol=0)


def test_last_layer_is_the_block_output_before_the_final_norm(tiny_backbone):
    texts = make_texts(tiny_backbone.tokenizer, 3)
    states = last_token_states(tiny_backbone, texts, 3, cache=False, progress=False)
    final = torch.stack([full_hidden_states(tiny_backbone, t)[-1][-1] for t in texts])
    with torch.inference_mode():
        torch.testing.assert_close(tiny_backbone.model.model.norm(states), final, atol=1e-5, rtol=0)


def test_blocks_above_the_layer_do_not_run(tiny_backbone):
    layers = tiny_backbone.model.model.layers
    texts = make_texts(tiny_backbone.tokenizer, 4)
    with (
        ForwardCounter(layers[1]) as at,
        ForwardCounter(layers[2]) as above,
        ForwardCounter(tiny_backbone.model.lm_head) as head,
    ):
        last_token_states(tiny_backbone, texts, 1, batch_size=2, cache=False, progress=False)
    assert (at.calls, above.calls, head.calls) == (3, 0, 0)  # batches of <= 2 texts of one padded width


def test_batching_restores_the_input_order(tiny_backbone):
    texts = make_texts(tiny_backbone.tokenizer, 9, seed=3)
    one_by_one = last_token_states(tiny_backbone, texts, 2, batch_size=1, cache=False, progress=False)
    batched = last_token_states(tiny_backbone, texts, 2, batch_size=4, cache=False, progress=False)
    torch.testing.assert_close(batched, one_by_one, atol=1e-5, rtol=0)
    assert not torch.allclose(batched[0], batched[1])


def test_padding_side_of_the_tokenizer_does_not_matter(tiny_backbone, monkeypatch):
    texts = make_texts(tiny_backbone.tokenizer, 5)
    right = last_token_states(tiny_backbone, texts, 2, batch_size=5, cache=False, progress=False)
    monkeypatch.setattr(tiny_backbone.tokenizer, "padding_side", "left")
    left = last_token_states(tiny_backbone, texts, 2, batch_size=5, cache=False, progress=False)
    torch.testing.assert_close(left, right, atol=1e-6, rtol=0)


def test_left_truncation_keeps_the_last_token_and_the_bos(tiny_backbone):
    tok = tiny_backbone.tokenizer
    text = make_texts(tok, 12)[0] + make_texts(tok, 12)[1]
    ids = tok(text)["input_ids"]
    assert len(ids) > 40
    encoded = activations._encode(tok, text, 40)
    assert encoded.ids == [tok.bos_token_id] + ids[-39:]
    state = last_token_states(tiny_backbone, [text], 2, max_length=40, cache=False, progress=False)
    with torch.inference_mode():
        out = tiny_backbone.model(input_ids=torch.tensor([encoded.ids]), output_hidden_states=True)
    torch.testing.assert_close(state[0], out.hidden_states[3][0, -1], atol=1e-5, rtol=0)


def test_text_that_starts_with_bos_gets_no_second_bos(tiny_backbone):
    tok = tiny_backbone.tokenizer
    text = format_text(tok, "Q?", "A.")
    assert activations._encode(tok, "<s>" + text, 512).ids == tok(text)["input_ids"]


@pytest.mark.parametrize("layer", [4, 40, -1])
def test_layer_out_of_range(tiny_backbone, layer):
    with pytest.raises(ConfigError, match=rf"^layer {layer} out of range: model has 4 layers \(0\.\.3\)$"):
        last_token_states(tiny_backbone, ["x"], layer, cache=False, progress=False)
    with pytest.raises(ConfigError):
        next(iter_token_activations(tiny_backbone, ["x"], layer, progress=False))


def test_layer_must_be_an_integer_but_numpy_integers_are_fine(tiny_backbone):
    with pytest.raises(ConfigError, match=r"^layer must be an integer, got 1.5$"):
        last_token_states(tiny_backbone, ["x"], 1.5, cache=False, progress=False)
    numpy = pytest.importorskip("numpy")
    assert last_token_states(tiny_backbone, ["x"], numpy.int64(1), cache=False, progress=False).shape == (1, 64)


def test_empty_list_gives_an_empty_tensor(tiny_backbone):
    assert last_token_states(tiny_backbone, [], 1, progress=False).shape == (0, 64)
    chosen, rejected = pair_states(tiny_backbone, [], 1, progress=False)
    assert chosen.shape == rejected.shape == (0, 64)
    assert list(iter_token_activations(tiny_backbone, [], 1, progress=False)) == []


def test_cache_hits_skip_the_forward_pass(tiny_backbone, isolated_cache):
    texts = make_texts(tiny_backbone.tokenizer, 6)
    with ForwardCounter(tiny_backbone.model) as counter:
        first = last_token_states(tiny_backbone, texts, 2, batch_size=4, progress=False)
    assert counter.calls == 2  # batches of <= 4 texts of one padded width
    with ForwardCounter(tiny_backbone.model) as counter:
        again = last_token_states(tiny_backbone, texts, 2, batch_size=4, progress=False)
        subset = last_token_states(tiny_backbone, texts[3:] + texts[:1], 2, progress=False)
    assert counter.calls == 0
    assert torch.equal(again, first) and torch.equal(subset, first[[3, 4, 5, 0]])
    with ForwardCounter(tiny_backbone.model) as counter:
        extended = last_token_states(tiny_backbone, texts + ["one new text"], 2, progress=False)
    assert counter.calls == 1 and torch.equal(extended[:6], first)
    entries = list(isolated_cache.rglob("*.safetensors"))
    assert len(entries) == 7 and all(p.parent.parent.name == "layer2-max512-last" for p in entries)


@pytest.mark.parametrize("change", [{"layer": 1}, {"max_length": 256}, {"identity": "other-weights"}])
def test_cache_misses_when_the_key_changes(tiny_backbone, isolated_cache, change):
    texts = make_texts(tiny_backbone.tokenizer, 3)
    last_token_states(tiny_backbone, texts, 2, progress=False)
    backbone = dataclasses.replace(tiny_backbone, identity=change.get("identity", tiny_backbone.identity))
    with ForwardCounter(tiny_backbone.model) as counter:
        last_token_states(
            backbone, texts, change.get("layer", 2), max_length=change.get("max_length", 512), progress=False
        )
    assert counter.calls == 1


def test_interrupted_cache_write_leaves_no_entry(tiny_backbone, isolated_cache, monkeypatch):
    texts = make_texts(tiny_backbone.tokenizer, 3)

    def crash(tensors, filename):
        with open(filename, "wb") as handle:
            handle.write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(activations, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        last_token_states(tiny_backbone, texts, 2, progress=False)
    folder = next(isolated_cache.rglob("layer2-max512-last"))
    assert [p for p in folder.rglob("*") if p.is_file() and p.name != "info.json"] == []
    monkeypatch.undo()
    monkeypatch.setenv("SRLIB_CACHE_DIR", str(isolated_cache))
    with ForwardCounter(tiny_backbone.model) as counter:
        states = last_token_states(tiny_backbone, texts, 2, progress=False)
    assert counter.calls == 1
    torch.testing.assert_close(states, last_token_states(tiny_backbone, texts, 2, cache=False, progress=False))


def test_pair_states(tiny_backbone):
    pairs = [
        PreferencePair(prompt=f"Question {i}?", chosen="A true answer " * (i + 1), rejected="A false one")
        for i in range(5)
    ]
    chosen, rejected = pair_states(tiny_backbone, pairs, 2, batch_size=3, cache=False, progress=False)
    texts = [text for pair in pairs for text in format_pair(tiny_backbone.tokenizer, pair)]
    expected = last_token_states(tiny_backbone, texts, 2, cache=False, progress=False)
    torch.testing.assert_close(chosen, expected[0::2], atol=1e-5, rtol=0)
    torch.testing.assert_close(rejected, expected[1::2], atol=1e-5, rtol=0)
    assert not torch.allclose(chosen, rejected)


def test_token_activations_skip_bos_pad_and_template_prefix(tiny_backbone):
    tok = tiny_backbone.tokenizer
    prefix = "<|im_start|>system\nYou are a tiny test model.<|im_end|>\n<|im_start|>user\n"
    n_prefix = len(tok(prefix)["input_ids"])  # BOS + system block + user header
    assert tok.convert_ids_to_tokens(tok(prefix)["input_ids"])[:2] == ["<s>", "<|im_start|>"]
    texts = make_texts(tok, 6)
    streams = list(iter_token_activations(tiny_backbone, texts, 1, batch_size=4, progress=False))
    assert len(streams) == len(texts)
    for text, stream in zip(texts, streams, strict=True):
        n_tokens = len(tok(text)["input_ids"])
        assert stream.shape == (n_tokens - n_prefix, 64)
        torch.testing.assert_close(stream, full_hidden_states(tiny_backbone, text)[2][n_prefix:], atol=1e-5, rtol=0)


def test_token_activations_of_plain_and_truncated_texts_skip_only_the_bos(tiny_backbone):
    tok = tiny_backbone.tokenizer
    plain = "User: no template here\nAssistant: fine"
    long = make_texts(tok, 10)[0] * 3
    streams = list(
        iter_token_activations(tiny_backbone, [plain, "<s>" + plain, long], 1, max_length=30, progress=False)
    )
    assert streams[0].shape[0] == len(tok(plain)["input_ids"]) - 1
    torch.testing.assert_close(streams[1], streams[0])  # a BOS written in the text is skipped too
    assert streams[2].shape[0] == 30 - 1


def test_outputs_are_ordinary_tensors_that_autograd_accepts(tiny_backbone):
    texts = make_texts(tiny_backbone.tokenizer, 3)
    head = torch.nn.Linear(64, 1)
    states = last_token_states(tiny_backbone, texts, 1, cache=False, progress=False)
    assert not states.is_inference()
    head(states).sum().backward()
    for tokens in iter_token_activations(tiny_backbone, texts, 1, batch_size=1, progress=False):
        assert torch.is_grad_enabled() and not tokens.is_inference()
        head(tokens).sum().backward()  # a training step between two batches of the stream


def test_the_token_pass_fills_the_state_cache_so_each_text_runs_once(tiny_backbone, isolated_cache):
    texts = make_texts(tiny_backbone.tokenizer, 9)
    fresh = activations.token_states(
        tiny_backbone, texts, 2, positions=activations.POSITIONS, batch_size=4, cache=False, progress=False
    )
    rows = list(
        iter_token_activations(
            tiny_backbone, texts[:6], 2, batch_size=2, progress=False, cache_positions=activations.POSITIONS
        )
    )
    assert len(rows) == 6
    with ForwardCounter(tiny_backbone.model) as unseen:
        activations.token_states(tiny_backbone, texts[6:], 2, batch_size=4, cache=False, progress=False)
    with ForwardCounter(tiny_backbone.model) as counter:
        cached = activations.token_states(
            tiny_backbone, texts, 2, positions=activations.POSITIONS, batch_size=4, progress=False
        )
    assert counter.calls == unseen.calls  # only the three texts the token pass did not see
    for position in activations.POSITIONS:  # the same values a state pass computes, bit for bit
        assert torch.equal(cached[position], fresh[position])
    assert torch.equal(rows[0][-1], fresh["last"][0])
    without = list(isolated_cache.rglob("*.safetensors"))
    list(iter_token_activations(tiny_backbone, texts[6:], 1, progress=False))  # no cache_positions: no entries
    assert list(isolated_cache.rglob("*.safetensors")) == without


def test_the_sae_corpus_pass_leaves_the_reward_model_states_cached(tiny_backbone, isolated_cache):
    from srlib.sae import corpus_activations

    texts = make_texts(tiny_backbone.tokenizer, 8, seed=1)
    corpus_activations(tiny_backbone, 2, texts, batch_size=4, progress=False)
    with ForwardCounter(tiny_backbone.model) as counter:
        states = last_token_states(tiny_backbone, texts, 2, progress=False)
    assert counter.calls == 0 and states.shape == (8, tiny_backbone.hidden_size)


def test_several_layers_come_from_one_pass_and_equal_single_layer_states(tiny_backbone, isolated_cache):
    texts = make_texts(tiny_backbone.tokenizer, 5, seed=2)
    single = {
        layer: activations.token_states(
            tiny_backbone, texts, layer, positions=activations.POSITIONS, cache=False, progress=False
        )
        for layer in (0, 2)
    }
    blocks = activations._decoder_layers(tiny_backbone.model)
    with ForwardCounter(tiny_backbone.model) as passes, ForwardCounter(blocks[2]) as top:
        both = activations.states_at_layers(
            tiny_backbone, texts, [2, 0], positions=activations.POSITIONS, batch_size=8, progress=False
        )
    with ForwardCounter(tiny_backbone.model) as fresh:
        activations.token_states(tiny_backbone, texts, 2, cache=False, progress=False)
    assert passes.calls == fresh.calls and top.calls == fresh.calls  # one pass per batch, not per layer
    for layer in (0, 2):
        for position in activations.POSITIONS:
            assert torch.equal(both[layer][position], single[layer][position])
    with ForwardCounter(tiny_backbone.model) as counter:  # both layers are cached for token_states now
        activations.token_states(tiny_backbone, texts, 0, positions=activations.POSITIONS, progress=False)
    assert counter.calls == 0
    with pytest.raises(ConfigError, match="at least one layer"):
        activations.states_at_layers(tiny_backbone, texts, [])
