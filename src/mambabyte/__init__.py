"""mambabyte: token-free byte-level Mamba language models."""

from mambabyte.config import PRESETS, MambaByteConfig, preset
from mambabyte.errors import UserError
from mambabyte.model import MambaByteLM

__all__ = ["PRESETS", "MambaByteConfig", "MambaByteLM", "UserError", "preset"]
__version__ = "0.1.0"
