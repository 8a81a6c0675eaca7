import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mambabyte.errors import UserError
from mambabyte.subword import SubwordTokenizer

DOCS = [("the quick brown fox jumps over the lazy dog; " * 30 + f"ça {i}").encode() for i in range(10)]


@pytest.fixture(scope="module")
def tokenizer():
    return SubwordTokenizer.train(DOCS, vocab_size=320)


@given(st.binary(max_size=64))
@settings(max_examples=200, deadline=None)
def test_any_bytes_round_trip_exactly(tokenizer, data):
    assert tokenizer.decode(tokenizer.encode(data)) == data


def test_learns_merges_and_saves(tokenizer, tmp_path):
    assert 256 < tokenizer.vocab_size <= 320  # BPE stops early once no pair repeats
    text = b"the quick brown fox"
    assert len(tokenizer.encode(text)) < len(text) // 2  # merges compress seen text
    loaded = SubwordTokenizer.load(tokenizer.save(tmp_path / "tok"))
    assert loaded.encode(text) == tokenizer.encode(text)
    assert loaded.token_bytes == tokenizer.token_bytes


def test_errors(tmp_path):
    with pytest.raises(UserError):
        SubwordTokenizer.train(DOCS, vocab_size=100)
    with pytest.raises(UserError):
        SubwordTokenizer.load(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(UserError):
        SubwordTokenizer.load(tmp_path)


def test_tokenizer_cli(tmp_path):
    import subprocess
    import sys

    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "docs" / f"{i}.txt").write_bytes(doc)
    cmd = [sys.executable, "-m", "mambabyte.cli", "tokenizer", "train", "--data", str(tmp_path / "docs"),
           "--vocab-size", "300", "--out", str(tmp_path / "tok")]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert SubwordTokenizer.load(tmp_path / "tok").vocab_size <= 300
    bad = subprocess.run(cmd[:6] + ["100"] + cmd[7:], capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
