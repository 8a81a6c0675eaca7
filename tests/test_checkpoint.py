"""Checkpoint directories: round trip, one-line refusals of bad checkpoints, atomic writes."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import mambabyte.checkpoint as checkpoint
from mambabyte.checkpoint import CONFIG_FILE, WEIGHTS_FILE, load_config, load_pretrained, read_checkpoint_info, save_pretrained
from mambabyte.config import preset
from mambabyte.errors import UserError

IDS = torch.tensor([[72, 101, 108, 108, 111, 0, 255, 10]])


def assert_refused(directory, *words, **kwargs):
    with pytest.raises(UserError) as caught:
        load_pretrained(directory, **kwargs)
    message = str(caught.value)
    assert "\n" not in message and message
    for word in words:
        assert word in message, message


@pytest.fixture
def saved(tiny_model, tmp_path):
    return save_pretrained(tiny_model, tmp_path / "ckpt", metadata={"separator": "\x00", "step": 7})


@torch.no_grad()
def test_round_trip_gives_equal_logits(tiny_model, saved):
    loaded = load_pretrained(saved)
    assert not loaded.training
    assert torch.equal(loaded(IDS), tiny_model(IDS))
    assert load_config(saved) == tiny_model.config
    info = read_checkpoint_info(saved)
    assert info["separator"] == "\x00" and info["step"] == 7
    assert sorted(p.name for p in saved.iterdir()) == [CONFIG_FILE, WEIGHTS_FILE]


@torch.no_grad()
def test_save_replaces_an_existing_checkpoint(tiny_model, saved):
    other = load_pretrained(saved)
    other.norm_f.weight.mul_(2)
    save_pretrained(other, saved)
    assert torch.equal(load_pretrained(saved)(IDS), other(IDS))
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]  # no staging or old copies left


def test_refuses_missing_directory(tmp_path):
    assert_refused(tmp_path / "nowhere", "does not exist")


def test_refuses_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    assert_refused(tmp_path / "file", "not a directory")


def test_refuses_missing_config(saved):
    (saved / CONFIG_FILE).unlink()
    assert_refused(saved, CONFIG_FILE)


def test_refuses_invalid_json(saved):
    (saved / CONFIG_FILE).write_text('{"format": "mambabyte-checkpoint", ')
    assert_refused(saved, "corrupted")


def test_refuses_foreign_config(saved):
    (saved / CONFIG_FILE).write_text(json.dumps({"model_type": "mamba", "vocab_size": 256}))
    assert_refused(saved, "not a mambabyte checkpoint")


def test_refuses_missing_weights(saved):
    (saved / WEIGHTS_FILE).unlink()
    assert_refused(saved, WEIGHTS_FILE)


def test_refuses_truncated_weights(saved):
    path = saved / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert_refused(saved, "truncated")


def test_refuses_flipped_byte(saved):
    path = saved / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01  # inside the tensor data: the file still parses, the checksum does not match
    path.write_bytes(bytes(data))
    assert_refused(saved, "corrupted")


def test_refuses_tensor_shape_mismatch(saved):
    path = saved / WEIGHTS_FILE
    weights = load_file(str(path))
    weights["layers.0.mixer.D"] = torch.ones(3)
    save_file(weights, str(path))
    info = json.loads((saved / CONFIG_FILE).read_text())
    info["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()  # consistent file, wrong shape
    (saved / CONFIG_FILE).write_text(json.dumps(info))
    assert_refused(saved, "layers.0.mixer.D", "shape")


def test_refuses_config_that_does_not_match_weights(saved):
    info = json.loads((saved / CONFIG_FILE).read_text())
    info["config"]["d_state"] = 4
    (saved / CONFIG_FILE).write_text(json.dumps(info))
    assert_refused(saved, "does not match")


def test_refuses_missing_tensor(saved):
    path = saved / WEIGHTS_FILE
    weights = load_file(str(path))
    del weights["norm_f.weight"]
    save_file(weights, str(path))
    info = json.loads((saved / CONFIG_FILE).read_text())
    info["weights_sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (saved / CONFIG_FILE).write_text(json.dumps(info))
    assert_refused(saved, "norm_f.weight")


def test_refuses_expected_config_mismatch(saved):
    assert_refused(saved, "d_model=32", expected_config=preset("small"))
    load_pretrained(saved, expected_config=preset("tiny"))


def failing_save_file(tensors, filename, metadata=None):
    """safetensors' writer dying halfway: a partial file, then an error."""
    with open(filename, "wb") as f:
        f.write(b"partial")
    raise OSError("disk full")


@torch.no_grad()
def test_failed_write_keeps_the_old_checkpoint(tiny_model, saved, monkeypatch):
    before = load_pretrained(saved)(IDS)
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    other = load_pretrained(saved)
    other.norm_f.weight.mul_(2)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(other, saved)
    monkeypatch.undo()
    assert torch.equal(load_pretrained(saved)(IDS), before)
    assert [p.name for p in saved.parent.iterdir()] == [saved.name]


def test_failed_first_write_leaves_nothing(tiny_model, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "save_file", failing_save_file)
    with pytest.raises(OSError):
        save_pretrained(tiny_model, tmp_path / "new")
    assert list(tmp_path.iterdir()) == []
