"""Resource patterns: ``*`` matches any run of characters, ``/`` included; nothing else is a wildcard."""

from __future__ import annotations

from fnmatch import fnmatchcase

from hypothesis import given
from hypothesis import strategies as st

from keybroker.wire.resource import pattern_matches, pattern_parts

# fnmatch agrees where a pattern holds no wildcard but '*' (resource patterns cannot: check_pattern).
names = st.text(alphabet="ab/.", max_size=12)
patterns = st.text(alphabet="ab/.*", max_size=8)


@given(patterns, names)
def test_a_pattern_matches_what_fnmatch_matches_with_star_its_only_wildcard(pattern, name):
    assert pattern_matches(name, pattern_parts(pattern)) == fnmatchcase(name, pattern)


def test_a_name_that_overlaps_the_pattern_s_ends_is_no_match():
    assert not pattern_matches("ab", pattern_parts("ab*ab"))  # the parts may not share characters
    assert pattern_matches("abab", pattern_parts("ab*ab")) and pattern_matches("aXa", pattern_parts("a*a"))
    assert pattern_matches("default/disk/root", pattern_parts("default/*"))
    assert not pattern_matches("other/default/disk", pattern_parts("default/*"))


def test_the_parts_between_wildcards_may_not_share_characters_either():
    """Each middle part is looked for after the previous one ends: a rule '*secret*secret*' grants
    no resource that names 'secret' once, and 'x*ab*ba*y' needs 'ab' and then 'ba', not 'aba'."""
    assert not pattern_matches("a", pattern_parts("*a*a*"))
    assert not pattern_matches("d/secret/k", pattern_parts("*secret*secret*"))
    assert not pattern_matches("xabay", pattern_parts("x*ab*ba*y"))
    assert pattern_matches("xabbay", pattern_parts("x*ab*ba*y"))
