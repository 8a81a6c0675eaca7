"""Compute-matched comparison of MambaByte, a byte-level Transformer and MegaByte on the shipped corpus.

Each architecture is trained from the preset of the same name (about the same parameter count) for the same
training FLOP budget, FLOPs per byte (``mambabyte info``: 3 x forward) x bytes seen, with the same trainer
settings. Then it reports held-out bits per byte, training bytes/s, and generation bytes/s, decoding-state
size and peak memory after 1K and 16K bytes of context. Writes ``compare.md`` (the table), ``compare.json``
and ``compare.png`` (held-out BPB against training FLOPs) into ``--out``.

    python benchmarks/compare.py --out docs/compare           # GPU: `small` preset, 1e15 FLOPs each
    python benchmarks/compare.py --tiny --out /tmp/compare    # CPU smoke test (CI), seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.utils._pytree import tree_leaves

from mambabyte.architectures import build_model
from mambabyte.checkpoint import load_pretrained
from mambabyte.config import preset
from mambabyte.data import load_corpus, shipped_corpus
from mambabyte.evaluate import evaluate
from mambabyte.train import TrainConfig, held_out_documents, train

ARCHITECTURES = ("mambabyte", "transformer", "megabyte")
TRAINER_DEFAULTS = TrainConfig(data="", out="")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small", help="preset name, the same for every architecture")
    parser.add_argument("--flops", type=float, default=1e15, help="training FLOPs per architecture")
    parser.add_argument("--window", type=int, default=2048, help="training window in bytes (and eval window)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=TRAINER_DEFAULTS.lr, help="peak learning rate, the same for all")
    parser.add_argument("--warmup-steps", type=int, default=TRAINER_DEFAULTS.warmup_steps)
    parser.add_argument("--eval-points", type=int, default=6, help="held-out BPB points along each training curve")
    parser.add_argument("--eval-bytes", type=int, default=TRAINER_DEFAULTS.eval_bytes,
                        help="held-out bytes (whole documents in order; the shipped valid split has 218K)")
    parser.add_argument("--contexts", type=int, nargs="+", default=[1024, 16384], help="generation contexts")
    parser.add_argument("--generate-bytes", type=int, default=256, help="bytes timed per generation run")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("compare"), help="where the table, JSON and plot go")
    parser.add_argument("--runs", type=Path, help="keep the training runs (checkpoints, logs) here")
    parser.add_argument("--tiny", action="store_true", help="CPU smoke test: tiny preset, a few steps, seconds")
    args = parser.parse_args(argv)
    if args.tiny:
        args.preset, args.flops, args.window, args.batch_size, args.warmup_steps = "tiny", 5e8, 64, 4, 2
        args.eval_points, args.eval_bytes, args.contexts, args.generate_bytes = 2, 512, [32, 128], 8
    return args


def autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generation_figures(model, context: int, num_bytes: int, window: int, device: torch.device) -> dict:
    """Greedy generation at batch 1 after ``context`` bytes: bytes/s, state size, peak memory while decoding."""
    model.eval()
    ids = torch.randint(0, 256, (1, context), generator=torch.Generator().manual_seed(0)).to(device)
    with autocast(device):
        state = model.init_state(1)
        for start in range(0, context, window):  # prefill in windows, carrying the state
            logits, state = model(ids[:, start:start + window], state=state, return_state=True)
        next_byte = logits[:, -1].argmax(-1)
        del logits
        for _ in range(3):  # warm-up: first-call allocations and kernel choices
            logits, state = model.step(next_byte, state)
            next_byte = logits.argmax(-1)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        synchronize(device)
        began = time.perf_counter()
        for _ in range(num_bytes):
            logits, state = model.step(next_byte, state)
            next_byte = logits.argmax(-1)
        synchronize(device)
        seconds = time.perf_counter() - began
    return {
        "context": context,
        "bytes_per_second": num_bytes / seconds,
        "state_mb": sum(t.numel() * t.element_size() for t in tree_leaves(state)) / 1e6,
        "peak_mb": torch.cuda.max_memory_allocated(device) / 1e6 if device.type == "cuda" else None,  # weights too
    }


def train_run(arch: str, args: argparse.Namespace, steps: int, run_dir: Path):
    """The library trainer, with the same settings for every architecture; returns its result and log records."""
    config = TrainConfig(
        data=str(shipped_corpus("train")), valid_data=str(shipped_corpus("valid")), out=str(run_dir),
        preset=args.preset, arch=arch, batch_size=args.batch_size, seq_len=args.window, max_steps=steps,
        lr=args.lr, warmup_steps=args.warmup_steps, eval_every=max(1, steps // args.eval_points),
        eval_bytes=args.eval_bytes, eval_window=args.window, save_every=0, log_every=max(1, min(10, steps // 4)),
        seed=args.seed, device=args.device, overwrite=True, progress=not args.tiny)
    result = train(config)
    records = [json.loads(line) for line in result.log.read_text().splitlines() if line.strip()]
    return result, records


def training_bytes_per_second(records: list[dict]) -> float:
    """Median over the logged windows after the first (warm-up, allocations) of the trainer's bytes/s."""
    rates = [r["bytes_per_s"] for r in records if "bytes_per_s" in r]
    return statistics.median(rates[1:] or rates)


