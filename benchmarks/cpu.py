"""CPU throughput of MambaByte against mambapy 1.2.0 (pure-PyTorch pscan) and Hugging Face transformers' slow path.

The same network (preset ``small`` by default: d_model 256, 8 layers, 3.57M parameters) in three implementations:
training bytes/s (forward + backward + AdamW, fp32, batch x window) and batch-1 generation bytes/s (the
recurrent step, greedy). Each figure is the median of timed repeats after warm-up. Prints a Markdown table.

    python benchmarks/cpu.py            # about 5 minutes on 2 idle cores, mostly HF's training step; needs the `bench` extra (mambapy, transformers)

Training uses every torch thread; batch-1 decoding uses ``--generate-threads`` (1 by default: at batch 1 the
steps are too small to split, and a second thread only adds synchronisation on a busy machine).
HF's path loops over positions in Python and its backward grows faster than the window, so it gets one timed
step and no warm-up (at 2 x 512 that step alone takes minutes).
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import subprocess
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mambabyte.config import preset
from mambabyte.model import MambaByteLM, RMSNorm
from mambabyte.ops.dispatch import resolve_backend

VOCAB = 256


class MambapyLM(nn.Module):
    """mambapy's Mamba backbone inside the same byte embedding, final RMSNorm and tied head as ours."""

    def __init__(self, config):
        super().__init__()
        from mambapy.mamba import Mamba, MambaConfig

        self.embedding = nn.Embedding(VOCAB, config.d_model)
        self.backbone = Mamba(MambaConfig(d_model=config.d_model, n_layers=config.n_layer, d_state=config.d_state,
                                          expand_factor=config.expand, d_conv=config.d_conv, pscan=True))
        self.norm_f = RMSNorm(config.d_model, config.norm_eps)

    def forward(self, ids: Tensor) -> Tensor:
        return self.norm_f(self.backbone(self.embedding(ids))) @ self.embedding.weight.t()

    def init_state(self, batch: int) -> list:
        c = self.backbone.config
        return [(None, torch.zeros(batch, c.d_inner, c.d_conv - 1)) for _ in range(c.n_layers)]

    def step(self, ids: Tensor, caches: list) -> tuple[Tensor, list]:
        hidden, caches = self.backbone.step(self.embedding(ids), caches)
        return self.norm_f(hidden) @ self.embedding.weight.t(), caches


def hf_model(config) -> nn.Module:
    """transformers' MambaForCausalLM of the same shape, random init, forced onto its slow (pure PyTorch) path."""
    import transformers

    from mambabyte.hf import hf_config_from

    hf_config = hf_config_from(config)
    hf_config.use_mambapy = False
    return transformers.MambaForCausalLM(hf_config)


def median_seconds(run: Callable[[], None], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def training_bytes_per_second(model: nn.Module, logits_of: Callable[[Tensor], Tensor], batch: int, window: int,
                              warmup: int, repeats: int) -> float:
    """Bytes/s of full training steps: next-byte cross-entropy, backward, AdamW."""
    ids = torch.randint(0, VOCAB, (batch, window + 1), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step() -> None:
        logits = logits_of(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, VOCAB).float(), ids[:, 1:].reshape(-1))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return batch * window / median_seconds(train_step, warmup, repeats)


def step_generation_bytes_per_second(model: nn.Module, n_bytes: int, warmup: int, repeats: int) -> float:
    """Bytes/s of greedy batch-1 decoding with the model's own recurrent ``step``."""

    @torch.inference_mode()
    def decode() -> None:
        state = model.init_state(1)
        ids = torch.tensor([10])
        for _ in range(n_bytes):
            logits, state = model.step(ids, state)
            ids = logits.argmax(-1)

    return n_bytes / median_seconds(decode, warmup, repeats)


def hf_generation_bytes_per_second(model: nn.Module, n_bytes: int, warmup: int, repeats: int) -> float:
    """Bytes/s of transformers' greedy ``generate`` (its cache-based decoding loop) from a 1-byte prompt."""
    prompt = torch.tensor([[10]])

    @torch.inference_mode()
    def decode() -> None:
        model.generate(prompt, max_new_tokens=n_bytes, min_new_tokens=n_bytes, do_sample=False,
                       pad_token_id=0, eos_token_id=None)

    return n_bytes / median_seconds(decode, warmup, repeats)


def with_threads(threads: int, measure: Callable[[], float]) -> float:
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return measure()
    finally:
        torch.set_num_threads(before)


def cpu_name() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--window", type=int, default=512)
    parser.add_argument("--hf-window", type=int, default=512, help="training window for HF's path (its cost per byte grows with it)")
    parser.add_argument("--generate-bytes", type=int, default=256, help="bytes per timed decoding run")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads for training")
    parser.add_argument("--generate-threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats (HF training: 1)")
    parser.add_argument("--skip", nargs="*", default=[], choices=["mambapy", "hf"], help="contenders to leave out")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    config = preset(args.preset)
    torch.manual_seed(0)
    ours = MambaByteLM(config)
    rows = []  # (name, parameters, training window, training bytes/s, generation bytes/s)
    backend = resolve_backend(None, torch.device("cpu"))

    train = training_bytes_per_second(ours, ours, args.batch_size, args.window, 2, args.repeats)
    generate = with_threads(args.generate_threads, lambda: step_generation_bytes_per_second(
        ours, args.generate_bytes, 1, args.repeats))
    rows.append((f"mambabyte (scan backend `{backend}`)", ours.num_parameters(), args.window, train, generate))

    if "mambapy" not in args.skip:
        theirs = MambapyLM(config)
        train = training_bytes_per_second(theirs, theirs, args.batch_size, args.window, 1, max(2, args.repeats // 2))
        generate = with_threads(args.generate_threads, lambda: step_generation_bytes_per_second(
            theirs, args.generate_bytes, 1, max(2, args.repeats // 2)))
        rows.append(("mambapy 1.2.0 (pscan)", sum(p.numel() for p in theirs.parameters()), args.window, train, generate))

    if "hf" not in args.skip:
        import transformers

        hf = hf_model(config)
        # a single timed step, no warm-up: at 2 x 512 one step of this path takes minutes
        train = training_bytes_per_second(hf, lambda ids: hf(input_ids=ids).logits, args.batch_size, args.hf_window, 0, 1)
        generate = with_threads(args.generate_threads, lambda: hf_generation_bytes_per_second(
            hf, args.generate_bytes // 2, 1, 2))
        rows.append((f"transformers {transformers.__version__} MambaForCausalLM (slow path)",
                     hf.num_parameters(), args.hf_window, train, generate))

    reference = next((row for row in rows if row[0].startswith("mambapy")), None)
    print(f"{datetime.date.today()} | {cpu_name()} | torch {torch.__version__} | {torch.get_num_threads()} threads "
          f"(training), {args.generate_threads} (generation) | preset {args.preset}, fp32, batch {args.batch_size}\n")
    print("| implementation | parameters | training window | training bytes/s | generation bytes/s (batch 1) "
          "| vs mambapy (training / generation) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, parameters, window, train, generate in rows:
        ratio = f"{train / reference[3]:.1f}x / {generate / reference[4]:.1f}x" if reference else "-"
        print(f"| {name} | {parameters:,} | {args.batch_size} x {window} | {train:,.0f} | {generate:,.0f} | {ratio} |")

if __name__ == "__main__":
    main()
