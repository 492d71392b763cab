"""parse_json and decimal, the readers of what others sent, in process (the server's tests see them over HTTP)."""

from __future__ import annotations

import pytest

from keybroker.wire import decimal, parse_json


@pytest.mark.parametrize("text, unique, message", [
    ('{"a": 1, "a": 2}', True, "member 'a' appears twice"),
    ("[" * 200_000 + "]" * 200_000, False, "nested too deeply"),
    ('"\\ud800"', False, "lone UTF-16 surrogate"),
    (b'"\xed\xa0\x80"', False, "can't decode"),        # a surrogate encoded in UTF-8's form
    ('"x"'.encode("utf-16"), False, "can't decode"),  # json.loads alone reads UTF-16
])
def test_what_is_not_json_text_is_a_value_error(text, unique, message):
    with pytest.raises(ValueError, match=message):
        parse_json(text, unique=unique)


def test_what_is_json_text_is_read():
    assert parse_json('{"a": 1, "a": 2}') == {"a": 2}  # without unique, the last member, as json.loads
    assert parse_json(b'["\\ud83d\\ude00"]', unique=True) == ["\U0001f600"]  # a pair is one character


@pytest.mark.parametrize("text, digits, value", [
    ("0", 20, 0), ("9" * 20, 20, 10**20 - 1), ("9" * 21, 20, None), ("9" * 5000, 20, None), ("65535", 5, 65535),
    ("123456", 5, None), ("", 20, None), ("²", 20, None), ("-1", 20, None), ("+1", 20, None), (" 1", 20, None),
])
def test_decimal_reads_at_most_its_digits_of_ascii(text, digits, value):
    assert decimal(text, digits) == value
