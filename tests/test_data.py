import gzip
import json
import sys

import numpy as np
import pytest
import torch

from mambabyte.architectures import build_model
from mambabyte.config import preset
from mambabyte.data import ByteCorpus, WindowSampler, load_corpus, shipped_corpus, split_corpus
from mambabyte.errors import UserError

DOCS = [b"first document\n", b"second, longer document with more bytes\n", b"\xff\x00\x80binary\x01\xfe", b"last"]


def write_docs(folder, docs=DOCS):
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_bytes(doc)
    return folder


def in_memory(docs) -> ByteCorpus:
    data = np.frombuffer(b"".join(docs), dtype=np.uint8)
    ends = np.cumsum([len(d) for d in docs])
    return ByteCorpus(data, ends - [len(d) for d in docs], ends)


def test_single_file_is_one_memory_mapped_document(tmp_path):
    path = tmp_path / "one.bin"
    path.write_bytes(bytes(range(256)) * 3)
    corpus = load_corpus(path)
    assert corpus.num_documents == 1 and corpus.num_bytes == 768
    assert corpus.document(0) == bytes(range(256)) * 3
    assert isinstance(corpus.data, np.memmap)


def test_folder_is_recursive_sorted_and_skips_hidden_files(tmp_path):
    write_docs(tmp_path / "a")
    write_docs(tmp_path / "b" / "nested", [b"deep"])
    (tmp_path / ".hidden").write_bytes(b"not a document")
    corpus = load_corpus(tmp_path)
    assert list(corpus.documents()) == DOCS + [b"deep"]
    assert corpus.num_bytes == sum(map(len, DOCS)) + 4


def test_glob_selects_matching_files(tmp_path):
    write_docs(tmp_path)
    (tmp_path / "skip.md").write_bytes(b"markdown")
    corpus = load_corpus(str(tmp_path / "**" / "*.txt"))
    assert list(corpus.documents()) == DOCS


def test_gzip_files_are_decompressed(tmp_path):
    (tmp_path / "a.txt.gz").write_bytes(gzip.compress(DOCS[2]))
    assert list(load_corpus(tmp_path / "a.txt.gz").documents()) == [DOCS[2]]


def test_jsonl_records_are_documents_of_the_chosen_field(tmp_path):
    lines = [json.dumps({"body": d.decode("latin-1"), "id": i}) for i, d in enumerate(DOCS[:2])]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps({"body": "caf\u00e9 \u2603"}) + "\n")
    corpus = load_corpus(tmp_path, text_field="body")
    assert list(corpus.documents()) == DOCS[:2] + ["caf\u00e9 \u2603".encode()]


def test_jsonl_without_the_field_names_field_and_line(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\n{"content": "no"}\n')
    with pytest.raises(UserError, match=r"line 2 has no field 'text' \(has: content\)"):
        load_corpus(tmp_path / "a.jsonl")


def test_jsonl_field_that_is_not_text_is_a_user_error(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": 3}\n')
    with pytest.raises(UserError, match="line 1 field 'text' is int, not text"):
        load_corpus(tmp_path / "a.jsonl")


def test_bad_jsonl_line_is_a_user_error_and_leaves_no_cache_behind(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(UserError, match="line 2 is not valid JSON"):
        load_corpus(tmp_path / "a.jsonl", cache_dir=tmp_path / "cache", in_memory_limit=0)
    assert list((tmp_path / "cache").iterdir()) == []


def test_large_inputs_go_through_a_reused_memory_mapped_cache(tmp_path):
    write_docs(tmp_path / "docs")
    corpus = load_corpus(tmp_path / "docs", cache_dir=tmp_path / "cache", in_memory_limit=0)
    assert isinstance(corpus.data, np.memmap)
    assert list(corpus.documents()) == DOCS
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert len(cached) == 2 and not any(name.endswith(".tmp") for name in cached)
    again = load_corpus(tmp_path / "docs", cache_dir=tmp_path / "cache", in_memory_limit=0)
    assert list(again.documents()) == DOCS
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == cached


@pytest.mark.parametrize("files, source, message", [
    ({}, "missing.txt", "no such file or folder"),
    ({}, "nothing*.txt", "no files match"),
    ({"empty/.keep": b"hidden"}, "empty", "folder has no files"),
    ({"e.txt": b""}, "e.txt", "file is empty"),
    ({"x.gz": b"not gzip at all"}, "x.gz", "not a readable gzip file"),
    ({"t.gz": gzip.compress(b"x" * 1000)[:-12]}, "t.gz", "not a readable gzip file"),
])
def test_bad_sources_raise_one_line_user_errors(tmp_path, files, source, message):
    for name, content in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=message) as error:
        load_corpus(tmp_path / source)
    assert "\n" not in str(error.value)


def test_folder_of_empty_files_has_no_documents(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"")
    (tmp_path / "b.txt").write_bytes(b"")
    with pytest.raises(UserError, match="no non-empty documents"):
        load_corpus(tmp_path)


def test_hugging_face_dataset_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": ["alpha", "beta\u00e9"], "n": [1, 2]}).save_to_disk(tmp_path / "ds")
    assert list(load_corpus(tmp_path / "ds").documents()) == [b"alpha", "beta\u00e9".encode()]
    with pytest.raises(UserError, match="no field 'body'"):
        load_corpus(tmp_path / "ds", text_field="body")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a"]})}).save_to_disk(tmp_path / "dd")
    with pytest.raises(UserError, match="point at one split"):
        load_corpus(tmp_path / "dd")


def test_hugging_face_dataset_directory_read_with_pyarrow_alone(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(5)]}).save_to_disk(tmp_path / "ds", num_shards=2)
    monkeypatch.setitem(sys.modules, "datasets", None)  # as if datasets were not installed
    assert list(load_corpus(tmp_path / "ds").documents()) == [f"row {i}".encode() for i in range(5)]
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(UserError, match="pip install datasets"):
        load_corpus(tmp_path / "ds")


