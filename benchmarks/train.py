"""Training throughput (bytes/s) and peak memory of the real trainer (mambabyte.train.train) on the shipped corpus.

    python benchmarks/train.py                      # CPU rows; on a CUDA machine also bench-91m at B16xL2048, B4xL8192
    python benchmarks/train.py --preset small --batch-size 8 --seq-len 256 --steps 10 --device cpu

Every row runs in a fresh process (so the CPU peak resident memory is that row's own). Bytes/s counts the
steps after ``--warmup`` (first steps: kernel builds and allocator warm-up), from the trainer's own log.
CUDA rows train as `mambabyte train` does: fp32 parameters, bf16 autocast, fused AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

# The official mamba_ssm 2.3.2 CUDA path on one H100 (issue 3): bench-91m, fp32 params, bf16 autocast, fused AdamW.
OFFICIAL_H100 = {(16, 2048): (138_000, 23.6e9), (4, 8192): (135_000, 23.6e9)}
CPU_ROWS = [("tiny", 8, 256), ("small", 4, 256), ("small", 8, 256)]  # small 4 x 256: the trainer's default
CUDA_ROWS = [("bench-91m", 16, 2048), ("bench-91m", 4, 8192)]


def measure(preset: str, batch_size: int, seq_len: int, steps: int, warmup: int, device: str) -> dict:
    """Train ``steps`` steps with the real trainer; bytes/s after ``warmup`` steps and peak memory."""
    import resource

    import torch

    from mambabyte.data import shipped_corpus
    from mambabyte.train import TrainConfig, train

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(data=str(shipped_corpus("train")), out=out, preset=preset, batch_size=batch_size,
                          seq_len=seq_len, max_steps=steps, warmup_steps=0, log_every=1, eval_every=0,
                          eval_bytes=0, valid_fraction=0, save_every=0, device=device, progress=False)
        result = train(cfg)
        records = [json.loads(line) for line in open(result.log) if '"loss"' in line]
    timed = [r for r in records if r["step"] > warmup]
    seconds = timed[-1]["elapsed"] - records[warmup - 1]["elapsed"] if warmup else timed[-1]["elapsed"]
    row = {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "device": device,
           "steps_timed": len(timed), "bytes_per_s": len(timed) * batch_size * seq_len / seconds,
           "threads": torch.get_num_threads()}
    if device.startswith("cuda"):
        row["peak_memory"] = torch.cuda.max_memory_allocated()
        row["peak_reserved"] = torch.cuda.max_memory_reserved()
        row["gpu"] = torch.cuda.get_device_name()
    else:
        row["peak_memory"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # process peak RSS
    return row


def run_row(preset: str, batch_size: int, seq_len: int, steps: int, warmup: int, device: str,
            threads: int | None) -> dict:
    """One row in a fresh Python process (with ``threads`` CPU threads, default: torch's choice)."""
    command = [sys.executable, __file__, "--one", "--preset", preset, "--batch-size", str(batch_size),
               "--seq-len", str(seq_len), "--steps", str(steps), "--warmup", str(warmup), "--device", device]
    env = {"OMP_WAIT_POLICY": "PASSIVE", **os.environ,  # as `mambabyte train` runs (commands/train.py)
           **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        return {"preset": preset, "batch_size": batch_size, "seq_len": seq_len, "device": device,
                "error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def print_table(rows: list[dict]) -> None:
    print("| preset | device | batch x length | threads | bytes/s | peak memory | official mamba_ssm 2.3.2 (H100) |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        shape = f"{row['batch_size']} x {row['seq_len']}"
        if "error" in row:
            print(f"| {row['preset']} | {row['device']} | {shape} | | error: {row['error']} | | |")
            continue
        official = OFFICIAL_H100.get((row["batch_size"], row["seq_len"])) if row["preset"] == "bench-91m" else None
        reference = f"{official[0] / 1e3:.0f}K bytes/s, {official[1] / 1e9:.1f} GB" if official else ""
        memory = f"{row['peak_memory'] / 1e9:.2f} GB" + (" (RSS)" if row["device"] == "cpu" else "")
        device = row.get("gpu", row["device"])
        print(f"| {row['preset']} | {device} | {shape} | {row['threads']} | {row['bytes_per_s']:,.0f} | {memory} "
              f"| {reference} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", help="one row for this preset (default: the standard rows)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=None, help="steps per row (default: 8 on CPU, 30 on CUDA)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed first steps (default: 2 on CPU, 5 on CUDA)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: every device there is)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per row (OMP_NUM_THREADS)")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: measure in this process
    args = parser.parse_args()

    def plan(device: str) -> tuple[int, int]:
        cuda = device.startswith("cuda")
        return args.steps or (30 if cuda else 8), args.warmup if args.warmup is not None else (5 if cuda else 2)

    if args.one:
        print(json.dumps(measure(args.preset, args.batch_size, args.seq_len, *plan(args.device), args.device)))
        return
    import torch

    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    rows = []
    for device in devices:
        standard = CUDA_ROWS if device.startswith("cuda") else CPU_ROWS
        for preset, batch_size, seq_len in [(args.preset, args.batch_size, args.seq_len)] if args.preset else standard:
            rows.append(run_row(preset, batch_size, seq_len, *plan(device), device, args.threads))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    print_table(rows)


if __name__ == "__main__":
    main()
