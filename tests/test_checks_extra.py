"""Checks added for chapter 7: the filter rule accepts s_w > s_l and rejects near misses."""

import pytest

from srlib import checks


def test_filter_rule_accepts_the_strict_rule(capsys):
    checks.filter_rule(lambda s_w, s_l: s_w > s_l)
    checks.filter_rule(lambda s_w, s_l: [bool(w > r) for w, r in zip(s_w, s_l, strict=True)])  # a list is fine too
    assert capsys.readouterr().out.count("filter_rule: correct on 3 cases") == 2


@pytest.mark.parametrize(
    "wrong, message",
    [
        (lambda s_w, s_l: s_w >= s_l, "ties are dropped"),
        (lambda s_w, s_l: s_w < s_l, "random scores"),
        (lambda s_w, s_l: s_w.abs() > s_l.abs(), "filter_rule \\("),
        (lambda s_w, s_l: (s_w > s_l)[:-1], "shape"),
    ],
)
def test_filter_rule_rejects_wrong_rules_naming_the_case(wrong, message):
    with pytest.raises(AssertionError, match=message):
        checks.filter_rule(wrong)