def test_parquet_files(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["one", "two"]}), tmp_path / "part.parquet")
    assert list(load_corpus(tmp_path / "part.parquet").documents()) == [b"one", b"two"]


def test_split_is_deterministic_disjoint_and_complete():
    docs = [f"document {i}".encode() for i in range(50)]
    corpus = in_memory(docs)
    train, valid = split_corpus(corpus, valid_fraction=0.2, seed=3)
    again_train, again_valid = split_corpus(corpus, valid_fraction=0.2, seed=3)
    assert list(valid.documents()) == list(again_valid.documents())
    assert list(train.documents()) == list(again_train.documents())
    assert valid.num_documents == 10 and train.num_documents == 40
    assert set(train.documents()) | set(valid.documents()) == set(docs)
    assert not set(train.documents()) & set(valid.documents())
    _, other_valid = split_corpus(corpus, valid_fraction=0.2, seed=4)
    assert list(other_valid.documents()) != list(valid.documents())


def test_single_document_splits_by_bytes():
    train, valid = split_corpus(in_memory([bytes(range(100))]), valid_fraction=0.1)
    assert train.document(0) == bytes(range(90)) and valid.document(0) == bytes(range(90, 100))


def joined_stream(sampler: WindowSampler, docs) -> bytes:
    return b"".join(sampler.separator + d for d in docs)


