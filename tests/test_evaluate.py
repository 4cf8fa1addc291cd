"""srlib.evaluate: the log-prob scorer against a direct computation, MC1/MC2 and pairwise
accuracy on hand-made scores, filter statistics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import srlib.evaluate as ev
from srlib.backbone import load_backbone
from srlib.data import MCQuestion, PreferencePair
from srlib.profiles import TINY_MODEL_ID

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tiny():
    backbone = load_backbone(TINY_MODEL_ID)
    return backbone.model, backbone.tokenizer


def _direct_logprob(model, tokenizer, prompt, response):
    """Unbatched, unpadded sum of the response tokens' log-probs."""
    p, r = ev.split_prompt_response(tokenizer, prompt, response)
    ids = torch.tensor([p + r])
    with torch.no_grad():
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    token = logp.gather(-1, ids[0, 1:, None])[:, 0]
    return float(token[-len(r) :].sum()), len(r)


def test_split_prompt_response_follows_the_chat_template(tiny):
    _, tok = tiny
    p, r = ev.split_prompt_response(tok, "Is the sky blue?", "Yes, it is.")
    assert tok.decode(p).endswith("<|im_start|>assistant\n")
    assert tok.decode(r) == "Yes, it is.<|im_end|>\n"


def test_response_logprobs_match_an_unbatched_computation(tiny):
    model, tok = tiny
    responses = ["Paris.", "a much longer answer with many more words in it", "No"]
    batched = ev.response_logprobs(model, tok, "What is the capital of France?", responses, batch_size=2)
    normed = ev.response_logprobs(model, tok, "What is the capital of France?", responses, normalize=True)
    assert batched.dtype == torch.float32 and batched.shape == (3,)
    for i, response in enumerate(responses):
        total, n = _direct_logprob(model, tok, "What is the capital of France?", response)
        assert batched[i].item() == pytest.approx(total, abs=1e-3)
        assert normed[i].item() == pytest.approx(total / n, abs=1e-4)


def test_mc_scores_by_hand():
    correct = torch.tensor([-1.0, -2.0])  # best answer first
    incorrect = torch.tensor([-1.5, -3.0])
    mc1, mc2 = ev.mc_scores(correct[0], correct, incorrect)
    e = math.exp
    assert mc1 == 1.0
    assert mc2 == pytest.approx((e(-1) + e(-2)) / (e(-1) + e(-2) + e(-1.5) + e(-3)))
    # best below an incorrect answer (and a tie) is an MC1 miss; MC2 still counts the mass
    assert ev.mc_scores(-2.0, torch.tensor([-2.0, -0.5]), torch.tensor([-1.0]))[0] == 0.0
    assert ev.mc_scores(-1.0, torch.tensor([-1.0]), torch.tensor([-1.0]))[0] == 0.0


def _patch_scores(monkeypatch, table: dict[tuple[str, str], float]):
    """Replace the model scorer with a lookup of (prompt, response) -> log-prob."""
    calls = []

    def fake(model, tokenizer, items, **kwargs):
        calls.append(list(items))
        return torch.tensor([table[item] for item in items], dtype=torch.float32)

    monkeypatch.setattr(ev, "sequence_logprobs", fake)
    return calls


def test_truthfulqa_mc_on_known_logprobs(monkeypatch):
    questions = [
        # best is also listed among the correct answers: counted once
        MCQuestion("q1", "b1", ["b1", "c1"], ["i1", "i2"], "g1"),
        MCQuestion("q2", "b2", ["c2"], ["i3"], "g2"),
    ]
    table = {
        ("q1", "b1"): -1.0,
        ("q1", "c1"): -3.0,
        ("q1", "i1"): -2.0,
        ("q1", "i2"): -4.0,
        ("q2", "b2"): -5.0,
        ("q2", "c2"): -1.0,
        ("q2", "i3"): -2.0,
    }
    calls = _patch_scores(monkeypatch, table)
    out = ev.truthfulqa_mc(None, None, questions, progress=False)
    e = math.exp
    mc2_q1 = (e(-1) + e(-3)) / (e(-1) + e(-3) + e(-2) + e(-4))
    mc2_q2 = (e(-5) + e(-1)) / (e(-5) + e(-1) + e(-2))
    assert len(calls[0]) == 7  # b1 not scored twice
    assert out["n"] == 2
    assert out["mc1"] == pytest.approx(0.5)  # q1: -1 > -2; q2: -5 < -2
    assert out["mc2"] == pytest.approx((mc2_q1 + mc2_q2) / 2)
    assert out["mc1_se"] == pytest.approx(math.sqrt(0.25 / 2))
    assert out["mc2_se"] == pytest.approx(abs(mc2_q1 - mc2_q2) / math.sqrt(2) / math.sqrt(2))


