"""The exercise checks accept a right answer and reject a wrong one with a useful message."""

import pytest
import torch

from srlib import checks


def test_right_answers_pass(capsys):
    checks.activation_frequencies(lambda f: (f > 0).float().mean(0))
    checks.separation_scores(lambda w, r: (w - r, r - w))
    checks.top_k_latents(lambda s, k: torch.sort(-s, stable=True).indices[:k])
    checks.projection_features(lambda Z, W, iw, il: torch.cat([Z @ W[iw].T, Z @ W[il].T], 1))
    checks.margin_loss(lambda w, r, g: torch.clamp(g - (w - r), min=0).mean())
    checks.bt_loss(lambda w, r: -torch.nn.functional.logsigmoid(w - r).mean())
    checks.fraction_of_variance_explained(lambda z, zh: 1 - ((z - zh) ** 2).sum() / ((z - z.mean(0)) ** 2).sum())
    checks.mc2(lambda c, i: torch.cat([c, i]).softmax(0)[: len(c)].sum())
    out = capsys.readouterr().out
    assert out.count("correct on") == 8


@pytest.mark.parametrize(
    "check, wrong, message",
    [
        (checks.activation_frequencies, lambda f: (f >= 0).float().mean(0), "value"),
        (checks.separation_scores, lambda w, r: (r - w, w - r), "result 0"),
        (checks.top_k_latents, lambda s, k: torch.argsort(-s)[:k].flip(0), "top_k_latents"),
        (checks.projection_features, lambda Z, W, iw, il: torch.cat([Z @ W[il].T, Z @ W[iw].T], 1), "projection"),
        (checks.margin_loss, lambda w, r, g: (g - (w - r)).mean(), "margin_loss"),
        (checks.bt_loss, lambda w, r: torch.log1p(torch.exp(r - w)).mean(), "finite"),
        (checks.mc2, lambda c, i: c.exp().sum() / torch.cat([c, i]).exp().sum(), "very negative"),
        (checks.separation_scores, lambda w, r: w - r, "tuple"),
    ],
)
def test_wrong_answers_fail_naming_the_case(check, wrong, message):
    with pytest.raises(AssertionError, match=message):
        check(wrong)


def _nearest(samples, training):
    mean = training.mean(0)
    x, t = samples - mean, training - mean
    return ((x / x.norm(dim=1, keepdim=True)) @ (t / t.norm(dim=1, keepdim=True)).T).max(1).values


def _paired(after, before):
    d = torch.as_tensor(after, dtype=torch.float64) - torch.as_tensor(before, dtype=torch.float64)
    return float(d.mean()), float(d.std() / len(d) ** 0.5)


def test_the_chapter_6_and_7_checks_pass_right_answers_and_reject_wrong_ones(capsys):
    checks.agreement(lambda a, b: float((a == b).float().mean()))
    checks.nearest_similarity(_nearest)
    checks.paired_difference(_paired)
    assert capsys.readouterr().out.count("correct on") == 3
    with pytest.raises(AssertionError, match="agreement"):
        checks.agreement(lambda a, b: float((a & b).float().mean()))  # counts only "both keep"
    with pytest.raises(AssertionError, match="nearest_similarity"):
        checks.nearest_similarity(
            lambda s, t: (
                torch.nn.functional.normalize(s, dim=1).matmul(torch.nn.functional.normalize(t, dim=1).T).max(1).values
            )
        )  # forgot to center
    with pytest.raises(AssertionError, match="result 1"):
        checks.paired_difference(
            lambda a, b: (_paired(a, b)[0], (_paired(a, b)[1] ** 2 * 2) ** 0.5)
        )  # unpaired-style SE