def run_architecture(arch: str, args: argparse.Namespace, valid_documents: list[bytes], runs: Path) -> dict:
    device = torch.device(args.device)
    with torch.device("meta"):  # FLOPs only: attention counted at the training window
        config = preset(args.preset, arch)
        if arch != "mambabyte":
            config = dataclasses.replace(config, context_length=args.window)
        train_flops_per_byte = 3 * build_model(config).flops_per_byte()
    steps = max(1, math.ceil(args.flops / train_flops_per_byte / (args.batch_size * args.window)))
    result, records = train_run(arch, args, steps, runs / arch)
    model = load_pretrained(result.checkpoint, device=device)
    curve = [{"bytes_seen": r["bytes_seen"], "train_flops": r["bytes_seen"] * train_flops_per_byte,
              "bits_per_byte": r["valid_bpb"]} for r in records if "valid_bpb" in r]
    sliding = evaluate(model, valid_documents, window=args.window, stride=args.window // 2)
    summary = {
        "arch": arch,
        "parameters": model.num_parameters(),
        "flops_per_byte_forward": train_flops_per_byte // 3,
        "steps": result.step,
        "bytes_seen": result.bytes_seen,
        "train_flops": result.bytes_seen * train_flops_per_byte,
        "train_bytes_per_second": training_bytes_per_second(records),
        "held_out_bpb": {"sliding_window": sliding.bits_per_byte, "state_carried": result.valid_bits_per_byte},
        "curve": curve,
        "generation": [generation_figures(model, context, args.generate_bytes, args.window, device)
                       for context in args.contexts],
    }
    print(f"{arch}: {json.dumps({k: v for k, v in summary.items() if k != 'curve'})}", flush=True)
    return summary


def markdown_table(results: list[dict], args: argparse.Namespace) -> str:
    contexts = [f"{c // 1024}K" if c % 1024 == 0 else str(c) for c in args.contexts]
    header = ["arch", "params", "fwd FLOPs/byte", "train FLOPs", "bytes seen",
              f"held-out BPB (window {args.window}, stride {args.window // 2})", "BPB (state carried)",
              "train bytes/s"]
    header += [f"gen bytes/s @{c}" for c in contexts] + [f"state MB @{c}" for c in contexts]
    header += [f"peak MB @{c}" for c in contexts]
    rows = []
    for r in results:
        row = [r["arch"], f"{r['parameters']:,}", f"{r['flops_per_byte_forward'] / 1e6:.2f}M",
               f"{r['train_flops']:.2e}", f"{r['bytes_seen']:,}", f"{r['held_out_bpb']['sliding_window']:.3f}",
               f"{r['held_out_bpb']['state_carried']:.3f}", f"{r['train_bytes_per_second']:,.0f}"]
        row += [f"{g['bytes_per_second']:,.0f}" for g in r["generation"]]
        row += [f"{g['state_mb']:.2f}" for g in r["generation"]]
        row += ["-" if g["peak_mb"] is None else f"{g['peak_mb']:,.0f}" for g in r["generation"]]
        rows.append(row)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "CPU"
    note = (f"Preset `{args.preset}`, {args.flops:.1e} training FLOPs each, window {args.window}, batch "
            f"{args.batch_size}, lr {args.lr}, on {device}. Generation: greedy, batch 1, "
            f"{args.generate_bytes} bytes timed after the context.")
    return note + "\n\n" + "\n".join(lines) + "\n"


def plot_curves(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6, 4))
    for r in results:
        axes.plot([p["train_flops"] for p in r["curve"]], [p["bits_per_byte"] for p in r["curve"]],
                  marker="o", label=f"{r['arch']} ({r['parameters'] / 1e6:.2f}M params)")
    axes.set_xscale("log")
    axes.set_xlabel("training FLOPs")
    axes.set_ylabel("held-out bits per byte")
    axes.set_title("Held-out BPB against training compute")
    axes.grid(True, alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    # the held-out documents the trainer evaluates on, so both BPB columns score the same bytes
    valid_documents = held_out_documents(load_corpus(shipped_corpus("valid")), args.eval_bytes, args.seed)
    threads = torch.get_num_threads()
    if args.tiny:
        torch.set_num_threads(1)  # tiny matrices: threads only add synchronisation, worst on a shared CI machine
    try:
        with tempfile.TemporaryDirectory(prefix="mambabyte-compare-") as scratch:
            runs = args.runs or Path(scratch)
            results = [run_architecture(arch, args, valid_documents, runs) for arch in ARCHITECTURES]
    finally:
        torch.set_num_threads(threads)
    args.out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(results, args)
    (args.out / "compare.md").write_text(table)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    (args.out / "compare.json").write_text(json.dumps({"settings": settings, "results": results}, indent=2) + "\n")
    plot_curves(results, args.out / "compare.png")
    print(table)
    return results


if __name__ == "__main__":
    main()
