"""Model configuration and named presets."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from mambabyte.errors import UserError


@dataclass(frozen=True)
class MambaByteConfig:
    """Shape of a MambaByte language model (Mamba-1 blocks over 256 byte ids)."""

    d_model: int = 256
    n_layer: int = 8
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    vocab_size: int = 256
    norm_eps: float = 1e-5
    dt_rank: int = 0  # 0 means ceil(d_model / 16), the Mamba default
    dt_min: float = 1e-3
    dt_max: float = 1e-1
    dt_init_floor: float = 1e-4
    arch: str = "mambabyte"

    def __post_init__(self) -> None:
        if self.dt_rank == 0:
            object.__setattr__(self, "dt_rank", math.ceil(self.d_model / 16))
        for name in ("d_model", "n_layer", "d_state", "expand", "d_conv", "vocab_size"):
            if getattr(self, name) < 1:
                raise UserError(f"config field {name} must be >= 1, got {getattr(self, name)}")

    @property
    def d_inner(self) -> int:
        return self.expand * self.d_model

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "MambaByteConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise UserError(f"unknown config fields: {', '.join(sorted(unknown))}")
        return cls(**values)


PRESETS: dict[str, MambaByteConfig] = {
    # seconds on CPU: unit tests and smoke runs
    "tiny": MambaByteConfig(d_model=32, n_layer=2, d_state=8),
    # a few M parameters, minutes on CPU: the demo
    "small": MambaByteConfig(d_model=256, n_layer=8),
    # a speculative drafter about a tenth of bench-91m: few, wide layers (each layer costs a few kernel
    # launches per drafted token, so depth sets the drafter's speed)
    "draft-wide": MambaByteConfig(d_model=512, n_layer=4),
    # the anchor size of our GPU benchmarks
    "bench-91m": MambaByteConfig(d_model=768, n_layer=24),
    # the paper's sizes (authors' configs: mambabyte_lm.yml)
    "mambabyte-353m": MambaByteConfig(d_model=1024, n_layer=53),
    "mambabyte-972m": MambaByteConfig(d_model=1792, n_layer=48),
}


def preset(name: str, arch: str = "mambabyte"):
    """The config of a named preset of an architecture; a one-line error for an unknown name."""
    if arch == "mambabyte":
        presets = PRESETS
    else:
        from mambabyte.architectures import presets_for  # deferred: the baselines import torch

        presets = presets_for(arch)
    try:
        return presets[name]
    except KeyError:
        raise UserError(f"unknown {arch} preset {name!r}; choose one of: {', '.join(presets)}") from None
