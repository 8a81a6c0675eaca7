"""Loss curve of the fast path (Triton kernels) against the pure-PyTorch path: same weights, same data, same steps.

Trains one model twice from the same initial weights on the same batches of the shipped corpus, with the
trainer's optimizer, parameter groups, learning-rate schedule, gradient clipping and precision (fp32 weights,
bf16 autocast on CUDA; ``mambabyte.train``):

- fast: the automatic scan backend (``triton`` on CUDA, the compiled ``cpu`` kernel on a CPU) and the
  automatic conv (the Triton conv on CUDA);
- reference: the ``chunked`` PyTorch scan and the PyTorch conv.

Prints a markdown summary and writes ``loss_curve.json`` (both curves) and ``loss_curve.png`` into ``--out``.

    PYTHONPATH=src python3 benchmarks/loss_curve.py                     # CUDA: bench-91m, B4 x L1024, 300 steps
    python benchmarks/loss_curve.py --preset tiny --batch 2 --length 128 --steps 20 --device cpu   # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import time
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from mambabyte.architectures import build_model
from mambabyte.config import preset
from mambabyte.data import WindowSampler, load_corpus, shipped_corpus
from mambabyte.ops import dispatch
from mambabyte.train import TrainConfig, build_optimizer, learning_rate, mixed_precision

REFERENCE_SCAN = "chunked"
ESTIMATE_AFTER = 5  # steps before printing a time estimate (the first step builds the kernels)
TAIL = 50  # last steps compared on average


@contextlib.contextmanager
def kernels(scan_backend: str, triton_conv: bool) -> Iterator[None]:
    """Run the model with this scan backend (MAMBABYTE_SCAN), and the Triton conv on CUDA only if ``triton_conv``.

    ops.causal_conv sends CUDA tensors to Triton whenever ``dispatch.TRITON_RUNS``; it has no switch of its own,
    so the reference run turns that flag off for its duration (it only moves the conv and the decoding step).
    """
    saved_scan, saved_triton = os.environ.get("MAMBABYTE_SCAN"), dispatch.TRITON_RUNS
    os.environ["MAMBABYTE_SCAN"] = scan_backend
    dispatch.TRITON_RUNS = saved_triton and triton_conv
    try:
        yield
    finally:
        dispatch.TRITON_RUNS = saved_triton
        if saved_scan is None:
            os.environ.pop("MAMBABYTE_SCAN")
        else:
            os.environ["MAMBABYTE_SCAN"] = saved_scan


def train_curve(name: str, cfg: TrainConfig, initial_weights: dict, device: torch.device) -> dict:
    """Train ``cfg.max_steps`` steps from ``initial_weights``; per-step losses (nats/byte), wall time, bytes/s."""
    model = build_model(preset(cfg.preset, cfg.arch))
    model.load_state_dict(initial_weights)
    model.to(device).train()
    optimizer = build_optimizer(model, cfg, device)
    sampler = WindowSampler(load_corpus(cfg.data), window=cfg.seq_len, batch_size=cfg.batch_size, seed=cfg.seed)
    bytes_per_step = cfg.batch_size * cfg.seq_len
    synchronize = torch.cuda.synchronize if device.type == "cuda" else lambda: None
    losses, marks = [], {}  # marks: steps done -> seconds since the start (after a synchronize)
    synchronize()
    start = time.perf_counter()
    for step in range(cfg.max_steps):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(cfg, step, 0.0)
        ids, _ = sampler.next_batch()
        ids = ids.to(device)
        with mixed_precision(device):
            logits = model(ids[:, :-1])
            loss = F.cross_entropy(logits.float().flatten(0, 1), ids[:, 1:].flatten())
        loss.backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.detach())
        if step + 1 in (1, ESTIMATE_AFTER):
            synchronize()
            marks[step + 1] = time.perf_counter() - start
        if step + 1 == ESTIMATE_AFTER < cfg.max_steps:
            pace = (marks[ESTIMATE_AFTER] - marks[1]) / (ESTIMATE_AFTER - 1)
            print(f"{name}: step 1 took {marks[1]:.2f} s (kernel builds), steps 2-{ESTIMATE_AFTER} {pace:.3f} s each "
                  f"(loss {loss.item():.4f}); about {pace * (cfg.max_steps - ESTIMATE_AFTER):.0f} s to go", flush=True)
    synchronize()
    wall = time.perf_counter() - start
    after_warmup = None
    if cfg.max_steps > ESTIMATE_AFTER:
        after_warmup = bytes_per_step * (cfg.max_steps - ESTIMATE_AFTER) / (wall - marks[ESTIMATE_AFTER])
    return {"losses": torch.stack(losses).float().cpu().tolist(), "wall_s": wall,
            "bytes_per_s": bytes_per_step * cfg.max_steps / wall, "bytes_per_s_after_warmup": after_warmup}


def compare(fast: list[float], reference: list[float]) -> dict:
    """Agreement of two loss curves of the same length."""
    difference = [f - r for f, r in zip(fast, reference)]
    tail = slice(-min(TAIL, len(fast)), None)
    worst = max(range(len(difference)), key=lambda i: abs(difference[i]))
    fast_tail, reference_tail = _mean(fast[tail]), _mean(reference[tail])
    return {"tail_steps": len(fast[tail]),
            "first_step_abs_difference": abs(difference[0]),
            "tail_mean_abs_difference": _mean([abs(d) for d in difference[tail]]),
            "max_abs_difference": abs(difference[worst]), "max_abs_difference_step": worst + 1,
            "final_relative_difference": abs(difference[-1]) / abs(reference[-1]),
            "fast_tail_mean": fast_tail, "reference_tail_mean": reference_tail,
            "tail_mean_relative_difference": abs(fast_tail - reference_tail) / abs(reference_tail)}


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def _rate(run: dict) -> str:
    """Bytes/s over the whole run, and over the steps after the first few (kernel builds, allocator warm-up)."""
    rate = f"{run['bytes_per_s']:,.0f}"
    if run["bytes_per_s_after_warmup"]:
        rate += f" ({run['bytes_per_s_after_warmup']:,.0f} after step {ESTIMATE_AFTER})"
    return rate


def markdown(result: dict) -> str:
    fast, reference, summary = result["fast"], result["reference"], result["summary"]
    s = result["settings"]
    tail = summary["tail_steps"]
    lines = [
        f"Loss curves, {s['preset']}, batch {s['batch']} x length {s['length']}, {s['steps']} steps, lr {s['lr']:g}, "
        f"{result['device']} ({s['precision']}), {result['date']}",
        "",
        f"| | fast: {fast['label']} | reference: {reference['label']} | difference |",
        "|---|---|---|---|",
        f"| loss at step 1 (nats/byte) | {fast['losses'][0]:.5f} | {reference['losses'][0]:.5f} "
        f"| {summary['first_step_abs_difference']:.2e} |",
        f"| final loss (step {s['steps']}) | {fast['losses'][-1]:.5f} | {reference['losses'][-1]:.5f} "
        f"| {abs(fast['losses'][-1] - reference['losses'][-1]):.2e} "
        f"(relative {summary['final_relative_difference']:.2e}) |",
        f"| mean loss, last {tail} steps | {summary['fast_tail_mean']:.5f} | {summary['reference_tail_mean']:.5f} "
        f"| {abs(summary['fast_tail_mean'] - summary['reference_tail_mean']):.2e} "
        f"(relative {summary['tail_mean_relative_difference']:.2e}) |",
        f"| mean abs difference, last {tail} steps | | | {summary['tail_mean_abs_difference']:.2e} |",
        f"| max abs difference | | | {summary['max_abs_difference']:.2e} (step {summary['max_abs_difference_step']}) |",
        f"| wall time | {fast['wall_s']:.1f} s | {reference['wall_s']:.1f} s | |",
        f"| bytes/s | {_rate(fast)} | {_rate(reference)} | |",
    ]
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Both curves on one axis, the difference (fast - reference) in a small panel below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fast, reference = result["fast"]["losses"], result["reference"]["losses"]
    steps = range(1, len(fast) + 1)
    figure, (curves, difference) = plt.subplots(2, 1, sharex=True, figsize=(7, 5.5),
                                                gridspec_kw={"height_ratios": [3, 1]})
    curves.plot(steps, fast, label=f"fast: {result['fast']['label']}", linewidth=1)
    curves.plot(steps, reference, label=f"reference: {result['reference']['label']}", linewidth=1, linestyle="--")
    curves.set_ylabel("training loss (nats/byte)")
    s = result["settings"]
    curves.set_title(f"{s['preset']}, B{s['batch']} x L{s['length']}, {result['device']}\n({s['precision']})")
    curves.legend()
    curves.grid(True, alpha=0.3)
    difference.plot(steps, [f - r for f, r in zip(fast, reference)], linewidth=1, color="black")
    difference.axhline(0.0, color="grey", linewidth=0.5)
    difference.set_xlabel("step")
    difference.xaxis.set_major_locator(MaxNLocator(integer=True))
    difference.set_ylabel("fast - reference")
    difference.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TrainConfig(data="", out="")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="bench-91m")
    parser.add_argument("--batch", type=int, default=4, help="windows per step")
    parser.add_argument("--length", type=int, default=1024, help="bytes per window (the reference path takes "
                        "~0.5 s per step of 4 x 1024 bytes on an H100)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if there is one)")
    parser.add_argument("--lr", type=float, default=defaults.lr, help="peak learning rate (default: the trainer's)")
    parser.add_argument("--seed", type=int, default=0, help="initial weights and data order")
    parser.add_argument("--out", default="runs/loss_curve", help="folder for loss_curve.json and loss_curve.png")
    args = parser.parse_args(argv)
    if min(args.batch, args.length, args.steps) < 1:
        parser.error("--batch, --length and --steps must be >= 1")
    return args


def main(argv: list[str] | None = None) -> dict:
    """Both runs, the summary printed, the JSON and PNG written; returns what the JSON holds."""
    args = parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(data=str(shipped_corpus("train")), out=str(out), preset=args.preset, batch_size=args.batch,
                      seq_len=args.length, lr=args.lr, max_steps=args.steps, seed=args.seed, device=str(device))
    torch.manual_seed(cfg.seed)  # as the trainer does before building the model
    initial_weights = {k: v.clone() for k, v in build_model(preset(cfg.preset, cfg.arch)).state_dict().items()}

    fast_scan = dispatch.resolve_backend("auto", device)
    triton_conv = device.type == "cuda" and dispatch.TRITON_RUNS
    runs = {"fast": (fast_scan, triton_conv), "reference": (REFERENCE_SCAN, False)}
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "settings": {"preset": cfg.preset, "batch": cfg.batch_size, "length": cfg.seq_len,
                           "steps": cfg.max_steps, "lr": cfg.lr, "seed": cfg.seed,
                           "precision": "fp32 params, bf16 autocast" if device.type == "cuda" else "fp32",
                           "train_config": cfg.to_dict()}}
    for name, (scan, conv) in runs.items():
        label = f"{scan} scan, {'triton' if conv else 'pytorch'} conv"
        print(f"{name} run ({label}): {cfg.max_steps} steps of {cfg.batch_size} x {cfg.seq_len} bytes on {device}",
              flush=True)
        with kernels(scan, conv):
            result[name] = {"label": label, "scan_backend": scan, "triton_conv": conv,
                            **train_curve(name, cfg, initial_weights, device)}
        if not all(math.isfinite(loss) for loss in result[name]["losses"]):
            print(f"warning: the {name} run's loss is not finite at some step", flush=True)
    result["summary"] = compare(result["fast"]["losses"], result["reference"]["losses"])

    print("\n" + markdown(result))
    (out / "loss_curve.json").write_text(json.dumps(result, indent=1))
    plot(result, out / "loss_curve.png")
    print(f"\nwrote {out / 'loss_curve.json'} and {out / 'loss_curve.png'}")
    return result


if __name__ == "__main__":
    main()
