"""`mambabyte info`: size, decoding state and FLOPs of a preset or a checkpoint."""

from __future__ import annotations

import argparse
import json

HELP = "Print parameters, decoding-state size and FLOPs per byte of a preset or checkpoint."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--preset", default="tiny", help="a named preset (default: tiny)")
    source.add_argument("--checkpoint", metavar="DIR", help="a checkpoint directory instead of a preset")
    parser.add_argument("--arch", default="mambabyte", choices=["mambabyte", "transformer", "megabyte"],
                        help="architecture of --preset (default: mambabyte)")
    parser.add_argument("--batch", type=int, default=1, help="batch size for the state size (default: 1)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def model_summary(model, batch: int) -> dict:
    """The figures `info` prints, as a dict."""
    per_layer = model.state_bytes_per_layer(batch)
    forward = model.flops_per_byte()
    return {
        "arch": model.config.arch,
        "config": model.config.to_dict(),
        "parameters": model.num_parameters(),
        "batch": batch,
        "state_bytes_per_layer": per_layer,
        "state_bytes_total": per_layer * model.config.n_layer,
        "flops_per_byte_forward": forward,
        "flops_per_byte_train": 3 * forward,  # backward costs about twice the forward
    }


def run(args: argparse.Namespace) -> int:
    import torch

    from mambabyte.architectures import build_model
    from mambabyte.checkpoint import load_pretrained
    from mambabyte.config import preset
    from mambabyte.errors import UserError

    if args.batch < 1:
        raise UserError("--batch must be >= 1")
    if args.checkpoint:
        model = load_pretrained(args.checkpoint)
        name = args.checkpoint
    else:
        with torch.device("meta"):  # no memory for the weights: sizes only
            model = build_model(preset(args.preset, args.arch))
        name = args.preset
    summary = model_summary(model, args.batch)
    if args.json:
        print(json.dumps(summary))
        return 0
    print(f"{name} ({summary['arch']})")
    for key, value in summary["config"].items():
        print(f"  {key:<24}{value}")
    print(f"  {'parameters':<24}{summary['parameters']:,}")
    print(f"  {'state per layer':<24}{summary['state_bytes_per_layer']:,} bytes (batch {args.batch})")
    print(f"  {'state total':<24}{summary['state_bytes_total']:,} bytes")
    print(f"  {'FLOPs/byte forward':<24}{summary['flops_per_byte_forward']:,}")
    print(f"  {'FLOPs/byte fwd+bwd':<24}{summary['flops_per_byte_train']:,}")
    return 0
