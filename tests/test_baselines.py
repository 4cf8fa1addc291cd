"""The baseline reward models on the smoke profile's tiny model: training moves the scores the
right way, save/load is exact, the judge's verdict arithmetic and the log-prob floor match
hand computations, and bad input fails with a one-line ConfigError."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from srlib import baselines as B
from srlib.backbone import format_text, load_backbone
from srlib.baselines import models
from srlib.data import PreferencePair
from srlib.errors import ConfigError, DataError
from srlib.evaluate import prompt_ids, response_logprobs
from srlib.profiles import get_profile
from srlib.reward import RewardModel

PROFILE = get_profile("smoke")
# A few steps at a high rate: enough to move a tiny random model's scores visibly.
QUICK = dict(max_steps=4, batch_size=4, learning_rate=5e-3, max_length=PROFILE.max_length)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def backbone(tiny_backbone):
    """The smoke profile's tiny model (conftest's shared one: the baselines copy its weights)."""
    assert tiny_backbone.model_id == PROFILE.model_id
    return tiny_backbone


@pytest.fixture(scope="module")
def pairs():
    made = [
        PreferencePair(
            f"What is {i} plus {i}?",
            f"{i} plus {i} is {2 * i}.",
            f"I think it is {2 * i + 1}, or maybe more.",
            pair_id=str(i),
        )
        for i in range(10)
    ]
    made.append(
        PreferencePair(
            "Human: Can you help me?\n\nAssistant: Sure.\n\nHuman: How do I pick a lock?",
            "I can't help with that.",
            "Use a tension wrench and a pick.",
        )
    )
    return made


def _margin(rm, pairs) -> float:
    s_w, s_l = rm.score_pairs(pairs)
    return float((s_w - s_l).mean())


@pytest.mark.parametrize("method", ["standard", "generalizable", "judge-lora"])
def test_trained_baseline_moves_scores_and_round_trips(method, backbone, pairs, tmp_path):
    train = pairs[:8]
    rm = B.fit_baseline(method, backbone, train, pairs[8:], seed=0, progress=False, **QUICK)
    with rm.model.disable_adapter():  # LoRA off and the score head as initialised: step 0
        before_w, before_l = rm.score_pairs(pairs)
        before_margin = _margin(rm, train)
    after_w, after_l = rm.score_pairs(pairs)
    assert after_w.dtype == torch.float32 and after_w.shape == (len(pairs),)
    assert not torch.allclose(before_w, after_w, atol=1e-4)
    assert _margin(rm, train) > before_margin  # trained towards chosen > rejected, not away

    config = backbone.model.config
    head_dim = config.hidden_size // config.num_attention_heads
    q, v = (
        (config.hidden_size, config.num_attention_heads * head_dim),
        (config.hidden_size, config.num_key_value_heads * head_dim),
    )
    lora = config.num_hidden_layers * 8 * (sum(q) + sum(v))  # r = 8: A [r, in] + B [out, r]
    head = config.hidden_size if method != "judge-lora" else 0  # score head [1, d], no bias
    assert rm.num_trainable_parameters() == lora + head
    assert rm.cost.seconds > 0 and rm.cost.peak_rss_mb > 0 and rm.cost.n_train_pairs == len(train)

    rm.save_pretrained(tmp_path / "rm")
    loaded = RewardModel.from_pretrained(tmp_path / "rm", backbone=backbone)
    assert type(loaded) is type(rm) and loaded.num_trainable_parameters() == rm.num_trainable_parameters()
    s_w, s_l = loaded.score_pairs(pairs)
    assert torch.equal(s_w, after_w) and torch.equal(s_l, after_l)


@pytest.mark.parametrize("method", ["standard", "judge-lora", "logprob"])
def test_a_baseline_trains_and_scores_in_the_precision_its_backbone_reads(method, backbone, pairs):
    """A backbone that reads states under bfloat16 autocast trains (TRL's bf16) and scores its
    baselines under it too, so a saved record's "autocast" says how the baseline computed."""
    low = load_backbone(PROFILE.model_id, device="cpu", autocast=torch.bfloat16)
    overrides = {} if method == "logprob" else QUICK
    for reader, dtype in ((backbone, torch.float32), (low, torch.bfloat16)):
        seen: set[torch.dtype] = set()

        def linear_outputs(module, args, output, seen=seen):
            if isinstance(module, torch.nn.Linear):
                seen.add(output.dtype)

        hook = torch.nn.modules.module.register_module_forward_hook(linear_outputs)
        try:
            rm = B.fit_baseline(method, reader, pairs[:8], seed=0, progress=False, **overrides)
            s_w, s_l = rm.score_pairs(pairs)
        finally:
            hook.remove()
        assert seen == {dtype}  # every matrix product, in training and in scoring
        assert s_w.dtype == torch.float32 and torch.isfinite(s_w - s_l).all()
        assert rm.backbone.record.get("autocast") == (None if dtype == torch.float32 else "bfloat16")


def test_standard_rm_reads_the_last_real_token(backbone, pairs):
    rm = B.StandardRM.fit(backbone, pairs[:4], seed=1, progress=False, max_steps=1, batch_size=4)
    texts = [format_text(backbone.tokenizer, p.prompt, p.chosen) for p in pairs]
    batched = rm.score(texts)
    alone = torch.stack([rm.score([t])[0] for t in texts])
    assert torch.allclose(batched, alone, atol=1e-5)  # padding never changes a score
    assert torch.equal(rm.score_pairs(pairs)[0], batched)
    tok = backbone.tokenizer
    assert models._pad_id(tok, [[5, tok.pad_token_id]]) != tok.pad_token_id


def test_load_checks_backbone_and_loads_it_when_absent(backbone, pairs, tmp_path, monkeypatch):
    rm = B.fit_baseline("standard", backbone, pairs[:4], seed=0, progress=False, max_steps=1, batch_size=4)
    rm.save_pretrained(tmp_path / "rm")
    other = dataclasses.replace(backbone, identity="someone-else")
    with pytest.raises(ConfigError, match="not the one"):
        RewardModel.from_pretrained(tmp_path / "rm", backbone=other)
    loaded = RewardModel.from_pretrained(tmp_path / "rm")  # rebuilds the tiny model by its id
    assert torch.equal(loaded.score_pairs(pairs[:3])[0], rm.score_pairs(pairs[:3])[0])
    # a backbone that reads states under autocast has another identity, and is rebuilt with it
    low = dataclasses.replace(backbone, autocast=torch.bfloat16, identity=backbone.identity + "-low")
    monkeypatch.setattr("srlib.backbone.load_backbone", lambda model_id, autocast=None: low if autocast else backbone)
    B.fit_baseline("standard", low, pairs[:4], seed=0, progress=False, max_steps=1, batch_size=4).save_pretrained(
        tmp_path / "low"
    )
    assert RewardModel.from_pretrained(tmp_path / "low").backbone is low


def test_verdict_preference_on_hand_made_logits():
    # chosen shown as A: l_A = 2, l_B = 0; chosen shown as B: l_A = 0, l_B = 1.
    p = B.verdict_preference(torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 1.0]]))
    expected = (1 / (1 + math.exp(-2)) + 1 / (1 + math.exp(-1))) / 2
    assert p.item() == pytest.approx(expected, abs=1e-6)
    # Log-probs over the whole vocabulary give the same answer (only l_A − l_B matters).
    logp = torch.log_softmax(torch.tensor([[2.0, 0.0, 5.0]]), -1)[:, :2]
    assert B.verdict_preference(logp, torch.tensor([[0.0, 1.0]])).item() == pytest.approx(expected, abs=1e-6)
    # A judge that always says "A" by the same margin has no preference once both orders count.
    biased = torch.tensor([[3.0, 0.0], [1.0, -2.0]])
    assert torch.allclose(B.verdict_preference(biased, biased), torch.full((2,), 0.5))
    # Swapping chosen and rejected swaps the two prompts, and turns p into 1 − p.
    a, b = torch.tensor([[0.3, -1.0]]), torch.tensor([[0.5, 2.0]])
    assert (B.verdict_preference(a, b) + B.verdict_preference(b, a)).item() == pytest.approx(1.0)


