"""StopStringMatcher and match_stop_token_ids against brute-force oracles, for every way of splitting the text."""

from __future__ import annotations

import random

import pytest

from rtp_mm.llm.engine.stop_words import StopStringMatcher, match_stop_token_ids


def expected_output(text: str, stop_strings: list[str], include_stop: bool) -> tuple[str, bool]:
    """Oracle: read one character at a time; stop at the first position where some stop string ends (longest)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stop_strings if text[:end].endswith(s)]
        if ending:
            stop = max(ending, key=len)
            return text[: end if include_stop else end - len(stop)], True
    return text, False


def run_matcher(deltas: list[str], stop_strings: list[str], include_stop: bool) -> tuple[str, bool]:
    matcher = StopStringMatcher(stop_strings, include_stop=include_stop)
    shown, stopped = [], False
    seen = ""
    for delta in deltas:
        seen += delta
        out, stopped = matcher.feed(delta)
        shown.append(out)
        # What is shown never runs ahead of the oracle's answer for the text seen so far.
        assert expected_output(seen, stop_strings, include_stop)[0].startswith("".join(shown))
    shown.append(matcher.flush())
    if stopped:
        assert matcher.feed("more") == ("", True)
    return "".join(shown), stopped


def all_two_way_splits(text: str):
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]


def random_splits(text: str, rng: random.Random):
    deltas, i = [], 0
    while i < len(text):
        size = rng.choice([0, 1, 1, 2, 3, 7])
        deltas.append(text[i : i + size])
        i += size
    return deltas


CASES = [
    ("hello world</s>ignored", ["</s>"]),
    ("abaabab tail", ["abab"]),  # the first "aba" is a false start that overlaps the real match
    ("aaab", ["aab"]),
    ("xx\n\nUser: hi", ["</s>", "\n\nUser:"]),
    ("one two three", ["three", "two"]),  # the earliest end wins, not the list order
    ("abc", ["bc", "abc"]),  # same end: the longest
    ("abc", ["abc", "b"]),  # "b" completes first
    ("no stop here", ["</s>", "STOP"]),
    ("ends with a partial </", ["</s>"]),
    ("ééé🙂 stop🙂", ["🙂 s", "p🙂"]),
    ("", ["x"]),
]


@pytest.mark.parametrize("include_stop", [False, True])
@pytest.mark.parametrize(("text", "stop_strings"), CASES)
def test_every_split_matches_the_oracle(text, stop_strings, include_stop):
    expected = expected_output(text, stop_strings, include_stop)
    assert run_matcher([text], stop_strings, include_stop) == expected
    assert run_matcher(list(text), stop_strings, include_stop) == expected
    for deltas in all_two_way_splits(text):
        assert run_matcher(deltas, stop_strings, include_stop) == expected
    rng = random.Random(len(text))
    for _ in range(20):
        assert run_matcher(random_splits(text, rng), stop_strings, include_stop) == expected


def test_random_texts_over_a_small_alphabet():
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice("ab ") for _ in range(rng.randrange(0, 20)))
        num_stops = rng.randrange(1, 3)
        stop_strings = ["".join(rng.choice("ab") for _ in range(rng.randrange(1, 5))) for _ in range(num_stops)]
        include_stop = rng.random() < 0.5
        expected = expected_output(text, stop_strings, include_stop)
        assert run_matcher(random_splits(text, rng), stop_strings, include_stop) == expected


def test_holds_back_a_possible_stop_prefix_and_flush_releases_it():
    matcher = StopStringMatcher(["</s>", "\n\nUser:"])
    assert matcher.feed("hello </") == ("hello ", False)
    assert matcher.feed("b>") == ("</b>", False)
    assert matcher.feed(" bye\n\nUs") == (" bye", False)
    assert matcher.flush() == "\n\nUs"
    assert matcher.flush() == ""


def test_after_a_stop_nothing_more_comes_out():
    matcher = StopStringMatcher(["END"], include_stop=True)
    assert matcher.feed("abc E") == ("abc ", False)
    assert matcher.feed("ND and more") == ("END", True)
    assert matcher.stopped
    assert matcher.feed("x") == ("", True)
    assert matcher.flush() == ""


def test_no_stop_strings_passes_text_through():
    matcher = StopStringMatcher([])
    assert matcher.feed("anything") == ("anything", False)
    assert matcher.flush() == ""


def test_empty_stop_string_is_rejected():
    with pytest.raises(ValueError, match="non-empty"):
        StopStringMatcher(["ok", ""])


def test_match_stop_token_ids():
    stops = [[5], [3, 4, 5], [4, 5], [9, 9]]
    assert match_stop_token_ids([1, 2, 3, 4, 5], stops) == 3
    assert match_stop_token_ids([1, 2, 4, 5], stops) == 2
    assert match_stop_token_ids([5], stops) == 1
    assert match_stop_token_ids([1, 2, 3, 4], stops) is None
    assert match_stop_token_ids([], stops) is None
    assert match_stop_token_ids([9], stops) is None
    assert match_stop_token_ids([9, 9], [[], [9, 9]]) == 2
    assert match_stop_token_ids([1, 2], []) is None


def test_match_stop_token_ids_against_brute_force():
    rng = random.Random(1)
    for _ in range(500):
        generated = [rng.randrange(3) for _ in range(rng.randrange(0, 8))]
        stops = [[rng.randrange(3) for _ in range(rng.randrange(1, 4))] for _ in range(rng.randrange(0, 4))]
        lengths = [len(s) for s in stops if len(s) <= len(generated) and generated[len(generated) - len(s) :] == s]
        assert match_stop_token_ids(generated, stops) == (max(lengths) if lengths else None)
