"""COPY row rewriting keeps each format's escaping and quoting, and NULL as NULL."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from dbguard.masking.copy import CopyPlan, _text_masker, mask_copy_row

REDACT = {1: lambda v: "****"}


def test_text_format_masks_the_field_and_keeps_escapes_and_null():
    plan = CopyPlan(maskers=REDACT)
    assert mask_copy_row(b"1\tsecret\\tvalue\tx\\\\y\n", plan) == b"1\t****\tx\\\\y\n"
    assert mask_copy_row(b"1\t\\N\tz\n", plan) == b"1\t\\N\tz\n"


def test_the_null_strategy_gives_the_formats_null_never_the_value():
    plan = CopyPlan(maskers={1: _text_masker("null", {}, b"k")})
    assert mask_copy_row(b"1\t123-45-6789\tx\n", plan) == b"1\t\\N\tx\n"
    plan_with_null = CopyPlan(maskers={1: _text_masker("null", {}, b"k")}, csv=True, delimiter=",", null="")
    assert mask_copy_row(b'1,123-45-6789,x\n', plan_with_null) == b"1,,x\n"
    assert mask_copy_row(b'1,"123-45-6789",x\n', plan_with_null) == b"1,,x\n"


def test_text_format_with_a_custom_delimiter_respects_escaped_delimiters():
    plan = CopyPlan(maskers={0: lambda v: v.upper() + "|"}, delimiter="|")
    assert mask_copy_row(b"a\\|b|c\n", plan) == b"A\\|B\\||c\n"


def test_csv_masks_quoted_and_unquoted_fields_and_keeps_null():
    plan = CopyPlan(maskers=REDACT, csv=True, delimiter=",", null="")
    assert mask_copy_row(b'1,"a ""quoted"", value",x\n', plan) == b'1,"****",x\n'
    assert mask_copy_row(b"1,plain,x\n", plan) == b'1,"****",x\n'
    assert mask_copy_row(b"1,,x\n", plan) == b"1,,x\n"  # NULL stays NULL
    assert mask_copy_row(b'1,"",x\n', plan) == b'1,"****",x\n'  # an empty string is a value


@given(st.lists(st.text(alphabet=st.characters(blacklist_categories=["Cs"]), max_size=8), min_size=2, max_size=4))
def test_csv_fields_other_than_the_masked_one_survive_unchanged(values: list[str]):
    def quote(v: str) -> str:
        return '"' + v.replace('"', '""') + '"'
    line = (",".join(quote(v) for v in values) + "\n").encode()
    plan = CopyPlan(maskers={1: lambda v: "X"}, csv=True, delimiter=",", null="")
    expected = ",".join(quote(v) if i != 1 else '"X"' for i, v in enumerate(values)) + "\n"
    assert mask_copy_row(line, plan).decode() == expected