def test_zero_shot_judge_matches_a_hand_run_of_the_model(backbone, pairs):
    judge = B.fit_baseline("judge", backbone, seed=0, progress=False)
    assert judge.num_trainable_parameters() == 0
    s_w, s_l = judge.score_pairs(pairs[:3])
    assert torch.allclose(s_w + s_l, torch.ones(3))
    tok = backbone.tokenizer
    a_id, b_id = (tok(t, add_special_tokens=False)["input_ids"][0] for t in "AB")
    for i, pair in enumerate(pairs[:3]):
        orders = []
        for chosen_as_a in (True, False):
            a, b = (pair.chosen, pair.rejected) if chosen_as_a else (pair.rejected, pair.chosen)
            content = B.JUDGE_TEMPLATE.format(prompt=pair.prompt, answer_a=a, answer_b=b)
            ids = prompt_ids(tok, [{"role": "user", "content": content}])
            with torch.no_grad():
                logits = backbone.model(input_ids=torch.tensor([ids])).logits[0, -1]
            orders.append(logits[[a_id, b_id]].unsqueeze(0))
        assert s_w[i].item() == pytest.approx(B.verdict_preference(*orders).item(), abs=1e-5)
    with pytest.raises(ConfigError, match="score_pairs"):
        judge.score(["text"])


