"""Byte corpora: load documents from files, split them by document, and sample training windows.

A corpus is one flat uint8 buffer (in memory, or memory-mapped from disk for large corpora) plus the
start and end of every document in it. Any bytes are valid, text or binary.

Sources (``load_corpus``): a file, a folder (recursive, hidden files skipped), a glob, or a local
Hugging Face ``datasets`` directory written by ``save_to_disk``. Per file: ``.jsonl`` (and ``.jsonl.gz``)
holds one document per record (its ``text_field``), ``.parquet`` / ``.arrow`` one per row (needs
pyarrow), ``.gz`` one decompressed document, and any other file is one document of raw bytes.

Training windows (``WindowSampler``): every epoch shuffles the documents, joins them as
``separator + document`` segments into one virtual stream, and cuts it into windows of L+1 bytes
starting at a random shift, served in random order. With ``reset_at_boundaries`` the reset flag is True
on the first byte of every segment (its separator), so a model started there sees exactly what it would
see running that document alone: the separator, then the document.
"""

from __future__ import annotations

import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from array import array
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from importlib import resources
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch

from mambabyte.errors import UserError

IN_MEMORY_LIMIT = 256 * 2**20  # inputs larger than this on disk are concatenated into a memory-mapped cache
CACHE_FORMAT = 1  # bump when the cache layout changes
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".jsonl.gz", ".ndjson.gz")
TABLE_SUFFIXES = (".parquet", ".arrow")
HF_DATASET_MARKERS = ("state.json", "dataset_info.json")


class ByteCorpus:
    """Documents stored as slices ``data[starts[i]:ends[i]]`` of one shared uint8 buffer."""

    def __init__(self, data: np.ndarray, starts: np.ndarray, ends: np.ndarray, name: str = "corpus"):
        self.data = data
        self.starts = np.asarray(starts, dtype=np.int64)
        self.ends = np.asarray(ends, dtype=np.int64)
        self.name = name

    @property
    def num_documents(self) -> int:
        return len(self.starts)

    @property
    def num_bytes(self) -> int:
        """Bytes in all documents (separators not counted)."""
        return int((self.ends - self.starts).sum())

    def document_lengths(self) -> np.ndarray:
        return self.ends - self.starts

    def document(self, i: int) -> bytes:
        return self.data[self.starts[i]:self.ends[i]].tobytes()

    def documents(self) -> Iterator[bytes]:
        for i in range(self.num_documents):
            yield self.document(i)

    def subset(self, indices: Iterable[int], name: str | None = None) -> ByteCorpus:
        """The documents at ``indices`` (in that order), sharing this corpus's buffer."""
        indices = np.asarray(list(indices), dtype=np.int64)
        return ByteCorpus(self.data, self.starts[indices], self.ends[indices], name or self.name)

    def __len__(self) -> int:
        return self.num_documents

    def __repr__(self) -> str:
        return f"ByteCorpus({self.name!r}, documents={self.num_documents}, bytes={self.num_bytes})"


# ---------------------------------------------------------------------------------------------- loading


def load_corpus(source: str | os.PathLike, text_field: str = "text", cache_dir: str | os.PathLike | None = None,
                in_memory_limit: int = IN_MEMORY_LIMIT) -> ByteCorpus:
    """Read every document under ``source`` (file, folder, glob or Hugging Face dataset directory).

    Inputs larger than ``in_memory_limit`` bytes on disk are concatenated once into ``cache_dir``
    (default ``$MAMBABYTE_CACHE`` or ``~/.cache/mambabyte``) and memory-mapped; a single plain file is
    memory-mapped in place.
    """
    source_text = os.fspath(source)
    path = Path(source_text).expanduser()
    if path.is_file() and _kind(path) == "raw":
        return _single_file_corpus(path)
    if path.is_dir() and _is_hf_dataset_dir(path):
        files = sorted(p for p in path.rglob("*") if p.is_file())
        documents = partial(_hf_dataset_documents, path, text_field)
    else:
        files = _resolve_files(source_text, path)
        documents = partial(_files_documents, files, text_field)

    input_bytes = sum(f.stat().st_size for f in files)
    if input_bytes > in_memory_limit:
        corpus = _cached_corpus(files, text_field, documents, _cache_root(cache_dir), source_text)
    else:
        data, offsets = _concatenate(documents(), io.BytesIO())
        corpus = ByteCorpus(np.frombuffer(data.getbuffer(), dtype=np.uint8), offsets[:-1], offsets[1:], source_text)
    if corpus.num_documents == 0:
        raise UserError(f"{source_text}: no non-empty documents found")
    return corpus


