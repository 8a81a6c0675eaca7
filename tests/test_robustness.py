"""Byte vs subword bits per byte under character noise, and `mambabyte robustness`, on tiny random models."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest
import torch

from mambabyte.checkpoint import load_pretrained, save_pretrained
from mambabyte.cli import main
from mambabyte.config import MambaByteConfig
from mambabyte.errors import UserError
from mambabyte.evaluate import evaluate
from mambabyte.model import MambaByteLM
from mambabyte.noise import corrupt
from mambabyte.robustness import (DEFAULT_P, corrupt_documents, corruption_grid, format_markdown,
                                  plot_robustness, robustness_table, subword_bits_per_byte)
from mambabyte.subword import SubwordTokenizer

DOCUMENTS = [
    b"The quick brown fox jumps over the lazy dog. " * 4,
    "Caf\u00e9 na\u00efve \u2014 the fox, not the dog.\n".encode(),
    b"",
    b"x",
    b"\xff\xfe not UTF-8 \x80 the end",
]


def tiny_model(vocab_size: int, seed: int) -> MambaByteLM:
    """A random model with every parameter moved off its initial value, so logits depend on all of them."""
    torch.manual_seed(seed)
    model = MambaByteLM(MambaByteConfig(d_model=16, n_layer=1, d_state=4, vocab_size=vocab_size))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer() -> SubwordTokenizer:
    return SubwordTokenizer.train([document for document in DOCUMENTS if document] * 5, vocab_size=300)


@pytest.fixture(scope="module")
def byte_model() -> MambaByteLM:
    return tiny_model(256, seed=0)


@pytest.fixture(scope="module")
def subword_model(tokenizer) -> MambaByteLM:
    return tiny_model(tokenizer.vocab_size, seed=1)


def direct_subword_nats(model, tokenizer, document: bytes, separator: bytes) -> float:
    """Sum over the document's tokens of -log softmax(logits)[next token], one forward pass over sep + doc."""
    prefix, tokens = tokenizer.encode(separator), tokenizer.encode(document)
    ids = torch.tensor(prefix + tokens)
    with torch.no_grad():
        log_probs = torch.log_softmax(model(ids[None, :-1])[0].double(), dim=-1)
    targets = range(len(prefix) - 1, len(ids) - 1)  # inputs whose next token belongs to the document
    return -sum(log_probs[i, ids[i + 1]].item() for i in targets)


@pytest.mark.parametrize("separator", [b"\x00", b"\n\n<doc>"])
def test_subword_bits_per_byte_is_token_nats_over_bytes(subword_model, tokenizer, separator):
    nats = sum(direct_subword_nats(subword_model, tokenizer, document, separator) for document in DOCUMENTS)
    expected = nats / sum(map(len, DOCUMENTS)) / math.log(2)
    result = subword_bits_per_byte(subword_model, tokenizer, DOCUMENTS, separator, window=3, batch_size=2)
    assert result == pytest.approx(expected, rel=1e-5)
    tokens = sum(len(tokenizer.encode(document)) for document in DOCUMENTS)
    assert tokens < sum(map(len, DOCUMENTS))  # per byte, not per token: the two differ
    assert result != pytest.approx(nats / tokens / math.log(2), rel=1e-3)


def test_subword_bits_per_byte_refuses_mismatch_and_empty_data(byte_model, subword_model, tokenizer):
    with pytest.raises(UserError, match="do not belong together"):
        subword_bits_per_byte(tiny_model(257, seed=2), tokenizer, DOCUMENTS)
    with pytest.raises(UserError, match="empty"):
        subword_bits_per_byte(subword_model, tokenizer, [b"", b""])


def test_corrupt_documents_is_reproducible_and_differs_per_document():
    documents = [b"abcdefghij" * 20] * 2
    first = corrupt_documents(documents, "drop", 0.5, seed=3)
    assert first == corrupt_documents(documents, "drop", 0.5, seed=3)
    assert first[0] != first[1]  # same text, its own noise
    assert first != corrupt_documents(documents, "drop", 0.5, seed=4)
    assert corrupt_documents(documents, "uppercase", 1.0) == [corrupt(documents[0], "uppercase", 1.0)] * 2


def test_corruption_grid():
    assert corruption_grid() == list(DEFAULT_P.items())
    assert corruption_grid(["drop", "swap"], [0.05, 0.3]) == [
        ("drop", 0.05), ("drop", 0.3), ("swap", 0.05), ("swap", 0.3)]
    for kinds, ps in ((["shout"], None), (["drop"], [1.5]), ([], None)):
        with pytest.raises(UserError):
            corruption_grid(kinds, ps)


