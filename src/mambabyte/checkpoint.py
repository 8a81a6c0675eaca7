"""Checkpoint directories: ``config.json`` + ``model.safetensors`` (+ whatever the trainer adds).

Writes are atomic: everything goes to a hidden sibling directory first, which then replaces the
target with renames, so a crash leaves either the old checkpoint or the new one, never a mix.
A missing, truncated, corrupted or mismatched checkpoint is refused with a one-line ``UserError``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from mambabyte.architectures import build_model, config_from_dict
from mambabyte.errors import UserError

FORMAT = "mambabyte-checkpoint"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yields an empty staging directory; on success it replaces ``target`` atomically (rename)."""
    target = Path(target)
    parent = target.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {parent}: {error.strerror}") from None
    if not os.access(parent, os.W_OK):
        raise UserError(f"output directory {parent} is not writable")
    staging = parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        for file in staging.iterdir():
            with open(file, "rb") as f:
                os.fsync(f.fileno())
        old = parent / f".{target.name}.old-{os.getpid()}"
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(parent)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_model_files(model: nn.Module, directory: Path, metadata: dict | None = None) -> None:
    """Writes config.json and model.safetensors into an existing (staging) directory."""
    weights = {name: t.detach().contiguous().cpu() for name, t in model.state_dict().items()}
    weights_path = directory / WEIGHTS_FILE
    save_file(weights, str(weights_path))
    config = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "config": model.config.to_dict(),
        "weights_sha256": _sha256(weights_path),
        **(metadata or {}),
    }
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def save_pretrained(model: nn.Module, directory: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Saves a model as a checkpoint directory, atomically. Returns the directory."""
    with atomic_directory(directory) as staging:
        write_model_files(model, staging, metadata)
    return Path(directory)


def read_checkpoint_info(directory: str | os.PathLike) -> dict:
    """The parsed config.json of a checkpoint, checked for format."""
    directory = Path(directory)
    if not directory.exists():
        raise UserError(f"checkpoint {directory} does not exist")
    if not directory.is_dir():
        raise UserError(f"checkpoint {directory} is not a directory")
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise UserError(f"{directory} is not a mambabyte checkpoint: it has no {CONFIG_FILE}")
    try:
        info = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UserError(f"checkpoint {config_path} is corrupted: {error}") from None
    if not isinstance(info, dict) or info.get("format") != FORMAT or "config" not in info:
        raise UserError(f"{config_path} is not a mambabyte checkpoint config")
    if info.get("format_version") != FORMAT_VERSION:
        raise UserError(f"checkpoint {directory} has format version {info.get('format_version')}, "
                        f"this mambabyte reads version {FORMAT_VERSION}")
    return info


def load_config(directory: str | os.PathLike):
    """The model config stored in a checkpoint."""
    return config_from_dict(read_checkpoint_info(directory)["config"])


def load_pretrained(directory: str | os.PathLike, device: str | torch.device = "cpu", expected_config=None) -> nn.Module:
    """Loads a checkpoint directory into a fresh model on ``device`` (eval mode).

    ``expected_config``: refuse a checkpoint whose config differs (e.g. resuming with another preset).
    """
    directory = Path(directory)
    info = read_checkpoint_info(directory)
    config = config_from_dict(info["config"])
    if expected_config is not None and config != expected_config:
        diffs = [f"{k}={v} (expected {expected_config.to_dict()[k]})"
                 for k, v in config.to_dict().items() if expected_config.to_dict().get(k) != v]
        raise UserError(f"checkpoint {directory} has another model shape: {', '.join(diffs)}")
    weights_path = directory / WEIGHTS_FILE
    if not weights_path.is_file():
        raise UserError(f"checkpoint {directory} has no {WEIGHTS_FILE}")
    if info.get("weights_sha256") != _sha256(weights_path):
        raise UserError(f"checkpoint {weights_path} is corrupted or truncated (checksum mismatch)")
    try:
        weights = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        raise UserError(f"checkpoint {weights_path} is unreadable: {error}") from None
    model = build_model(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise UserError(f"checkpoint {directory} does not match its config: "
                        f"missing {missing[:3]}, unexpected {unexpected[:3]}")
    for name, tensor in weights.items():
        if tensor.shape != expected[name].shape:
            raise UserError(f"checkpoint {directory} does not match its config: {name} has shape "
                            f"{tuple(tensor.shape)}, expected {tuple(expected[name].shape)}")
    model.load_state_dict(weights)
    return model.to(device).eval()
