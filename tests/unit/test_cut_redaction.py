"""Replacement of a user id that a cut mark or the end of a text cuts short."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.processor import (
    _CUT_MARK,
    _MAX_CUTS_CHECKED,
    _MIN_KEY_TO_REDACT,
    _replace_cut_prefix,
)

MARK = "\u2026 (5000 characters)"
PSEUDONYM = "<pseudonym>"


def _reference(text: str, user_id: str, pseudonym: str) -> str:
    """Replace cut ids by trying every prefix length, which takes time quadratic in the id."""
    marks = itertools.islice(_CUT_MARK.finditer(text), _MAX_CUTS_CHECKED)
    ends = [match.start() for match in marks] + [len(text)]
    for end in reversed(ends):
        for length in range(min(len(user_id) - 1, end), _MIN_KEY_TO_REDACT - 1, -1):
            start = end - length
            glued = start > 0 and user_id[0].isalnum() and text[start - 1].isalnum()
            if glued and len(user_id) < 8:
                # A short id inside a longer word is not the id.
                continue
            if text[start:end] == user_id[:length]:
                text = text[:start] + pseudonym + text[end:]
                break
    return text


# Few letters, so that ids repeat inside texts, plus the characters of a cut
# mark, so that an id can contain part of a mark.
_LETTERS = "ab"
_MARK_CHARACTERS = '"\u2026 (1) characters'

_CUT_MARKS = st.builds(
    lambda quote, count: f"{quote}\u2026 ({count} characters)",
    st.sampled_from(["", '"']),
    st.integers(min_value=0, max_value=99_999),
)
_USER_IDS = st.one_of(
    st.text(alphabet=_LETTERS, max_size=14),
    # Ids that overlap themselves, such as "aaaa" and "abab".
    st.builds(
        lambda unit, count: unit * count,
        st.text(alphabet=_LETTERS, min_size=1, max_size=3),
        st.integers(min_value=1, max_value=8),
    ),
    st.text(alphabet=_LETTERS + _MARK_CHARACTERS, max_size=14),
    # Ids that contain a whole cut mark, so that replacing a cut id can
    # remove the mark of an earlier cut.
    st.builds(
        lambda head, mark, tail: head + mark + tail,
        st.text(alphabet=_LETTERS, max_size=3),
        _CUT_MARKS,
        st.text(alphabet=_LETTERS, max_size=3),
    ),
)


@st.composite
def _texts_and_ids(draw: st.DrawFn) -> tuple[str, str, str]:
    user_id = draw(_USER_IDS)
    piece = st.one_of(
        st.text(alphabet=_LETTERS + _MARK_CHARACTERS, max_size=6),
        st.integers(min_value=0, max_value=len(user_id)).map(lambda length: user_id[:length]),
        _CUT_MARKS,
    )
    text = "".join(draw(st.lists(piece, max_size=30)))
    pseudonym = draw(st.text(alphabet=_LETTERS + _MARK_CHARACTERS, max_size=5))
    return text, user_id, pseudonym


@settings(max_examples=500, deadline=None)
@given(_texts_and_ids())
def test_cut_prefix_matches_reference(case: tuple[str, str, str]) -> None:
    text, user_id, pseudonym = case
    assert _replace_cut_prefix(text, user_id, pseudonym) == _reference(text, user_id, pseudonym)


@pytest.mark.parametrize(
    ("user_id", "run_after"),
    [
        ("a" * 2000, PSEUDONYM),
        ("a" * 1999 + "b", PSEUDONYM),
        ("a" * 1000 + "b" + "a" * 999, "a" * 500 + PSEUDONYM),
        ("aaa" + "b" * 1997, "a" * 1497 + PSEUDONYM),
        ("b" + "a" * 1999, "a" * 1500),
        ("ab" * 1000, "a" * 1500),
        ("aab" * 666 + "aa", "a" * 1500),
        ("aa" + "b" * 1998, "a" * 1500),
    ],
    ids=[
        "all a",
        "b at the end",
        "b in the middle",
        "three a first",
        "b first",
        "ab repeated",
        "aab repeated",
        "two a first",
    ],
)
def test_cut_prefix_of_long_repetitive_id(user_id: str, run_after: str) -> None:
    # Nine runs of 1500 "a" between eight cut marks, so every cut ends a run
    # that many starts of the id match.
    text = MARK.join(["a" * 1500] * 9)
    assert _replace_cut_prefix(text, user_id, PSEUDONYM) == MARK.join([run_after] * 9)


def test_cut_prefix_when_id_contains_mark() -> None:
    # The text ends with the id less its last character, and the only cut
    # mark of the text lies inside that start of the id. Replacing the start
    # removes the mark and leaves the text shorter than the mark's position,
    # where no start of the id can end any more.
    user_id = "a\u2026 (0 characters)a"
    text = "a\u2026 (0 cha" + user_id[:-1]
    assert _replace_cut_prefix(text, user_id, "") == "a\u2026 (0 cha"
    assert _replace_cut_prefix(text, user_id, PSEUDONYM) == "a\u2026 (0 cha" + PSEUDONYM
