"""Bits per byte, sliding windows, position buckets, compressors and `mambabyte eval` on a tiny random model."""

from __future__ import annotations

import bz2
import gzip
import json
import lzma
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from mambabyte.architectures import build_model
from mambabyte.checkpoint import save_pretrained
from mambabyte.cli import main
from mambabyte.compressors import compressor_bits_per_byte
from mambabyte.config import preset
from mambabyte.evaluate import (LossTally, bucket_range, count_words, document_losses, evaluate, first_bytes,
                                separator_from_info, word_perplexity)

DOCUMENTS = [
    b"The quick brown fox jumps over the lazy dog. " * 3,
    "Caf\u00e9 na\u00efve \u2014 bytes, not tokens.\n".encode(),
    b"x",
    bytes(range(200, 256)) + b"\x00\x01 binary too",
    b"short one",
]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("tiny")).eval()


def direct_losses(model, document: bytes, separator: bytes) -> torch.Tensor:
    """Nats of each byte of ``document``, from one forward pass over separator + document."""
    ids = torch.tensor(list(separator + document))
    with torch.no_grad():
        logits = model(ids[None, :-1])[0]
    return F.cross_entropy(logits, ids[1:], reduction="none")[len(separator) - 1:]


def losses_by_document(model, documents, **kwargs) -> dict[int, torch.Tensor]:
    return dict(document_losses(model, documents, **kwargs))


@pytest.mark.parametrize("separator", [b"\x00", b"\n\n<doc>"])
def test_bits_per_byte_is_mean_cross_entropy_over_ln2(model, separator):
    nats = torch.cat([direct_losses(model, document, separator) for document in DOCUMENTS])
    expected = nats.double().mean().item() / math.log(2)
    result = evaluate(model, DOCUMENTS, separator=separator, window=7, batch_size=2)
    assert result.num_bytes == sum(map(len, DOCUMENTS)) == nats.numel()
    assert result.num_documents == len(DOCUMENTS)
    assert result.mode == "state"
    assert result.bits_per_byte == pytest.approx(expected, rel=1e-6)


def test_state_carried_across_windows_equals_one_forward_over_the_document(model):
    carried = losses_by_document(model, DOCUMENTS, window=5, batch_size=3)
    assert sorted(carried) == list(range(len(DOCUMENTS)))
    for index, document in enumerate(DOCUMENTS):
        torch.testing.assert_close(carried[index], direct_losses(model, document, b"\x00"), rtol=1e-5, atol=1e-5)


def test_sliding_window_with_stride_equal_to_window_is_independent_chunks(model):
    window = 16
    document = DOCUMENTS[0]
    ids = torch.tensor(list(b"\x00" + document))
    inputs, targets = ids[:-1], ids[1:]
    expected = []
    with torch.no_grad():
        for begin in range(0, len(inputs), window):
            logits = model(inputs[None, begin:begin + window])[0]
            expected.append(F.cross_entropy(logits, targets[begin:begin + window], reduction="none"))
    sliding = losses_by_document(model, [document], window=window, stride=window, batch_size=2)[0]
    torch.testing.assert_close(sliding, torch.cat(expected), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(sliding, direct_losses(model, document, b"\x00"), atol=1e-4)  # chunks lose context


def test_sliding_window_scores_each_byte_once_with_overlapping_context(model):
    document = b"abcdefghijklmnopqrstu"  # 21 bytes: inputs = separator + first 20 bytes
    ids = torch.tensor(list(b"\x00" + document))
    with torch.no_grad():
        first = F.cross_entropy(model(ids[None, 0:8])[0], ids[1:9], reduction="none")  # window [0, 8): all scored
        second = F.cross_entropy(model(ids[None, 4:12])[0], ids[5:13], reduction="none")[4:]  # [4, 12): last 4
        third = F.cross_entropy(model(ids[None, 8:16])[0], ids[9:17], reduction="none")[4:]
        fourth = F.cross_entropy(model(ids[None, 12:20])[0], ids[13:21], reduction="none")[4:]
        fifth = F.cross_entropy(model(ids[None, 16:21])[0], ids[17:22], reduction="none")[4:]
    expected = torch.cat([first, second, third, fourth, fifth])
    sliding = losses_by_document(model, [document], window=8, stride=4, batch_size=3)[0]
    assert sliding.numel() == len(document)
    torch.testing.assert_close(sliding, expected, rtol=1e-5, atol=1e-5)


def test_sliding_window_longer_than_every_document_equals_whole_document_eval(model):
    whole = evaluate(model, DOCUMENTS, window=1000)
    sliding = evaluate(model, DOCUMENTS, window=1000, stride=10, batch_size=2)
    assert sliding.mode == "sliding-window"
    assert sliding.bits_per_byte == pytest.approx(whole.bits_per_byte, rel=1e-6)


def test_position_buckets_are_powers_of_two_and_add_up():
    assert [bucket_range(i) for i in range(5)] == [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16)]
    tally = LossTally()
    tally.add(torch.arange(10, dtype=torch.float32))  # positions 0..9
    tally.add(torch.full((3,), 2.0))  # positions 0..2
    buckets = tally.by_position()
    assert [(b.start, b.end, b.num_bytes) for b in buckets] == [(0, 1, 2), (1, 2, 2), (2, 4, 3), (4, 8, 4), (8, 16, 2)]
    assert buckets[3].bits_per_byte == pytest.approx((4 + 5 + 6 + 7) / 4 / math.log(2))
    assert tally.num_bytes == 13
    weighted = sum(b.bits_per_byte * b.num_bytes for b in buckets) / tally.num_bytes
    assert weighted == pytest.approx(tally.bits_per_byte)