def test_table_matches_evaluate_and_subword_accounting(byte_model, subword_model, tokenizer):
    corruptions = [("repeat", 0.3), ("antspeak", 1.0)]
    rows = robustness_table(byte_model, subword_model, tokenizer, DOCUMENTS, corruptions, seed=5,
                            byte_separator=b"\n", subword_separator=b"\x00", window=5, batch_size=3)
    assert [(row.corruption, row.p) for row in rows] == [("clean", 0.0), *corruptions]
    for row in rows:
        texts = DOCUMENTS if row.corruption == "clean" else corrupt_documents(DOCUMENTS, row.corruption, row.p, 5)
        assert row.num_bytes == sum(map(len, texts))
        assert row.num_tokens == sum(len(tokenizer.encode(text)) for text in texts)
        assert row.byte_bits_per_byte == pytest.approx(evaluate(byte_model, texts, separator=b"\n").bits_per_byte,
                                                       rel=1e-6)
        assert row.subword_bits_per_byte == pytest.approx(
            subword_bits_per_byte(subword_model, tokenizer, texts, b"\x00"), rel=1e-6)
        assert row.byte_degradation == pytest.approx(row.byte_bits_per_byte / rows[0].byte_bits_per_byte - 1)
        assert row.subword_degradation == pytest.approx(
            row.subword_bits_per_byte / rows[0].subword_bits_per_byte - 1)
    assert rows[2].num_bytes > rows[0].num_bytes  # antspeak spaces out every character
    with pytest.raises(UserError, match="unknown corruption"):
        robustness_table(byte_model, subword_model, tokenizer, DOCUMENTS, [("shout", 0.1)])
    with pytest.raises(UserError, match=r"\[0, 1\]"):
        robustness_table(byte_model, subword_model, tokenizer, DOCUMENTS, [("drop", 1.5)])


def test_markdown_and_plot(byte_model, subword_model, tokenizer, tmp_path):
    rows = robustness_table(byte_model, subword_model, tokenizer, DOCUMENTS[:2], [("drop", 0.2), ("swap", 0.1)])
    table = format_markdown(rows).splitlines()
    assert len(table) == 2 + len(rows)
    assert table[2].startswith("| clean | - |") and f"{rows[0].byte_bits_per_byte:.4f}" in table[2]
    assert table[3].startswith("| drop | 0.2 |") and f"{rows[1].subword_degradation:+.1%}" in table[3]
    png = plot_robustness(rows, tmp_path / "robustness.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def checkpoints_and_data(byte_model, subword_model, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("robustness")
    byte_dir = save_pretrained(byte_model, root / "byte", metadata={"separator": "\n"})
    subword_dir = save_pretrained(subword_model, root / "subword", metadata={"separator": "\x00"})
    tokenizer.save(subword_dir)
    data = root / "data"
    data.mkdir()
    for i, document in enumerate(DOCUMENTS[:2]):
        (data / f"{i}.txt").write_bytes(document)
    return byte_dir, subword_dir, data


def test_cli_end_to_end(checkpoints_and_data, tokenizer, tmp_path):
    byte_dir, subword_dir, data = checkpoints_and_data
    markdown, png = tmp_path / "table.md", tmp_path / "chart.png"
    completed = subprocess.run(
        [sys.executable, "-m", "mambabyte.cli", "robustness", "--byte", str(byte_dir), "--subword", str(subword_dir),
         "--data", str(data), "--kinds", "drop,uppercase", "--p", "0.5", "--seed", "7", "--json",
         "--markdown", str(markdown), "--plot", str(png), "--quiet", "--device", "cpu"],
        capture_output=True, text=True, timeout=120)
    assert completed.returncode == 0, completed.stderr
    report = json.loads(completed.stdout)
    rows = report["rows"]
    assert [(row["corruption"], row["p"]) for row in rows] == [("clean", 0.0), ("drop", 0.5), ("uppercase", 0.5)]
    documents = [path.read_bytes() for path in sorted(data.iterdir())]
    dropped = corrupt_documents(documents, "drop", 0.5, seed=7)
    assert rows[0]["byte_bits_per_byte"] == pytest.approx(
        evaluate(load_pretrained(byte_dir), documents, separator=b"\n").bits_per_byte, rel=1e-5)
    assert rows[1]["subword_bits_per_byte"] == pytest.approx(
        subword_bits_per_byte(load_pretrained(subword_dir), tokenizer, dropped, b"\x00"), rel=1e-5)
    assert report["tokenizer_vocab_size"] == tokenizer.vocab_size
    assert markdown.read_text().count("\n") == 2 + len(rows)
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("problem", ["no tokenizer", "missing data", "unknown kind", "bad p", "byte is subword",
                                     "plot folder missing"])
def test_cli_bad_input_is_one_line_exit_2(checkpoints_and_data, tmp_path, capsys, problem):
    byte_dir, subword_dir, data = checkpoints_and_data
    arguments = {"--byte": str(byte_dir), "--subword": str(subword_dir), "--data": str(data), "--kinds": "drop"}
    if problem == "no tokenizer":
        arguments["--subword"] = str(save_pretrained(tiny_model(300, seed=3), tmp_path / "bare"))
    elif problem == "missing data":
        arguments["--data"] = str(tmp_path / "nowhere")
    elif problem == "unknown kind":
        arguments["--kinds"] = "drop,shout"
    elif problem == "byte is subword":
        arguments["--byte"] = str(subword_dir)
    argv = ["robustness", *(item for pair in arguments.items() for item in pair), "--quiet", "--device", "cpu"]
    if problem == "bad p":
        argv += ["--p", "1.5"]
    elif problem == "plot folder missing":
        argv += ["--plot", str(tmp_path / "nowhere" / "chart.png")]
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("mambabyte robustness: error:") and error.count("\n") == 1