def _kind(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(TABLE_SUFFIXES):
        return "table"
    if name.endswith(".gz"):
        return "gz"
    return "raw"


def _single_file_corpus(path: Path) -> ByteCorpus:
    size = path.stat().st_size
    if size == 0:
        raise UserError(f"{path}: file is empty")
    data = np.memmap(path, dtype=np.uint8, mode="r")
    return ByteCorpus(data, np.array([0]), np.array([size]), str(path))


def _resolve_files(source_text: str, path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path)))
        if not files:
            raise UserError(f"{source_text}: folder has no files")
        return files
    if glob.has_magic(source_text):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(source_text), recursive=True))
        files = [p for p in files if p.is_file()]
        if not files:
            raise UserError(f"{source_text}: no files match this pattern")
        return files
    raise UserError(f"{source_text}: no such file or folder")


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _files_documents(files: list[Path], text_field: str) -> Iterator[bytes]:
    for path in files:
        yield from _file_documents(path, text_field)


def _file_documents(path: Path, text_field: str) -> Iterator[bytes]:
    kind = _kind(path)
    try:
        if kind == "jsonl":
            yield from _jsonl_documents(path, text_field)
        elif kind == "table":
            yield from _table_documents(path, text_field)
        elif kind == "gz":
            with gzip.open(path, "rb") as f:
                yield f.read()
        else:
            yield path.read_bytes()
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise UserError(f"{path}: not a readable gzip file ({error})") from None
    except OSError as error:
        raise UserError(f"{path}: cannot read ({error.strerror or error})") from None


def _jsonl_documents(path: Path, text_field: str) -> Iterator[bytes]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    with opener(path, "rb") as f:
        for line_number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise UserError(f"{path}: line {line_number} is not valid JSON") from None
            if not isinstance(record, dict) or text_field not in record:
                fields = ", ".join(record) if isinstance(record, dict) else type(record).__name__
                raise UserError(f"{path}: line {line_number} has no field {text_field!r} (has: {fields})")
            yield _as_bytes(record[text_field], f"{path}: line {line_number} field {text_field!r}")


def _as_bytes(value: object, where: str) -> bytes:
    if isinstance(value, str):
        return value.encode("utf-8", errors="surrogatepass")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    raise UserError(f"{where} is {type(value).__name__}, not text")


def _require_pyarrow(what: str):
    try:
        import pyarrow
        import pyarrow.ipc  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise UserError(f"reading {what} needs pyarrow or datasets: pip install datasets") from None
    return pyarrow


def _table_documents(path: Path, text_field: str) -> Iterator[bytes]:
    pa = _require_pyarrow(path.name)
    if path.name.lower().endswith(".parquet"):
        batches = pa.parquet.ParquetFile(path).iter_batches(columns=None)
    else:
        batches = _arrow_batches(pa, path)
    for batch in batches:
        if text_field not in batch.schema.names:
            raise UserError(f"{path}: no field {text_field!r} (has: {', '.join(batch.schema.names)})")
        for row, value in enumerate(batch.column(text_field).to_pylist()):
            yield _as_bytes(value, f"{path}: row {row} field {text_field!r}")


def _arrow_batches(pa, path: Path):
    """Arrow IPC files come in two framings: `datasets` writes the stream one, others the file one."""
    try:
        yield from pa.ipc.open_stream(pa.memory_map(str(path)))
    except pa.ArrowInvalid:
        reader = pa.ipc.open_file(pa.memory_map(str(path)))
        for i in range(reader.num_record_batches):
            yield reader.get_batch(i)


def _is_hf_dataset_dir(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or all((path / m).is_file() for m in HF_DATASET_MARKERS)


def _hf_dataset_documents(path: Path, text_field: str) -> Iterator[bytes]:
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text())["splits"]
        raise UserError(f"{path}: a DatasetDict with splits {', '.join(splits)}; "
                        f"point at one split's folder, e.g. {path / splits[0]}")
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        dataset = datasets.load_from_disk(str(path))
        if text_field not in dataset.column_names:
            raise UserError(f"{path}: no field {text_field!r} (has: {', '.join(dataset.column_names)})")
        for row, value in enumerate(_column(dataset, text_field)):
            yield _as_bytes(value, f"{path}: row {row} field {text_field!r}")
        return
    _require_pyarrow(f"the Hugging Face dataset {path}")
    state = json.loads((path / "state.json").read_text())
    for data_file in state["_data_files"]:
        yield from _table_documents(path / data_file["filename"], text_field)


