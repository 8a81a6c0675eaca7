"""The training loop: one process on a CPU up to many GPUs under ``torchrun`` (DDP, or FSDP with ``fsdp=True``).

Read ``train`` top to bottom: set up (distributed, data, model, optimizer, resume), then the loop
(learning rate, micro-batches with gradient accumulation, clip, step, log, evaluate, checkpoint), then
the end (final evaluation, checkpoint, loss curve).

- One optimizer step consumes ``grad_accum`` global batches of ``batch_size`` windows of ``seq_len`` bytes.
  The sampler yields the same global batch on every rank; rank r trains on its slice of the rows, and DDP
  averages the gradients, so N processes compute what one process computes with the same global batch.
- The learning rate warms up linearly for ``warmup_steps``, then follows a cosine down to ``min_lr_ratio * lr``
  over the run's progress: the fraction of ``max_steps`` done or of ``max_time`` spent, whichever is larger.
- ``OUT/checkpoint`` is the latest checkpoint (model files + ``training_state.pt``), written atomically every
  ``save_every`` steps, at the end, and on Ctrl-C / SIGTERM; ``OUT/best`` holds the weights with the best
  held-out bits per byte. ``OUT/log.jsonl`` has one line per logged step and evaluation; ``OUT/loss.png`` the curve.
- Resuming (``resume=OUT/checkpoint``) restores weights, optimizer, data position, step, elapsed time and RNG
  states, so a resumed run computes the same losses as one that never stopped (with ``max_time`` the schedule
  follows the clock, so only ``max_steps`` runs repeat exactly).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)
from tqdm import tqdm

from mambabyte.architectures import build_model
from mambabyte.checkpoint import atomic_directory, load_pretrained, read_checkpoint_info, write_model_files
from mambabyte.config import preset
from mambabyte.data import ByteCorpus, WindowSampler, load_corpus, split_corpus
from mambabyte.errors import UserError
from mambabyte.evaluate import evaluate
from mambabyte.robustness import subword_bits_per_byte
from mambabyte.subword import SubwordTokenizer, tokenize_corpus

TRAINING_STATE_FILE = "training_state.pt"
LOG_FILE = "log.jsonl"
PLOT_FILE = "loss.png"


@dataclass
class TrainConfig:
    """Everything a run needs; stored in every checkpoint as ``train_config``."""

    data: str
    out: str
    preset: str = "small"
    arch: str = "mambabyte"
    tokenizer: str | None = None  # a `mambabyte tokenizer train` directory: train a subword model (windows of tokens)
    valid_data: str | None = None  # held-out documents; default: a seeded ``valid_fraction`` of ``data``'s documents
    valid_fraction: float = 0.05
    text_field: str = "text"
    # The defaults suit the `small` preset on a 2-core CPU, where ~1 KB steps train fastest per second
    # (many small steps beat few large ones per byte; below ~1 KB two threads stop helping; docs/training.md).
    batch_size: int = 4  # windows per global micro-batch (all ranks together)
    seq_len: int = 256  # bytes per window (the model reads seq_len bytes and predicts the next seq_len)
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # the cosine ends at lr * min_lr_ratio
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # max global gradient norm; 0 turns clipping off
    max_steps: int | None = None
    max_time: float | None = None  # seconds of training (the final evaluation and checkpoint come after)
    stop_after: int | None = None  # end this process after this step with a checkpoint; the schedule still runs to max_steps
    eval_every: int = 1000  # steps between held-out evaluations (0: only at the end)
    eval_bytes: int = 262_144  # held-out bytes per evaluation (seeded random whole documents up to this many)
    eval_window: int = 4096  # bytes per forward pass in evaluation (the state is carried across windows)
    save_every: int = 1000  # steps between checkpoints (0: only at the end and on interrupt)
    log_every: int = 10  # steps between log lines
    seed: int = 0
    separator: str = "\x00"  # joins documents; latin-1 text so it fits in JSON
    reset_at_boundaries: bool = False  # zero the recurrent state where a document starts inside a window
    device: str | None = None  # default: this rank's CUDA device if there is one, else cpu
    fsdp: bool = False  # shard parameters, gradients and optimizer state across ranks (torchrun only)
    resume: str | None = None  # a checkpoint directory written by this trainer
    overwrite: bool = False  # allow starting afresh in an ``out`` that already holds a checkpoint
    progress: bool = True

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class TrainResult:
    step: int
    bytes_seen: int
    elapsed: float
    train_loss: float | None  # nats per byte, mean over the last logged steps
    valid_bits_per_byte: float | None  # at the end (None if there is no held-out data or the run was interrupted)
    best_valid_bits_per_byte: float | None
    interrupted: bool  # stopped by Ctrl-C / SIGTERM (a checkpoint was saved)
    checkpoint: Path
    log: Path
    plot: Path | None


def check_config(cfg: TrainConfig) -> None:
    """Refuse impossible settings with a one-line error, before anything is loaded."""
    for name in ("batch_size", "seq_len", "grad_accum", "eval_window", "log_every"):
        if getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("warmup_steps", "eval_every", "eval_bytes", "save_every"):
        if getattr(cfg, name) < 0:
            raise UserError(f"{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if cfg.max_steps is None and cfg.max_time is None:
        raise UserError("give --max-steps or --max-time (or both): the schedule needs to know when the run ends")
    for name in ("max_steps", "stop_after"):
        if getattr(cfg, name) is not None and getattr(cfg, name) < 1:
            raise UserError(f"{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.max_time is not None and cfg.max_time <= 0:
        raise UserError(f"max-time must be > 0 seconds, got {cfg.max_time}")
    if not cfg.lr > 0 or not 0 <= cfg.min_lr_ratio <= 1:
        raise UserError(f"lr must be > 0 and min-lr-ratio in [0, 1], got {cfg.lr} and {cfg.min_lr_ratio}")
    if not 0 <= cfg.valid_fraction < 1:
        raise UserError(f"valid-fraction must be in [0, 1), got {cfg.valid_fraction}")
    try:
        if not cfg.separator.encode("latin-1"):
            raise UserError("the separator must be at least one byte: a document's first byte needs context")
    except UnicodeEncodeError:
        raise UserError(f"the separator must be latin-1 text (bytes 0-255), got {cfg.separator!r}") from None


def learning_rate(cfg: TrainConfig, step: int, elapsed: float) -> float:
    """Linear warmup over ``warmup_steps``, then cosine from ``lr`` to ``lr * min_lr_ratio`` over the run.

    Progress is the fraction of the steps after warmup done or of ``max_time`` spent, whichever is larger.
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = 0.0
    if cfg.max_steps is not None:
        progress = (step - cfg.warmup_steps) / max(1, cfg.max_steps - cfg.warmup_steps)
    if cfg.max_time is not None:
        progress = max(progress, elapsed / cfg.max_time)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return cfg.lr * (cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * cosine)


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on A_log, D, biases, norms and embeddings (tied head)."""
    embeddings = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        skip = parameter.ndim < 2 or name.endswith("A_log") or id(parameter) in embeddings
        (no_decay if skip else decay).append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``parameter_groups`` with the run's settings (the fused kernel on CUDA)."""
    return torch.optim.AdamW(parameter_groups(model, cfg.weight_decay), lr=cfg.lr,
                             betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def mixed_precision(device: torch.device) -> contextlib.AbstractContextManager:
    """fp32 weights; bf16 matmuls on GPUs (autocast), full fp32 on CPUs."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()


def load_data(cfg: TrainConfig) -> tuple[ByteCorpus, ByteCorpus | None]:
    """(training corpus, held-out corpus or None)."""
    corpus = load_corpus(cfg.data, text_field=cfg.text_field)
    if cfg.valid_data is not None:
        return corpus, load_corpus(cfg.valid_data, text_field=cfg.text_field)
    if cfg.valid_fraction == 0:
        return corpus, None
    return split_corpus(corpus, valid_fraction=cfg.valid_fraction, seed=cfg.seed)


def held_out_documents(corpus: ByteCorpus | None, budget: int, seed: int) -> list[bytes]:
    """A seeded random choice of whole held-out documents, up to ``budget`` bytes (the last one may be cut)."""
    if corpus is None or budget == 0:
        return []
    documents, total = [], 0
    for index in np.random.default_rng(seed).permutation(corpus.num_documents):
        documents.append(corpus.document(int(index))[: budget - total])
        total += len(documents[-1])
        if total >= budget:
            break
    return documents


def check_output_dir(cfg: TrainConfig) -> Path:
    """OUT, created if needed and writable; refuses to start afresh over an existing checkpoint."""
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserError(f"cannot create output directory {out}: {error.strerror or error}") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise UserError(f"output directory {out} is not writable")
    if cfg.resume is None and not cfg.overwrite and (out / "checkpoint").exists():
        raise UserError(f"{out} already holds a run: continue it with --resume {out / 'checkpoint'}, "
                        "or pass --overwrite, or choose another --out")
    return out


def read_training_state(directory: str | os.PathLike, cfg: TrainConfig) -> dict:
    """The trainer's state in a checkpoint, checked against this run's preset and architecture."""
    directory = Path(directory)
    info = read_checkpoint_info(directory)
    path = directory / TRAINING_STATE_FILE
    if not path.is_file():
        raise UserError(f"{directory} has no {TRAINING_STATE_FILE}: it is a model, not a training checkpoint")
    saved = info.get("train_config", {})
    for key in ("preset", "arch"):
        if key in saved and saved[key] != getattr(cfg, key):
            raise UserError(f"cannot resume {directory}: it was trained with --{key} {saved[key]}, "
                            f"not {getattr(cfg, key)}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file: torch raises many types here
        raise UserError(f"{path} is unreadable: {str(error).splitlines()[0]}") from None


def rng_states() -> dict:
    numpy_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [numpy_state[0], numpy_state[1].tolist(), *numpy_state[2:]],
            "python": random.getstate()}


def set_rng_states(states: dict) -> None:
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    name, keys, *rest = states["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))
    random.setstate(states["python"])


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None, config,
                    metadata: dict, training_state: dict | None, is_main: bool,
                    tokenizer: SubwordTokenizer | None = None) -> None:
    """Model files (+ training_state.pt when given an optimizer), atomically. Every rank must call it (FSDP gathers)."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    weights = get_model_state_dict(model, options=options)
    optimizer_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer else None
    if is_main:
        with torch.device("meta"):  # a shell of the model class around the gathered full weights
            full_model = build_model(config)
        full_model.load_state_dict(weights, assign=True)
        with atomic_directory(directory) as staging:
            write_model_files(full_model, staging, metadata)
            if tokenizer is not None:  # a subword model's checkpoint carries its vocabulary
                tokenizer.save(staging)
            if optimizer is not None:
                torch.save({**training_state, "optimizer": optimizer_state}, staging / TRAINING_STATE_FILE)
    if dist.is_initialized():
        dist.barrier()


def truncate_log(path: Path, step: int) -> None:
    """Keep the log records up to ``step`` (those after the checkpoint a run resumes from are redone)."""
    lines = path.read_text().splitlines() if path.exists() and step > 0 else []
    kept = [line for line in lines if line.strip() and json.loads(line)["step"] <= step]
    path.write_text("".join(line + "\n" for line in kept))


def plot_loss_curve(log_path: Path, plot_path: Path) -> Path | None:
    """Training and held-out bits per byte against bytes seen, from the JSONL log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    train = [r for r in records if "bpb" in r]
    valid = [r for r in records if "valid_bpb" in r]
    if not train and not valid:
        return None
    figure, axes = plt.subplots(figsize=(7, 4.5))
    axes.plot([r["bytes_seen"] for r in train], [r["bpb"] for r in train], label="train", linewidth=1)
    if valid:
        axes.plot([r["bytes_seen"] for r in valid], [r["valid_bpb"] for r in valid], marker="o", label="held-out")
    axes.set_xlabel("training bytes seen")
    axes.set_ylabel("bits per byte")
    axes.set_title("Training curve")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(plot_path, dpi=120)
    plt.close(figure)
    return plot_path


class StopSignal:
    """Ctrl-C (SIGINT) and SIGTERM set a flag the loop checks after each step; a second Ctrl-C aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signum, self._previous[signum])  # a second signal gets the default behaviour

    def __enter__(self) -> StopSignal:
        for signum in (signal.SIGINT, signal.SIGTERM):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _distributed_setup(cfg: TrainConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device); joins the torchrun process group when WORLD_SIZE is set."""
    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {cfg.device}: this machine has no usable CUDA GPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        if cfg.fsdp:
            raise UserError("--fsdp needs several processes: launch with torchrun --nproc_per_node N")
        return 0, 1, device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per process
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


def _wrap(model: nn.Module, cfg: TrainConfig, device: torch.device, world: int) -> nn.Module:
    """DDP (or FSDP2) around the model when running under torchrun."""
    if world == 1:
        return model
    if cfg.fsdp:
        from torch.distributed.fsdp import fully_shard

        for module in model.modules():  # shard every block (each member of a ModuleList), then the rest
            if isinstance(module, nn.ModuleList):
                for block in module:
                    fully_shard(block)
        return fully_shard(model)
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def _all_ranks_mean(value: torch.Tensor, world: int) -> float:
    if world > 1:
        dist.all_reduce(value)
        value = value / world
    return value.item()


def _any_rank(flags: list[bool], device: torch.device, world: int) -> list[bool]:
    """Each flag, True if it is True on any rank (so that every rank stops at the same step)."""
    if world == 1:
        return flags
    values = torch.tensor([float(flag) for flag in flags], device=device)
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return [bool(v) for v in values.tolist()]


def train(cfg: TrainConfig) -> TrainResult:
    """Train (or continue) a model as ``cfg`` says; see the module docstring."""
    check_config(cfg)
    config = preset(cfg.preset, cfg.arch)
    tokenizer = SubwordTokenizer.load(cfg.tokenizer) if cfg.tokenizer else None
    if tokenizer is not None:
        if cfg.arch != "mambabyte":
            raise UserError("--tokenizer trains a subword Mamba: use it with --arch mambabyte")
        config = dataclasses.replace(config, vocab_size=tokenizer.vocab_size)
    rank, world, device = _distributed_setup(cfg)
    is_main = rank == 0
    if cfg.batch_size % world:
        raise UserError(f"batch-size {cfg.batch_size} must be divisible by the number of processes ({world})")
    out = check_output_dir(cfg)
    resumed = read_training_state(cfg.resume, cfg) if cfg.resume else None

    train_corpus, valid_corpus = load_data(cfg)
    separator = cfg.separator.encode("latin-1")
    if tokenizer is not None:  # windows of tokens; every document already begins with the separator's tokens
        train_corpus = tokenize_corpus(train_corpus, tokenizer, separator)
    sampler = WindowSampler(train_corpus, window=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed,
                            separator=b"" if tokenizer else separator, reset_at_boundaries=cfg.reset_at_boundaries)
    valid_documents = held_out_documents(valid_corpus, cfg.eval_bytes, cfg.seed)
    rows = slice(rank * cfg.batch_size // world, (rank + 1) * cfg.batch_size // world)  # this rank's rows

    torch.manual_seed(cfg.seed)
    model = build_model(config).to(device)
    if resumed is not None:
        model.load_state_dict(load_pretrained(cfg.resume, expected_config=config).state_dict())
    raw_model = model
    model = _wrap(model, cfg, device, world)
    eval_model = model if cfg.fsdp else raw_model  # FSDP shards in place; DDP's wrapper is not needed to evaluate
    optimizer = build_optimizer(model, cfg, device)
    autocast = mixed_precision(device)

    step, bytes_seen, elapsed_before, best_valid = 0, 0, 0.0, None
    if resumed is not None:
        set_optimizer_state_dict(model, optimizer, resumed["optimizer"],
                                 options=StateDictOptions(full_state_dict=True))
        sampler.load_state_dict(resumed["sampler"])
        set_rng_states(resumed["rng"])
        step, bytes_seen = resumed["step"], resumed["bytes_seen"]
        elapsed_before, best_valid = resumed["elapsed"], resumed["best_valid_bpb"]
    bytes_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum
    log_path, checkpoint_dir = out / LOG_FILE, out / "checkpoint"
    if is_main:
        truncate_log(log_path, step)
    metadata = {"separator": cfg.separator, "window": cfg.seq_len, "train_config": cfg.to_dict()}

    def log(record: dict) -> None:
        if is_main:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def save(directory: Path, with_training_state: bool, valid_bpb: float | None = None) -> None:
        state = {"step": step, "bytes_seen": bytes_seen, "elapsed": elapsed, "best_valid_bpb": best_valid,
                 "sampler": sampler.state_dict(), "rng": rng_states(), "train_config": cfg.to_dict()}
        save_checkpoint(directory, model, optimizer if with_training_state else None, config,
                        {**metadata, "step": step, "bytes_seen": bytes_seen, "valid_bits_per_byte": valid_bpb},
                        state, is_main, tokenizer)

    def evaluate_held_out() -> float | None:
        """Held-out BPB, logged; the weights go to OUT/best when it is the best so far."""
        nonlocal best_valid
        if not valid_documents:
            return None
        if tokenizer is None:
            bpb = evaluate(eval_model, valid_documents, separator=separator, window=cfg.eval_window).bits_per_byte
        else:  # a subword model is measured per byte too: total NLL of its tokens / bytes
            bpb = subword_bits_per_byte(eval_model, tokenizer, valid_documents, separator, window=cfg.eval_window)
        log({"step": step, "valid_bpb": bpb, "bytes_seen": bytes_seen, "elapsed": elapsed})
        if is_main and cfg.progress:
            bar.write(f"step {step}: held-out {bpb:.4f} bits/byte")
        if best_valid is None or bpb < best_valid:
            best_valid = bpb
            save(out / "best", with_training_state=False, valid_bpb=bpb)
        return bpb

    bar = tqdm(total=cfg.max_steps, initial=step, unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and is_main))
    model.train()
    start = time.perf_counter()
    elapsed = elapsed_before
    window_loss, window_steps, window_start, window_bytes = torch.zeros((), device=device), 0, start, 0
    train_loss, interrupted = None, False
    with StopSignal() as stop:
        while True:
            elapsed = elapsed_before + time.perf_counter() - start
            finished = (cfg.max_steps is not None and step >= cfg.max_steps) or (
                cfg.max_time is not None and elapsed >= cfg.max_time)
            paused = cfg.stop_after is not None and step >= cfg.stop_after
            finished, paused, interrupted = _any_rank([finished, paused, stop.requested], device, world)
            if finished or paused or interrupted:
                interrupted = interrupted and not finished
                break

            lr = learning_rate(cfg, step, elapsed)
            for group in optimizer.param_groups:
                group["lr"] = lr
            for micro in range(cfg.grad_accum):
                ids, reset = sampler.next_batch()
                ids, reset = ids[rows].to(device, non_blocking=True), reset[rows].to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or world == 1 or cfg.fsdp
                with (contextlib.nullcontext() if sync else model.no_sync()), autocast:
                    logits = model(ids[:, :-1], reset=reset[:, :-1] if cfg.reset_at_boundaries else None)
                    loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
                    (loss / cfg.grad_accum).backward()
                window_loss += loss.detach() / cfg.grad_accum
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bytes_seen += bytes_per_step
            window_steps += 1
            window_bytes += bytes_per_step
            bar.update(1)

            last = step in (cfg.max_steps, cfg.stop_after)  # logged here; evaluated and saved after the loop
            if step % cfg.log_every == 0 or last:
                train_loss = _all_ranks_mean(window_loss, world) / window_steps
                now = time.perf_counter()
                elapsed = elapsed_before + now - start
                bytes_per_s = window_bytes / (now - window_start)
                log({"step": step, "loss": train_loss, "bpb": train_loss / math.log(2), "lr": lr,
                     "bytes_seen": bytes_seen, "bytes_per_s": bytes_per_s, "elapsed": elapsed})
                remaining = []
                if cfg.max_steps is not None:
                    remaining.append((cfg.max_steps - step) * (now - window_start) / window_steps)
                if cfg.max_time is not None:
                    remaining.append(cfg.max_time - elapsed)
                bar.set_postfix_str(f"loss {train_loss:.3f} bpb {train_loss / math.log(2):.3f} "
                                    f"{bytes_per_s / 1e3:.1f} kB/s eta {max(0.0, min(remaining)):.0f}s")
                window_loss.zero_()
                window_steps, window_start, window_bytes = 0, now, 0
            if cfg.eval_every and step % cfg.eval_every == 0 and not last:
                evaluate_held_out()
            if cfg.save_every and step % cfg.save_every == 0 and not last:
                save(checkpoint_dir, with_training_state=True)
        bar.close()

        elapsed = elapsed_before + time.perf_counter() - start
        valid_bpb = evaluate_held_out() if finished else None  # a paused or interrupted run goes on later
        save(checkpoint_dir, with_training_state=True, valid_bpb=valid_bpb)
    plot = plot_loss_curve(log_path, out / PLOT_FILE) if is_main else None
    if world > 1:
        dist.barrier()  # leave together: a rank tearing down gloo while its peer still plots can abort
        dist.destroy_process_group()
    return TrainResult(step=step, bytes_seen=bytes_seen, elapsed=elapsed, train_loss=train_loss,
                       valid_bits_per_byte=valid_bpb, best_valid_bits_per_byte=best_valid,
                       interrupted=interrupted, checkpoint=checkpoint_dir, log=log_path, plot=plot)
