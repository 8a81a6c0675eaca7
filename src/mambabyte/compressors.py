"""Bits per byte of general-purpose compressors on the same bytes a model is scored on.

A byte model is only interesting if it beats these: ``gzip -9``, ``bzip2 -9``, ``xz -9`` (lzma preset 9,
without ``--extreme``, as the ``xz -9`` command line does) and ``zstd -19`` when the ``zstandard`` package
or the ``zstd`` program is installed.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import shutil
import subprocess
from collections.abc import Callable


def _zstd_compress() -> Callable[[bytes], bytes] | None:
    """zstd at level 19 through the ``zstandard`` package, else the ``zstd`` program, else None."""
    try:
        import zstandard
    except ImportError:
        program = shutil.which("zstd")
        if program is None:
            return None
        return lambda data: subprocess.run([program, "-19", "-q", "-c"], input=data, stdout=subprocess.PIPE,
                                           check=True).stdout
    return zstandard.ZstdCompressor(level=19).compress


def available_compressors() -> dict[str, Callable[[bytes], bytes]]:
    """Name (as its command line) -> a function that compresses bytes at that setting."""
    compressors = {
        "gzip -9": lambda data: gzip.compress(data, compresslevel=9, mtime=0),
        "bzip2 -9": lambda data: bz2.compress(data, compresslevel=9),
        "xz -9": lambda data: lzma.compress(data, format=lzma.FORMAT_XZ, preset=9),
    }
    zstd = _zstd_compress()
    if zstd is not None:
        compressors["zstd -19"] = zstd
    return compressors


def compressor_bits_per_byte(data: bytes) -> dict[str, float]:
    """Name -> len(compressed) * 8 / len(data) for every available compressor (headers included)."""
    if not data:
        raise ValueError("cannot measure bits per byte of empty data")
    return {name: len(compress(data)) * 8 / len(data) for name, compress in available_compressors().items()}
