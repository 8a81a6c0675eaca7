"""The model architectures the toolkit knows, by the ``arch`` name stored in every config."""

from __future__ import annotations

from torch import nn

from mambabyte.baselines import (
    MEGABYTE_PRESETS,
    TRANSFORMER_PRESETS,
    ByteTransformerLM,
    MegaByteConfig,
    MegaByteLM,
    TransformerConfig,
)
from mambabyte.config import PRESETS, MambaByteConfig
from mambabyte.errors import UserError
from mambabyte.model import MambaByteLM

ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "mambabyte": (MambaByteConfig, MambaByteLM),
    "transformer": (TransformerConfig, ByteTransformerLM),
    "megabyte": (MegaByteConfig, MegaByteLM),
}

# The preset names tiny, small and bench-91m exist for every architecture, at about the same parameter count.
PRESETS_BY_ARCH: dict[str, dict] = {
    "mambabyte": PRESETS,
    "transformer": TRANSFORMER_PRESETS,
    "megabyte": MEGABYTE_PRESETS,
}


def _lookup(arch: str):
    try:
        return ARCHITECTURES[arch]
    except KeyError:
        raise UserError(f"unknown architecture {arch!r}; choose one of: {', '.join(ARCHITECTURES)}") from None


def presets_for(arch: str) -> dict:
    """The named presets of an architecture."""
    _lookup(arch)
    return PRESETS_BY_ARCH[arch]


def config_from_dict(values: dict):
    """A config object from its dict form (the ``arch`` field picks the class)."""
    config_class, _ = _lookup(values.get("arch", "mambabyte"))
    return config_class.from_dict(values)


def build_model(config) -> nn.Module:
    """A freshly initialised model for ``config``."""
    _, model_class = _lookup(config.arch)
    return model_class(config)