def test_compressor_bits_per_byte_is_compressed_size_over_size():
    data = b"".join(DOCUMENTS) * 4
    expected = {
        "gzip -9": len(gzip.compress(data, compresslevel=9)) * 8 / len(data),
        "bzip2 -9": len(bz2.compress(data, compresslevel=9)) * 8 / len(data),
        "xz -9": len(lzma.compress(data, preset=9)) * 8 / len(data),
    }
    try:
        import zstandard

        expected["zstd -19"] = len(zstandard.ZstdCompressor(level=19).compress(data)) * 8 / len(data)
    except ImportError:
        pass
    assert compressor_bits_per_byte(data) == pytest.approx(expected)


def test_first_bytes_cuts_the_data_in_document_order():
    assert first_bytes([b"abc", b"defg", b"hi"], 5) == [b"abc", b"de"]
    assert first_bytes([b"abc"], 10) == [b"abc"]


def test_word_perplexity_follows_the_paper_convention():
    assert count_words([b"two words\n", b"  three\tmore words "]) == 5
    assert word_perplexity(1.0, 10, 5) == pytest.approx(4.0)  # 2 ** (1.0 * 10 / 5)
    assert word_perplexity(1.0, 10, 0) is None


def test_separator_comes_from_checkpoint_metadata():
    assert separator_from_info({}) == b"\x00"
    assert separator_from_info({"separator": "\n\xff"}) == b"\n\xff"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mambabyte.cli", "eval", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def checkpoint_and_data(model, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    checkpoint = save_pretrained(model, root / "ckpt", metadata={"separator": "\n", "window": 32})
    data = root / "data"
    data.mkdir()
    for i, document in enumerate(DOCUMENTS):
        (data / f"doc{i}.txt").write_bytes(document)
    return checkpoint, data


def test_eval_json_reports_bits_per_byte_beside_compressors(model, checkpoint_and_data, tmp_path):
    checkpoint, data = checkpoint_and_data
    plot = tmp_path / "bpb.png"
    result = run_cli(str(checkpoint), "--data", str(data), "--json", "--extrapolation", "--plot", str(plot),
                     "--window", "8", "--quiet")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    documents = [(data / f"doc{i}.txt").read_bytes() for i in range(len(DOCUMENTS))]
    expected = evaluate(model, documents, separator=b"\n")
    assert report["bits_per_byte"] == pytest.approx(expected.bits_per_byte, rel=1e-6)
    assert report["num_bytes"] == sum(map(len, DOCUMENTS))
    assert report["num_documents"] == len(DOCUMENTS)
    assert report["mode"] == "state"
    assert report["compressors"] == pytest.approx(compressor_bits_per_byte(b"".join(documents)))
    assert report["word_perplexity"] == pytest.approx(
        word_perplexity(report["bits_per_byte"], report["num_bytes"], count_words(documents)))
    assert report["train_length"] == 32
    assert sum(bucket["num_bytes"] for bucket in report["by_position"]) == report["num_bytes"]
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_eval_prints_a_table_with_the_compressors(checkpoint_and_data, capsys):
    checkpoint, data = checkpoint_and_data
    assert main(["eval", str(checkpoint), "--data", str(data), "--stride", "4", "--quiet", "--max-bytes", "150"]) == 0
    out = capsys.readouterr().out
    # without --window a sliding window is as long as the training length (metadata "window": 32)
    for expected in ("150 bytes", "sliding window of 32 bytes, stride 4", "xz -9", "gzip -9", "bzip2 -9",
                     "word-level perplexity"):
        assert expected in out


def corrupt_weights(checkpoint, tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_bytes((checkpoint / "config.json").read_bytes())
    weights = (checkpoint / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    return broken


@pytest.mark.parametrize("case", ["missing checkpoint", "corrupted checkpoint", "missing data", "empty data"])
def test_bad_input_is_a_one_line_error_without_traceback(case, checkpoint_and_data, tmp_path):
    checkpoint, data = checkpoint_and_data
    args = [str(checkpoint), "--data", str(data)]
    if case == "missing checkpoint":
        args[0] = str(tmp_path / "no-such-checkpoint")
    elif case == "corrupted checkpoint":
        args[0] = str(corrupt_weights(checkpoint, tmp_path))
    elif case == "missing data":
        args[2] = str(tmp_path / "no-such-data")
    elif case == "empty data":
        (tmp_path / "empty.txt").write_bytes(b"")
        args[2] = str(tmp_path / "empty.txt")
    result = run_cli(*args)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mambabyte eval: error:"), result.stderr


@pytest.mark.parametrize("options", [["--window", "4", "--stride", "8"], ["--stride", "0"], ["--batch-size", "0"]])
def test_bad_window_options_are_refused(options, checkpoint_and_data, capsys):
    checkpoint, data = checkpoint_and_data
    assert main(["eval", str(checkpoint), "--data", str(data), "--quiet", *options]) == 2
    assert capsys.readouterr().err.startswith("mambabyte eval: error:")


def test_unwritable_plot_is_refused_before_evaluating(checkpoint_and_data, tmp_path, capsys):
    checkpoint, data = checkpoint_and_data
    plot = tmp_path / "no-such-folder" / "plot.png"
    assert main(["eval", str(checkpoint), "--data", str(data), "--plot", str(plot)]) == 2
    assert "does not exist" in capsys.readouterr().err
