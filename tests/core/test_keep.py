"""The keep type: one place that parses, checks, broadcasts and formats the budget (docs/ATS.md section 2)."""

from __future__ import annotations

import re

import pytest
from yardstick import budget as spec_budget

from ats_deploy.errors import UserError
from ats_deploy.keep import Keep, format_keep, per_stage


@pytest.mark.parametrize(
    ("given", "values"),
    [("0.7", (0.7,)), (" 0.9, 0.8 ,0.7", (0.9, 0.8, 0.7)), (0.5, (0.5,)), (98, (98.0,)), ([1.0, 40.0], (1.0, 40.0))],
)
def test_every_form_parses_to_the_same_type(given, values):
    keep = Keep.parse(given)
    assert keep.values == values and Keep.parse(keep) is keep


@pytest.mark.parametrize(
    ("given", "message"),
    [
        ("nan", "is invalid"),
        ("inf", "is invalid"),
        ("0", "is invalid"),
        ("-0.5", "is invalid"),
        ("1.5", "clamp(floor(1.5), P + 1, n0) = 2 tokens (the floor P + 1"),  # not "floor(1.5) = 1": it clamps
        ("98.5", "clamp(floor(98.5), P + 1, n0) = 98 tokens (for a model of at least 98)"),
        ("", "keep is empty"),
        ("0.7,x", "cannot read --keep '0.7,x'"),
    ],
)
def test_bad_values_are_refused_with_one_message(given, message):
    with pytest.raises(UserError, match=re.escape(message)):
        Keep.parse(given)


def test_one_value_broadcasts_and_a_list_must_match_the_stages():
    assert per_stage("0.7", 3) == [0.7, 0.7, 0.7]
    assert per_stage("0.9,0.8,0.7", 3) == [0.9, 0.8, 0.7]
    with pytest.raises(UserError, match="keep has 2 values but the model has 3 ATS stages"):
        per_stage("0.9,0.8", 3)


@pytest.mark.parametrize("value", [1e-6, 0.01, 0.3, 0.5, 0.7, 1.0, 2.0, 40.0, 197.0, 1000.0])
def test_budgets_are_the_spec_budgets(value):
    assert Keep((value,)).budgets(2, 197) == [spec_budget(value, 197)] * 2


def test_notes_name_values_the_floors_raise():
    floor = "keep 1e-09 gives K = 8 tokens, the floor of spec section 2 (it asks for 0)"
    assert Keep((1e-9, 0.7)).notes(197) == [floor]
    assert Keep((0.7, 98.0)).notes(197) == []


def test_formatting_is_one_value_or_the_list():
    assert str(Keep((0.7, 0.7))) == "0.7" and str(Keep((0.9, 0.8))) == "0.9,0.8"
    assert format_keep([]) == "-" and format_keep([0.5] * 9) == "0.5"


def test_a_model_without_ats_stages_has_no_budget():
    assert per_stage([], 0) == []
    with pytest.raises(UserError, match="keep is empty"):
        per_stage([], 3)


def test_a_mix_is_comma_separated_keeps_each_checked_with_colons_between_stages():
    """``loadtest --keep``: the same rules as any keep, per-stage values joined with ':' and labelled the same way."""
    mix = Keep.parse_mix("0.9:0.8:0.7, 0.5,98")
    assert [k.values for k in mix] == [(0.9, 0.8, 0.7), (0.5,), (98.0,)]
    assert [k.mix_label for k in mix] == ["0.9:0.8:0.7", "0.5", "98"]
    assert [k.mix_label for k in Keep.parse_mix(Keep((0.5, 0.5)).mix_label)] == ["0.5"]
    with pytest.raises(UserError, match=re.escape("cannot read --keep '0.5,x'")) as caught:
        Keep.parse_mix("0.5,x")
    assert "per-stage keep joins its stage values with ':'" in str(caught.value)
    for bad, message in (("0.5,,0.7", "cannot read --keep"), ("0.5,1.5", "clamp(floor(1.5)"), ("0.5:0", "is invalid")):
        with pytest.raises(UserError, match=re.escape(message)):
            Keep.parse_mix(bad)