def _column(dataset, column: str, chunk: int = 10_000) -> Iterator[object]:
    """One column's values, read a chunk of rows at a time (the dataset stays memory-mapped)."""
    for start in range(0, len(dataset), chunk):
        yield from dataset[start:start + chunk][column]


def _concatenate(documents: Iterable[bytes], out: BinaryIO) -> tuple[BinaryIO, np.ndarray]:
    """Write non-empty documents back to back into ``out``; returns (out, offsets of length n+1)."""
    offsets = array("q", [0])
    for document in documents:
        if document:
            out.write(document)
            offsets.append(offsets[-1] + len(document))
    return out, np.frombuffer(offsets, dtype=np.int64)


def _cache_root(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("MAMBABYTE_CACHE", Path.home() / ".cache" / "mambabyte")) / "corpora"


def _cached_corpus(files: list[Path], text_field: str, documents: Callable[[], Iterator[bytes]], cache_root: Path,
                   name: str) -> ByteCorpus:
    """Concatenate once into ``<key>.bin`` + ``<key>.offsets.npy``, keyed by the inputs' paths, sizes and times."""
    fingerprint = hashlib.sha256(repr((CACHE_FORMAT, text_field)).encode())
    for f in files:
        stat = f.stat()
        fingerprint.update(f"{f.resolve()}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    key = fingerprint.hexdigest()[:32]
    data_path, offsets_path = cache_root / f"{key}.bin", cache_root / f"{key}.offsets.npy"
    if not (data_path.is_file() and offsets_path.is_file()):
        staging = cache_root / f"{key}.{os.getpid()}.tmp"
        staging_offsets = Path(f"{staging}.npy")
        try:
            cache_root.mkdir(parents=True, exist_ok=True)
            with open(staging, "wb") as out:
                _, offsets = _concatenate(documents(), out)
            np.save(staging_offsets, offsets)
            os.replace(staging, data_path)  # data first: the offsets file marks a complete cache entry
            os.replace(staging_offsets, offsets_path)
        except OSError as error:
            raise UserError(f"cannot write the corpus cache in {cache_root} ({error.strerror or error}); "
                            "set MAMBABYTE_CACHE to a writable folder") from None
        finally:
            staging.unlink(missing_ok=True)
            staging_offsets.unlink(missing_ok=True)
    offsets = np.load(offsets_path)
    data = np.memmap(data_path, dtype=np.uint8, mode="r") if offsets[-1] > 0 else np.zeros(0, dtype=np.uint8)
    return ByteCorpus(data, offsets[:-1], offsets[1:], name)


# ---------------------------------------------------------------------------------------------- splitting


def split_corpus(corpus: ByteCorpus, valid_fraction: float = 0.1, seed: int = 0) -> tuple[ByteCorpus, ByteCorpus]:
    """Deterministic (train, valid) split by document: a seeded choice of ``valid_fraction`` of the documents.

    Both keep the corpus order. A corpus of a single document (e.g. enwik8) is split by bytes instead:
    its last ``valid_fraction`` of bytes are the validation document.
    """
    if not 0.0 < valid_fraction < 1.0:
        raise UserError(f"valid fraction must be between 0 and 1, got {valid_fraction}")
    n = corpus.num_documents
    if n == 0:
        raise UserError(f"{corpus.name}: no documents to split")
    if n == 1:
        start, end = int(corpus.starts[0]), int(corpus.ends[0])
        cut = end - max(1, round((end - start) * valid_fraction))
        if cut <= start:
            raise UserError(f"{corpus.name}: a document of {end - start} byte(s) cannot be split")
        return (ByteCorpus(corpus.data, [start], [cut], f"{corpus.name} (train)"),
                ByteCorpus(corpus.data, [cut], [end], f"{corpus.name} (valid)"))
    num_valid = min(n - 1, max(1, round(n * valid_fraction)))
    is_valid = np.zeros(n, dtype=bool)
    is_valid[np.random.default_rng(seed).permutation(n)[:num_valid]] = True
    return (corpus.subset(np.flatnonzero(~is_valid), f"{corpus.name} (train)"),
            corpus.subset(np.flatnonzero(is_valid), f"{corpus.name} (valid)"))


def shipped_corpus(split: str) -> Path:
    """Folder of the public-domain English corpus shipped with the package: ``"train"`` or ``"valid"``."""
    if split not in ("train", "valid"):
        raise UserError(f"the shipped corpus has splits 'train' and 'valid', not {split!r}")
    return Path(str(resources.files("mambabyte") / "corpus" / split))


# ---------------------------------------------------------------------------------------------- sampling


class WindowSampler:
    """Batches of L+1-byte windows over the shuffled documents, joined as ``separator + document`` segments.

    ``next_batch()`` returns ``ids`` (batch, L+1) int64 byte values and ``reset`` (batch, L+1) bool: True
    on the first byte of each segment (all False unless ``reset_at_boundaries``). Train on
    ``ids[:, :-1] -> ids[:, 1:]`` with ``reset[:, :-1]``. The batch is the global one: every rank computes
    the same batch from the seed and takes its own rows.
    """

    def __init__(self, corpus: ByteCorpus, window: int, batch_size: int, seed: int = 0,
                 separator: bytes | str = b"\x00", reset_at_boundaries: bool = False):
        if window < 1 or batch_size < 1:
            raise UserError(f"window and batch size must be positive, got {window} and {batch_size}")
        self.corpus = corpus
        self.window = window
        self.batch_size = batch_size
        self.seed = seed
        self.separator = separator.encode("latin-1") if isinstance(separator, str) else bytes(separator)
        self.reset_at_boundaries = reset_at_boundaries
        self.stream_bytes = corpus.num_bytes + corpus.num_documents * len(self.separator)
        if self.stream_bytes < window + 1:
            raise UserError(f"corpus has {self.stream_bytes} bytes, fewer than one window of {window}+1")
        self.windows_per_epoch = self.stream_bytes // (window + 1)
        self.epoch = 0
        self.position = 0  # windows already served in this epoch
        self._layout_epoch = -1

    def _layout(self) -> None:
        """This epoch's document order, segment ends in the joined stream, and window starts in serving order."""
        if self._layout_epoch == self.epoch:
            return
        rng = np.random.default_rng([self.seed, self.epoch])
        self._order = rng.permutation(self.corpus.num_documents)
        lengths = self.corpus.document_lengths()[self._order] + len(self.separator)
        self._segment_ends = np.cumsum(lengths)
        self._segment_starts = self._segment_ends - lengths
        span = self.window + 1
        shift = rng.integers(0, self.stream_bytes - self.windows_per_epoch * span + 1)
        self._window_starts = shift + span * rng.permutation(self.windows_per_epoch)
        self._layout_epoch = self.epoch

    def _gather(self, start: int) -> tuple[np.ndarray, np.ndarray]:
        """The window's byte values and where segments start, from stream offset ``start``."""
        positions = start + np.arange(self.window + 1, dtype=np.int64)
        segment = np.searchsorted(self._segment_ends, positions, side="right")
        within = positions - self._segment_starts[segment]
        sep_len = len(self.separator)
        in_separator = within < sep_len
        values = np.empty(len(positions), dtype=np.int64)
        if sep_len:
            values[in_separator] = np.frombuffer(self.separator, dtype=np.uint8)[within[in_separator]]
        doc_bytes = ~in_separator
        source = self.corpus.starts[self._order[segment[doc_bytes]]] + within[doc_bytes] - sep_len
        values[doc_bytes] = self.corpus.data[source]
        return values, within == 0

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ids (batch, L+1) int64 and reset (batch, L+1) bool for the next global batch."""
        ids = np.empty((self.batch_size, self.window + 1), dtype=np.int64)
        reset = np.zeros((self.batch_size, self.window + 1), dtype=bool)
        for row in range(self.batch_size):
            if self.position == self.windows_per_epoch:
                self.epoch, self.position = self.epoch + 1, 0
            self._layout()
            ids[row], starts = self._gather(int(self._window_starts[self.position]))
            if self.reset_at_boundaries:
                reset[row] = starts
            self.position += 1
        return torch.from_numpy(ids), torch.from_numpy(reset)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "epoch": self.epoch, "position": self.position, "window": self.window,
                "batch_size": self.batch_size, "separator": self.separator.decode("latin-1"),
                "num_documents": self.corpus.num_documents, "num_bytes": self.corpus.num_bytes}

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where ``state`` was taken; the corpus and settings must be the same."""
        mine = self.state_dict()
        for key in ("window", "separator", "num_documents", "num_bytes"):
            if state[key] != mine[key]:
                raise UserError(f"cannot resume the data position: {key} was {state[key]!r}, now {mine[key]!r}")
        self.seed, self.epoch, self.position = state["seed"], state["epoch"], state["position"]