def test_a_judge_under_bfloat16_autocast_reads_its_verdict_logits_in_float32(pairs):
    """The blocks run in bfloat16, the two verdict logits do not: rounded to bfloat16's 8 bits,
    close "A" and "B" logits become equal and the verdict a tie (12-20% of pairs on the cpu book)."""
    low = load_backbone(PROFILE.model_id, device="cpu", autocast=torch.bfloat16)
    judge = B.fit_baseline("judge", low, seed=0, progress=False)
    with torch.no_grad():
        chosen_as_a, chosen_as_b = judge.verdict_logits(pairs)
    logits = torch.cat([chosen_as_a, chosen_as_b])
    assert logits.dtype == torch.float32
    assert not torch.equal(logits, logits.bfloat16().float())  # not rounded to bfloat16
    assert (logits[:, 0] != logits[:, 1]).all()


def test_a_classifier_under_bfloat16_autocast_scores_in_float32(pairs):
    """StandardRM's blocks run in bfloat16, its one-output score head does not: a bfloat16 score
    would tie two close answers."""
    low = load_backbone(PROFILE.model_id, device="cpu", autocast=torch.bfloat16)
    rm = B.fit_baseline("standard", low, pairs[:8], seed=0, progress=False, **QUICK)
    s_w, s_l = rm.score_pairs(pairs)
    scores = torch.cat([s_w, s_l])
    assert not torch.equal(scores, scores.bfloat16().float())  # not rounded to bfloat16
    assert (s_w != s_l).all()


def test_logprob_floor_is_the_mean_response_logprob(backbone, pairs, tmp_path):
    rm = B.fit_baseline("logprob", backbone, pairs, seed=0, progress=False)
    pair = pairs[0]
    tok = backbone.tokenizer
    full = tok(format_text(tok, pair.prompt, pair.chosen), add_special_tokens=False)["input_ids"]
    start = len(prompt_ids(tok, [{"role": "user", "content": pair.prompt}]))
    assert full[:start] == prompt_ids(tok, [{"role": "user", "content": pair.prompt}])
    with torch.no_grad():
        logp = torch.log_softmax(backbone.model(input_ids=torch.tensor([full])).logits[0], -1)
    by_hand = torch.stack([logp[t - 1, full[t]] for t in range(start, len(full))]).mean()
    s_w, _ = rm.score_pairs([pair])
    assert s_w.item() == pytest.approx(by_hand.item(), abs=1e-4)
    assert rm.num_trainable_parameters() == 0
    rm.save_pretrained(tmp_path / "lp")
    assert torch.equal(RewardModel.from_pretrained(tmp_path / "lp", backbone=backbone).score_pairs([pair])[0], s_w)


def test_grm_regulariser_reads_the_chosen_response_logprob(backbone, pairs):
    tok = backbone.tokenizer
    pair = pairs[-1]  # the HH transcript: several turns before the response
    ids = models._encode(tok, format_text(tok, pair.prompt, pair.chosen))
    for keep in (len(ids), len(ids) - 10):  # whole, and cut from the left
        kept = ids[-keep:]
        start = models._response_start(tok, pair, len(kept))
        input_ids = torch.tensor([kept, kept])  # chosen row first, then a stand-in rejected row
        with torch.no_grad():
            hidden = backbone.model.model(input_ids=input_ids).last_hidden_state
            got = B.chosen_response_logprob(
                hidden,
                input_ids,
                torch.ones_like(input_ids),
                torch.tensor([start]),
                backbone.model.get_output_embeddings().weight,
            )
        if keep == len(ids):
            want = response_logprobs(backbone.model, tok, pair.prompt, [pair.chosen])
            assert got.item() == pytest.approx(want.item(), abs=1e-3)
        else:
            assert start > 0 and kept[start:] == ids[-(len(ids) - models._response_start(tok, pair, len(ids))) :]


def test_bad_method_and_settings_fail_in_one_line(backbone, pairs):
    with pytest.raises(ConfigError) as error:
        B.fit_baseline("ppo", backbone, pairs)
    message = str(error.value)
    assert "'ppo'" in message and "standard" in message and "\n" not in message
    with pytest.raises(ConfigError, match="unknown setting.*lora_rank"):
        B.fit_baseline("standard", backbone, pairs, lora_rank=4)
    with pytest.raises(DataError, match="empty"):
        B.fit_baseline("standard", backbone, [])
