"""The training loop: schedule, weight decay groups, exact resume, gradient accumulation, DDP, Ctrl-C, bad input."""

import argparse
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mambabyte.architectures import build_model
from mambabyte.checkpoint import load_pretrained, read_checkpoint_info
from mambabyte.commands import train as train_command
from mambabyte.config import preset
from mambabyte.train import TrainConfig, learning_rate, parameter_groups, train

CLI = [sys.executable, "-m", "mambabyte.cli", "train"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    """A few small text documents (one file each), enough for many windows of 32 bytes."""
    folder = tmp_path_factory.mktemp("corpus")
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly hex a jovial bog".split()
    for i in range(12):
        text = " ".join(words[(i * 7 + j * 3) % len(words)] for j in range(60 + 5 * i)) + ".\n"
        (folder / f"doc{i:02d}.txt").write_text(text)
    return folder


def tiny_config(corpus_dir: Path, out: Path, **overrides) -> TrainConfig:
    options = dict(data=str(corpus_dir), out=str(out), preset="tiny", batch_size=4, seq_len=32, max_steps=6,
                   warmup_steps=2, lr=1e-2, log_every=1, eval_every=0, save_every=0, eval_bytes=2048,
                   valid_fraction=0.2, progress=False)
    return TrainConfig(**{**options, **overrides})


def logged_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def run_cli(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *map(str, args)], capture_output=True, text=True, timeout=300, **kwargs)


def assert_one_line_error(result: subprocess.CompletedProcess, pattern: str) -> None:
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert re.search(pattern, lines[0]), lines[0]


def test_learning_rate_warms_up_then_decays_by_cosine_to_the_floor():
    cfg = TrainConfig(data="-", out="-", lr=1.0, min_lr_ratio=0.1, warmup_steps=4, max_steps=104)
    assert [learning_rate(cfg, s, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert learning_rate(cfg, 4, 0.0) == pytest.approx(1.0)
    assert learning_rate(cfg, 54, 0.0) == pytest.approx(0.55)  # half way: the mean of peak and floor
    assert learning_rate(cfg, 104, 0.0) == pytest.approx(0.1)
    timed = TrainConfig(data="-", out="-", lr=1.0, min_lr_ratio=0.0, warmup_steps=0, max_time=10.0)
    assert learning_rate(timed, 3, 5.0) == pytest.approx(0.5)  # with --max-time the cosine follows the clock


def test_weight_decay_only_on_weight_matrices():
    model = build_model(preset("tiny"))
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)].split(".")[-2] + "." + names[id(p)].split(".")[-1] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decayed == {"in_proj.weight", "conv1d.weight", "x_proj.weight", "dt_proj.weight", "out_proj.weight"}
    assert no_decay["weight_decay"] == 0.0 and decay["weight_decay"] == 0.1
    assert "embedding.weight" in kept and "norm_f.weight" in kept
    for suffix in ("A_log", "D", "conv1d.bias", "dt_proj.bias", "norm.weight"):
        assert any(name.endswith(suffix) for name in kept), suffix
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_training_lowers_the_loss_and_writes_checkpoint_log_and_plot(corpus_dir, tmp_path):
    result = train(tiny_config(corpus_dir, tmp_path, max_steps=30, eval_every=15))
    losses = logged_losses(tmp_path)
    assert sorted(losses) == list(range(1, 31))
    assert sum(list(losses.values())[-5:]) < sum(list(losses.values())[:5])
    assert result.step == 30 and result.bytes_seen == 30 * 4 * 32 and not result.interrupted
    assert result.valid_bits_per_byte is not None and result.valid_bits_per_byte < 8.0
    info = read_checkpoint_info(tmp_path / "checkpoint")
    assert info["separator"] == "\x00" and info["window"] == 32 and info["train_config"]["preset"] == "tiny"
    assert (tmp_path / "checkpoint" / "training_state.pt").is_file()
    assert (tmp_path / "best" / "model.safetensors").is_file()
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    record = json.loads((tmp_path / "log.jsonl").read_text().splitlines()[0])
    assert set(record) == {"step", "loss", "bpb", "lr", "bytes_seen", "bytes_per_s", "elapsed"}
    assert record["bpb"] == pytest.approx(record["loss"] / math.log(2))
    model = load_pretrained(tmp_path / "checkpoint")  # the saved weights are the trained ones, loadable
    assert model.num_parameters() == build_model(preset("tiny")).num_parameters()


def test_resume_continues_exactly(corpus_dir, tmp_path):
    train(tiny_config(corpus_dir, tmp_path / "straight", max_steps=6))
    train(tiny_config(corpus_dir, tmp_path / "split", max_steps=6, stop_after=3))
    assert sorted(logged_losses(tmp_path / "split")) == [1, 2, 3]
    train(tiny_config(corpus_dir, tmp_path / "split", max_steps=6, resume=str(tmp_path / "split" / "checkpoint")))
    assert logged_losses(tmp_path / "split") == logged_losses(tmp_path / "straight")  # bit for bit on CPU
    straight = load_pretrained(tmp_path / "straight" / "checkpoint").state_dict()
    resumed = load_pretrained(tmp_path / "split" / "checkpoint").state_dict()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_gradient_accumulation_matches_one_big_batch(corpus_dir, tmp_path):
    train(tiny_config(corpus_dir, tmp_path / "big", batch_size=4, grad_accum=1, max_steps=3))
    train(tiny_config(corpus_dir, tmp_path / "accum", batch_size=2, grad_accum=2, max_steps=3))
    big, accumulated = logged_losses(tmp_path / "big"), logged_losses(tmp_path / "accum")
    assert big.keys() == accumulated.keys()
    for step in big:
        assert accumulated[step] == pytest.approx(big[step], rel=1e-5)


