"""Tests for the project-owned sentence generator (rlhf_tts.data.sentences)."""

from __future__ import annotations

import re
import time

import pytest

from rlhf_tts.data.sentences import (
    A_BEFORE_VOWEL_LETTER,
    AN_BEFORE_CONSONANT_LETTER,
    MAX_SENTENCES,
    TEMPLATE_NAMES,
    article,
    generate_sentences,
    sentence_key,
)

_TOKEN = re.compile(r"^(?:[A-Za-z']+|\d+)$")


@pytest.fixture(scope="module")
def many() -> list[str]:
    return generate_sentences(3000, 7)


def test_deterministic_by_seed() -> None:
    assert generate_sentences(200, 1) == generate_sentences(200, 1)
    assert generate_sentences(200, 1) != generate_sentences(200, 2)


def test_prefix_property() -> None:
    full = generate_sentences(1000, 3)
    for m in (0, 1, 17, 500, 999):
        assert generate_sentences(m, 3) == full[:m]


def test_distinct(many: list[str]) -> None:
    assert len(many) == 3000
    assert len({sentence_key(s) for s in many}) == 3000


def test_five_thousand_fast() -> None:
    start = time.perf_counter()
    out = generate_sentences(5000, 11)
    assert time.perf_counter() - start < 1.0
    assert len({sentence_key(s) for s in out}) == 5000


def test_bad_n_raises() -> None:
    with pytest.raises(ValueError):
        generate_sentences(-1, 0)
    with pytest.raises(ValueError):
        generate_sentences(MAX_SENTENCES + 1, 0)
    with pytest.raises(ValueError):
        generate_sentences(10**12, 0)
    assert generate_sentences(0, 0) == []


def test_shape(many: list[str]) -> None:
    for s in many:
        assert s.isascii(), s
        assert s[0].isupper(), s
        assert s[-1] in ".?!", s
        assert s[-2] not in " ,.?!", s
        assert "  " not in s and " ," not in s, s
        words = s.split()
        assert 4 <= len(words) <= 16, s
        for w in words:
            assert _TOKEN.match(w.rstrip(",.?!")), (w, s)
        assert not re.search(r"[.?!]", s[:-1]), s


def test_digit_fraction() -> None:
    out = generate_sentences(2000, 5)
    frac = sum(any(c.isdigit() for c in s) for s in out) / len(out)
    assert 0.03 <= frac <= 0.25, frac


def test_variety(many: list[str]) -> None:
    first_two = {" ".join(s.split()[:2]).lower() for s in many[:200]}
    assert len(first_two) >= 8
    assert len(TEMPLATE_NAMES) >= 10
    ends = {s[-1] for s in many}
    assert ends == {".", "?", "!"}
    for marker in ("because", "before", "when", "although", "said that", ", and", ", but"):
        assert any(marker in s.lower() for s in many), marker
    lengths = [len(s.split()) for s in many]
    assert min(lengths) <= 5 and max(lengths) >= 13


def test_article_function() -> None:
    assert article("apple") == "an"
    assert article("old") == "an"
    assert article("umbrella") == "an"
    assert article("box") == "a"
    assert article("hour") == "an"
    assert article("useful") == "a"
    assert article("university") == "a"


def test_a_an_agreement(many: list[str]) -> None:
    for s in many:
        toks = [t.strip(",.?!").lower() for t in s.split()]
        for det, nxt in zip(toks, toks[1:]):
            if det == "a":
                ok = nxt[0] not in "aeio" or nxt in A_BEFORE_VOWEL_LETTER
                assert ok, s
            elif det == "an":
                ok = (nxt[0] in "aeiou" or nxt in AN_BEFORE_CONSONANT_LETTER) and (
                    nxt not in A_BEFORE_VOWEL_LETTER
                )
                assert ok, s


def test_subject_verb_agreement(many: list[str]) -> None:
    bad = re.compile(
        r"\bi (?:is|are|were|has|does)\b"
        r"|\b(?:we|they|you) (?:is|was|am|has|does)\b"
        r"|\b(?:he|she) (?:are|were|am|do|have)\b"
    )
    for s in many:
        assert not bad.search(s.lower()), s
