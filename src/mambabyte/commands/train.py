"""`mambabyte train --data PATH --preset NAME --out DIR`: train a byte model (one CPU up to many GPUs via torchrun)."""

from __future__ import annotations

import argparse
import dataclasses

HELP = "Train a byte-level model on your files (single process, or DDP/FSDP under torchrun)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    # Options left out take TrainConfig's defaults (quoted in the help; tests/test_train.py checks they agree).
    # TrainConfig itself is not imported here: it would load torch for every `mambabyte --help`.
    parser.argument_default = argparse.SUPPRESS
    data = parser.add_argument_group("data")
    data.add_argument("--data", required=True, metavar="PATH",
                      help="training bytes: file, folder, glob, .txt/.gz/.jsonl, or local Hugging Face dataset dir")
    data.add_argument("--valid-data", metavar="PATH",
                      help="held-out documents (default: a seeded --valid-fraction of --data's documents)")
    data.add_argument("--valid-fraction", type=float, help="share of --data's documents held out when there is no --valid-data; 0: none "
                           f"(default 0.05)")
    data.add_argument("--text-field", help="JSONL / dataset field with the text")
    data.add_argument("--separator", help="text joining documents, latin-1 (default: the NUL byte)")
    data.add_argument("--reset-at-boundaries", action="store_true",
                      help="zero the recurrent state where a new document starts inside a window")

    model = parser.add_argument_group("model")
    model.add_argument("--preset", help="model size (default small)")
    model.add_argument("--arch", help="architecture (default mambabyte)")
    model.add_argument("--tokenizer", metavar="DIR",
                       help="train a subword Mamba on this `mambabyte tokenizer train` vocabulary (e.g. the drafter "
                            "of speculative decoding); --seq-len then counts tokens")

    run = parser.add_argument_group("run")
    run.add_argument("--out", required=True, metavar="DIR",
                     help="output folder: checkpoint/, best/, log.jsonl, loss.png")
    run.add_argument("--max-steps", type=int, help="optimizer steps to train")
    run.add_argument("--max-time", type=float, metavar="SECONDS",
                     help="seconds of training; the schedule decays over this time (with --max-steps: whichever ends first)")
    run.add_argument("--stop-after", type=int, metavar="STEPS",
                     help="end this run after STEPS steps with a checkpoint to --resume; the schedule still "
                          "runs to --max-steps (for jobs split across time-limited allocations)")
    run.add_argument("--batch-size", type=int, help="windows per micro-batch, all processes together (default 4)")
    run.add_argument("--seq-len", type=int, help="bytes per window (default 256)")
    run.add_argument("--grad-accum", type=int, help="micro-batches per optimizer step (default 1)")
    run.add_argument("--lr", type=float, help="peak learning rate (default 0.003)")
    run.add_argument("--min-lr-ratio", type=float, help="final learning rate as a fraction of --lr (default 0.1)")
    run.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 30)")
    run.add_argument("--weight-decay", type=float, help="AdamW weight decay on weight matrices (default 0.1)")
    run.add_argument("--grad-clip", type=float, help="max gradient norm, 0 for none (default 1.0)")
    run.add_argument("--seed", type=int, help="seed for the weights, the data order and the split")
    run.add_argument("--eval-every", type=int, help="steps between held-out evaluations, 0: only at the end (default 1000)")
    run.add_argument("--eval-bytes", type=int, help="held-out bytes per evaluation (default 262144)")
    run.add_argument("--save-every", type=int, help="steps between checkpoints, 0: only at the end (default 1000)")
    run.add_argument("--log-every", type=int, help="steps between log lines (default 10)")
    run.add_argument("--resume", metavar="DIR", help="continue from a checkpoint written by `mambabyte train`")
    run.add_argument("--overwrite", action="store_true", help="start afresh even if --out already holds a checkpoint")
    run.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    run.add_argument("--fsdp", action="store_true", help="under torchrun: shard weights and optimizer state (FSDP)")
    run.add_argument("--quiet", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import math
    import os

    # Idle OpenMP threads sleep instead of spinning: on a CPU shared with other jobs, spinning made training
    # up to 8x slower (benchmarks in docs/training.md); it costs ~5% on an idle machine. Read when torch loads.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from mambabyte.train import TrainConfig, train

    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    options = {name: value for name, value in vars(args).items() if name in fields}
    result = train(TrainConfig(**options, progress=not getattr(args, "quiet", False)))
    if os.environ.get("RANK", "0") != "0":  # under torchrun, one process reports
        return 130 if result.interrupted else 0
    if result.interrupted:
        print(f"interrupted at step {result.step}; checkpoint saved to {result.checkpoint}")
        print(f"continue with the same command and --resume {result.checkpoint}")
        return 130
    summary = [f"trained {result.step} steps, {result.bytes_seen:,} bytes in {result.elapsed:.0f}s"]
    if result.train_loss is not None:
        summary.append(f"train {result.train_loss / math.log(2):.4f} bits/byte")
    if result.valid_bits_per_byte is not None:
        summary.append(f"held-out {result.valid_bits_per_byte:.4f} bits/byte")
    print("; ".join(summary))
    print(f"checkpoint: {result.checkpoint}")
    if result.plot is not None:
        print(f"loss curve: {result.plot}")
    return 0
