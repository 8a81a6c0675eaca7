"""Kernels and their plain-PyTorch reference twins; ``dispatch`` picks a backend."""

from mambabyte.ops.causal_conv import causal_conv1d, causal_conv1d_step
from mambabyte.ops.dispatch import SCAN_BACKENDS, selective_scan, selective_step

__all__ = ["SCAN_BACKENDS", "causal_conv1d", "causal_conv1d_step", "selective_scan", "selective_step"]
