"""mambabyte: token-free byte-level Mamba language models.

The public names are imported on first use, so `mambabyte --help` does not wait for torch.
"""

from importlib import import_module

__version__ = "0.1.0"

_PUBLIC = {
    "MambaByteConfig": "mambabyte.config",
    "PRESETS": "mambabyte.config",
    "preset": "mambabyte.config",
    "MambaByteLM": "mambabyte.model",
    "UserError": "mambabyte.errors",
    "save_pretrained": "mambabyte.checkpoint",
    "load_pretrained": "mambabyte.checkpoint",
}
__all__ = sorted(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'mambabyte' has no attribute {name!r}")
