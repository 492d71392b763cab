"""Confidential Containers init-data: the TOML a guest may send with its attestation, read before any check."""

from __future__ import annotations

import hashlib

import pytest

from keybroker.errors import EvidenceError
from keybroker.wire import initdata

DOCUMENT = 'version = "0.1.0"\nalgorithm = "sha384"\n[data]\n"aa.toml" = \'\'\'\n[token_configs.coco_as]\n' \
           'url = "http://127.0.0.1:8080"\n\'\'\'\n'


def test_a_document_and_its_digest():
    parsed = initdata.from_json({"format": "toml", "body": DOCUMENT})
    assert parsed.digest == hashlib.sha384(DOCUMENT.encode()).digest() and parsed.files == ("aa.toml",)


@pytest.mark.parametrize("deep", [
    "a" + ".a" * 5000 + " = 1\n",                         # one dotted key: memory quadratic in its parts
    "[" + "a" + ".a" * 5000 + "]\n" + "k = 1\n" * 100,    # a header: each line under it walks all its parts
    "x = {" + "a" + ".a" * 5000 + " = 1}\n",              # a dotted key in an inline table
    "a" + '."\u2028"' * 2000 + " = 1\n",                   # U+2028 ends no TOML line: the key is one line
])
def test_keys_too_deep_to_parse_cheaply_are_refused_before_parsing(deep):
    with pytest.raises(EvidenceError, match="more than 64 dots"):
        initdata.parse(DOCUMENT + deep)