def test_windows_are_slices_of_the_shuffled_joined_stream():
    docs = [bytes([65 + i]) * (5 + 3 * i) for i in range(12)]
    sampler = WindowSampler(in_memory(docs), window=9, batch_size=4, seed=1, separator=b"|")
    seen = set()
    for _ in range(sampler.windows_per_epoch // 4):
        ids, reset = sampler.next_batch()
        assert ids.shape == reset.shape == (4, 10) and ids.dtype == torch.int64
        assert not reset.any()
        for row in ids.tolist():
            window = bytes(row)
            assert window in joined_stream(sampler, [docs[i] for i in sampler._order])
            seen.add(window)
    assert len(seen) > 1
    assert sampler.epoch == 0


def test_epochs_reshuffle_documents():
    docs = [bytes([i]) * 7 for i in range(1, 30)]
    sampler = WindowSampler(in_memory(docs), window=15, batch_size=1, seed=0)
    orders = []
    for _ in range(2 * sampler.windows_per_epoch):
        sampler.next_batch()
        orders.append(tuple(sampler._order))
    assert sampler.epoch == 1 and orders[0] != orders[-1]


def test_sampler_is_deterministic_and_resumes_exactly():
    corpus = in_memory([bytes([i % 251]) * (10 + i) for i in range(40)])
    straight = WindowSampler(corpus, window=16, batch_size=3, seed=7, reset_at_boundaries=True)
    batches = [straight.next_batch() for _ in range(60)]  # crosses two epoch boundaries
    assert straight.epoch > 1

    first = WindowSampler(corpus, window=16, batch_size=3, seed=7, reset_at_boundaries=True)
    for ids, reset in batches[:13]:
        got_ids, got_reset = first.next_batch()
        assert torch.equal(got_ids, ids) and torch.equal(got_reset, reset)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a checkpoint file
    resumed = WindowSampler(corpus, window=16, batch_size=3, seed=0, reset_at_boundaries=True)
    resumed.load_state_dict(state)
    for ids, reset in batches[13:]:
        got_ids, got_reset = resumed.next_batch()
        assert torch.equal(got_ids, ids) and torch.equal(got_reset, reset)

    other_seed = WindowSampler(corpus, window=16, batch_size=3, seed=8).next_batch()[0]
    assert not torch.equal(other_seed, batches[0][0])


def test_resume_on_another_corpus_is_refused():
    sampler = WindowSampler(in_memory(DOCS), window=8, batch_size=2)
    other = WindowSampler(in_memory(DOCS[:3]), window=8, batch_size=2)
    with pytest.raises(UserError, match="num_documents"):
        other.load_state_dict(sampler.state_dict())


@pytest.mark.parametrize("separator", [b"\x00", b"\n\n", b""])
def test_reset_flags_mark_each_segment_start(separator):
    docs = [bytes([97 + i]) * (3 + i) for i in range(8)]  # each document repeats its own letter
    sampler = WindowSampler(in_memory(docs), window=12, batch_size=6, seed=2, separator=separator,
                            reset_at_boundaries=True)
    is_letter = lambda b: 97 <= b < 123  # noqa: E731
    for _ in range(3):
        ids, reset = sampler.next_batch()
        for row, flags in zip(ids.tolist(), reset.tolist()):
            for t in range(1, len(row)):
                if separator:  # a segment starts with its separator's first byte, right after a document byte
                    assert flags[t] == (is_letter(row[t - 1]) and not is_letter(row[t])), (row, flags)
                else:  # no separator: the segment starts with the document's first byte
                    assert flags[t] == (row[t] != row[t - 1]), (row, flags)
            if separator:
                assert flags[0] == (bytes(row[:len(separator)]) == separator), (row, flags)


def test_binary_bytes_are_preserved_through_the_sampler():
    doc = bytes(range(256))
    sampler = WindowSampler(in_memory([doc]), window=255, batch_size=1, separator=b"")
    ids, _ = sampler.next_batch()
    assert bytes(ids[0].tolist()) == doc


def test_corpus_shorter_than_one_window_is_a_user_error():
    with pytest.raises(UserError, match=r"corpus has 6 bytes, fewer than one window of 8\+1"):
        WindowSampler(in_memory([b"ab", b"cd"]), window=8, batch_size=1)


def test_packed_window_with_resets_equals_documents_run_separately():
    torch.manual_seed(0)
    model = build_model(preset("tiny")).eval()
    docs = [b"the first document", b"a second one, a bit longer than that", b"third", b"and the fourth"]
    sampler = WindowSampler(in_memory(docs), window=40, batch_size=2, seed=5, separator=b"\n",
                            reset_at_boundaries=True)
    ids, reset = sampler.next_batch()
    with torch.no_grad():
        packed = model(ids, reset=reset)
        for row in range(ids.shape[0]):
            starts = (ids[row] == ord("\n")).nonzero().flatten().tolist()  # found from the bytes, not the flags
            assert starts
            for begin, end in zip(starts, starts[1:] + [ids.shape[1]]):
                segment = bytes(ids[row, begin:end].tolist())
                assert any((b"\n" + doc).startswith(segment) for doc in docs)
                alone = model(ids[row:row + 1, begin:end])  # the separator, then the document, from a fresh state
                torch.testing.assert_close(packed[row:row + 1, begin:end], alone, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(ids), packed)  # without resets the documents do leak into each other


def test_shipped_corpus_has_disjoint_train_and_valid_documents():
    train, valid = load_corpus(shipped_corpus("train")), load_corpus(shipped_corpus("valid"))
    assert 2_000_000 < train.num_bytes < 8_000_000 and 50_000 < valid.num_bytes < 300_000
    assert train.num_documents > 500 and valid.num_documents > 10
    assert not set(train.documents()) & set(valid.documents())
    with pytest.raises(UserError, match="splits"):
        shipped_corpus("test")
