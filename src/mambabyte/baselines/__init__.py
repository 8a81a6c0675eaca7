"""Baselines under the same model contract as MambaByte: a byte-level Transformer and MegaByte."""

from mambabyte.baselines.megabyte import PRESETS as MEGABYTE_PRESETS
from mambabyte.baselines.megabyte import MegaByteConfig, MegaByteLM
from mambabyte.baselines.transformer import PRESETS as TRANSFORMER_PRESETS
from mambabyte.baselines.transformer import ByteTransformerLM, TransformerConfig

__all__ = ["MEGABYTE_PRESETS", "TRANSFORMER_PRESETS", "ByteTransformerLM", "MegaByteConfig", "MegaByteLM",
           "TransformerConfig"]
