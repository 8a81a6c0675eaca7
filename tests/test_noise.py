import subprocess
import sys

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mambabyte.errors import UserError
from mambabyte.noise import CORRUPTIONS, corrupt

LONG_TEXT = ("The quick brown fox jumps over the lazy dog. Ça coûte 5 € — naïve café, 東京 and ß. " * 400)


@pytest.mark.parametrize("kind", sorted(CORRUPTIONS))
def test_output_is_valid_utf8_and_reproducible(kind):
    a = corrupt(LONG_TEXT.encode(), kind, 0.3, seed=7)
    b = corrupt(LONG_TEXT.encode(), kind, 0.3, seed=7)
    c = corrupt(LONG_TEXT.encode(), kind, 0.3, seed=8)
    assert a == b
    assert a != c
    a.decode("utf-8")  # strict: raises if a sequence was split


@given(st.text(max_size=200), st.sampled_from(sorted(CORRUPTIONS)), st.floats(0, 1), st.integers(0, 2**31))
@settings(max_examples=60, deadline=None)
def test_any_text_stays_valid_utf8(text, kind, p, seed):
    corrupt(text.encode(), kind, p, seed).decode("utf-8")


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7])
def test_drop_removes_share_p_of_characters(p):
    out = corrupt(LONG_TEXT, "drop", p, seed=1).decode()
    removed = 1 - len(out) / len(LONG_TEXT)
    assert abs(removed - p) < 0.02


def test_repeat_rate_matches_p():
    p = 0.2
    out = corrupt(LONG_TEXT, "repeat", p, seed=2).decode()
    # each chosen character gains 1..3 copies (mean 2)
    gained = (len(out) - len(LONG_TEXT)) / len(LONG_TEXT)
    assert abs(gained - 2 * p) < 0.03


def test_swap_rate_matches_p():
    p = 0.1
    out = corrupt(LONG_TEXT, "swap", p, seed=3).decode()
    assert sorted(out) == sorted(LONG_TEXT)  # a permutation
    changed = sum(a != b for a, b in zip(out, LONG_TEXT)) / len(LONG_TEXT)
    # a swap moves two characters; the first of a pair is chosen with prob ~p/(1+p); equal neighbours hide some
    assert 1.2 * p < changed < 2.2 * p


def test_uppercase_and_random_case():
    text = "abcdefghij" * 2000
    up = corrupt(text, "uppercase", 0.25, seed=4).decode()
    assert abs(sum(c.isupper() for c in up) / len(text) - 0.25) < 0.02
    assert corrupt(text, "uppercase", 1.0).decode() == text.upper()
    rc = corrupt(text, "random_case", 1.0, seed=5).decode()
    assert abs(sum(c.isupper() for c in rc) / len(text) - 0.5) < 0.02
    assert rc.lower() == text


def test_antspeak_spaces_every_character_of_chosen_words():
    assert corrupt("hello big world", "antspeak", 1.0).decode() == "H E L L O B I G W O R L D"
    words = ("word " * 5000).strip()
    out = corrupt(words, "antspeak", 0.4, seed=6).decode()
    share = out.count("W O R D") / 5000
    assert abs(share - 0.4) < 0.03


def test_invalid_utf8_bytes_pass_through():
    data = b"ab\xffcd\xfe"
    assert corrupt(data, "uppercase", 1.0) == b"AB\xffCD\xfe"


def test_bad_arguments():
    with pytest.raises(UserError):
        corrupt("x", "nope", 0.1)
    with pytest.raises(UserError):
        corrupt("x", "drop", 1.5)


def test_cli_reads_stdin_writes_stdout():
    cmd = [sys.executable, "-m", "mambabyte.cli", "corrupt", "--kind", "uppercase", "--p", "1"]
    out = subprocess.run(cmd, input="héllo".encode(), capture_output=True, check=True).stdout
    assert out == "HÉLLO".encode()
    bad = subprocess.run(cmd[:-1] + ["3"], input=b"x", capture_output=True)
    assert bad.returncode == 2 and b"Traceback" not in bad.stderr and len(bad.stderr.splitlines()) == 1