def test_pairwise_logprob_accuracy_on_known_logprobs(monkeypatch):
    pairs = [
        PreferencePair("p1", "good", "bad"),
        PreferencePair("p2", "good", "bad"),
        PreferencePair("p3", "good", "bad"),
        PreferencePair("p4", "good", "bad"),
    ]
    table = {
        ("p1", "good"): -1.0,
        ("p1", "bad"): -2.0,  # right
        ("p2", "good"): -3.0,
        ("p2", "bad"): -2.0,  # wrong
        ("p3", "good"): -2.0,
        ("p3", "bad"): -2.0,  # tie: wrong
        ("p4", "good"): -0.5,
        ("p4", "bad"): -9.0,
    }  # right
    _patch_scores(monkeypatch, table)
    out = ev.pairwise_logprob_accuracy(None, None, pairs, progress=False)
    assert out["accuracy"] == pytest.approx(0.5)
    assert out["n"] == 4
    assert out["se"] == pytest.approx(math.sqrt(0.25 / 4))
    assert out["mean_margin"] == pytest.approx((1.0 - 1.0 + 0.0 + 8.5) / 4)


def test_pairwise_accuracy_on_the_tiny_model_agrees_with_direct_logprobs(tiny):
    model, tok = tiny
    pairs = [
        PreferencePair("Human: hi\n\nAssistant: hello\n\nHuman: how are you?", "Fine, thanks.", "Go away."),
        PreferencePair("Is it true?", "No, that is a myth.", "Yes"),
    ]
    out = ev.pairwise_logprob_accuracy(model, tok, pairs, progress=False)
    expected = [
        _direct_logprob(model, tok, p.prompt, p.chosen)[0] > _direct_logprob(model, tok, p.prompt, p.rejected)[0]
        for p in pairs
    ]
    assert out["accuracy"] == pytest.approx(sum(expected) / 2)


def test_per_item_logprob_outcomes_are_returned_for_paired_comparisons(monkeypatch):
    _patch_scores(monkeypatch, {("p", "a"): -1.0, ("p", "b"): -2.0})
    items = ev.pairwise_logprob_accuracy(None, None, [PreferencePair("p", "a", "b")], progress=False, per_item=True)
    assert items["accuracy_items"] == [1.0] and items["margins"] == [1.0]


def test_filter_stats_counts_and_agreement():
    stats = ev.filter_stats(
        {"A": [True, True, False, False], "B": [True, False, False, True], "WO RM": torch.ones(4, dtype=torch.bool)}
    )
    assert stats["n_generated"] == 4
    assert stats["kept"] == {"A": 2, "B": 2, "WO RM": 4}
    assert stats["kept_fraction"]["A"] == 0.5
    assert stats["agreement"]["A"]["B"] == pytest.approx(0.5)
    assert stats["agreement"]["A"]["WO RM"] == pytest.approx(0.5)
    assert stats["agreement"]["B"]["B"] == 1.0
    with pytest.raises(ValueError):
        ev.filter_stats({"A": [True], "B": [True, False]})


def test_seed_interval_is_a_t_interval():
    mean, low, high = ev.seed_interval([60.0, 62.0, 64.0])
    assert mean == 62.0 and high - mean == pytest.approx(mean - low)
    assert high - mean == pytest.approx(4.302653 * 2 / np.sqrt(3), rel=1e-5)  # t(0.975, 2) · sd / √3
    assert ev.seed_interval([55.0, 55.0]) == (55.0, 55.0, 55.0)
    assert np.isnan(ev.seed_interval([55.0])[1])