def test_reset_at_boundaries_trains(corpus_dir, tmp_path):
    result = train(tiny_config(corpus_dir, tmp_path, max_steps=2, reset_at_boundaries=True))
    assert result.step == 2 and all(math.isfinite(v) for v in logged_losses(tmp_path).values())


DISTRIBUTED_ARGS = ["--preset", "tiny", "--batch-size", 4, "--seq-len", 32, "--max-steps", 3, "--log-every", 1,
                    "--eval-every", 0, "--valid-fraction", 0.2, "--quiet", "--device", "cpu"]


@pytest.fixture(scope="module")
def single_process_run(corpus_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("single")
    result = run_cli(["--data", corpus_dir, *DISTRIBUTED_ARGS, "--out", out, "--overwrite"])
    assert result.returncode == 0, result.stderr
    return out


@pytest.mark.parametrize("sharding", [[], ["--fsdp"]], ids=["ddp", "fsdp"])
def test_two_processes_match_one_with_the_same_global_batch(corpus_dir, tmp_path, single_process_run, sharding):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "mambabyte.cli", "train", "--data", corpus_dir, *DISTRIBUTED_ARGS, *sharding, "--out", tmp_path]
    ddp = subprocess.run(list(map(str, command)), capture_output=True, text=True, timeout=300, env=env)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = logged_losses(single_process_run), logged_losses(tmp_path)
    assert one.keys() == two.keys() == {1, 2, 3}
    for step in two:
        assert two[step] == pytest.approx(one[step], rel=1e-5)
    single = load_pretrained(single_process_run / "checkpoint").state_dict()
    gathered = load_pretrained(tmp_path / "checkpoint").state_dict()  # rank 0 wrote the full weights
    for name in single:
        torch.testing.assert_close(gathered[name], single[name], atol=1e-5, rtol=1e-4)


def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(corpus_dir, tmp_path):
    out = tmp_path / "run"
    process = subprocess.Popen([*CLI, "--data", str(corpus_dir), "--preset", "tiny", "--batch-size", "2",
                                "--seq-len", "32", "--max-steps", "100000", "--log-every", "1", "--quiet",
                                "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text().count("\n") >= 2):
        assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    stdout, stderr = process.communicate(timeout=120)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and "interrupted at step" in stdout
    step = int(re.search(r"interrupted at step (\d+)", stdout).group(1))
    assert torch.load(out / "checkpoint" / "training_state.pt", weights_only=True)["step"] == step
    resumed = run_cli(["--data", corpus_dir, "--preset", "tiny", "--batch-size", 2, "--seq-len", 32,
                       "--max-steps", step + 1, "--log-every", 1, "--quiet", "--out", out,
                       "--resume", out / "checkpoint"])
    assert resumed.returncode == 0, resumed.stderr
    assert max(logged_losses(out)) == step + 1


def test_help_quotes_the_train_config_defaults():
    parser = argparse.ArgumentParser()
    train_command.add_arguments(parser)
    defaults = {f: getattr(TrainConfig(data="-", out="-"), f) for f in TrainConfig.__dataclass_fields__}
    quoted = 0
    for action in parser._actions:
        match = re.search(r"\(default ([^)]+)\)", action.help or "")
        if match:
            assert match.group(1) == str(defaults[action.dest]), action.dest
            quoted += 1
    assert quoted >= 10


# ---------------------------------------------------------------------------------------------- bad input

BASE = ["--preset", "tiny", "--batch-size", 2, "--seq-len", 32, "--max-steps", 1, "--quiet"]


def test_missing_data_path(tmp_path):
    assert_one_line_error(run_cli(["--data", tmp_path / "nope", "--out", tmp_path / "out", *BASE]), "no such")


def test_empty_data(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "empty_folder").mkdir()
    assert_one_line_error(run_cli(["--data", tmp_path / "empty.txt", "--out", tmp_path / "o1", *BASE]), "empty")
    assert_one_line_error(run_cli(["--data", tmp_path / "empty_folder", "--out", tmp_path / "o2", *BASE]), "no files")


def test_corpus_shorter_than_one_window(tmp_path):
    (tmp_path / "short.txt").write_text("too short for a window")
    result = run_cli(["--data", tmp_path / "short.txt", "--out", tmp_path / "out", *BASE, "--valid-fraction", 0])
    assert_one_line_error(result, "fewer than one window")


def test_unwritable_output_dir(corpus_dir, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("I am a file, not a folder")
    assert_one_line_error(run_cli(["--data", corpus_dir, "--out", blocker / "out", *BASE]), "output directory")
    assert blocker.read_text() == "I am a file, not a folder"


def test_resume_with_another_preset_or_over_an_existing_run_is_refused(corpus_dir, tmp_path):
    out = tmp_path / "run"
    train(tiny_config(corpus_dir, out, max_steps=1))
    before = {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()}
    log_before = (out / "log.jsonl").read_text()
    other = run_cli(["--data", corpus_dir, "--out", out, *BASE, "--preset", "small", "--resume", out / "checkpoint"])
    assert_one_line_error(other, "--preset tiny, not small")
    again = run_cli(["--data", corpus_dir, "--out", out, *BASE])  # a fresh run over it would lose the checkpoint
    assert_one_line_error(again, "already holds a run")
    assert {p.name: p.read_bytes() for p in (out / "checkpoint").iterdir()} == before
    assert (out / "log.jsonl").read_text() == log_before

