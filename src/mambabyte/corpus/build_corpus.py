"""Rebuild this folder's corpus from Debian packages (run as root on Debian 12; needs no network beyond apt).

    apt-get install bible-kjv bible-kjv-text dict-devil dict-jargon
    python src/mambabyte/corpus/build_corpus.py

Writes train/<source>.jsonl.gz and valid/<source>.jsonl.gz: one JSON record per document,
{"title": ..., "text": ...}. Seeded random documents holding ~3% of each source's bytes are held out.
"""

from __future__ import annotations

import base64
import gzip
import json
import random
import re
import subprocess
from pathlib import Path

HERE = Path(__file__).parent
VALID_FRACTION = 0.03
SEED = 1234
DICT_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"


def kjv_chapters() -> list[tuple[str, str]]:
    """The KJV Bible, one document per chapter ("Genesis 1", then one verse per line), via the `bible` reader."""
    dump = subprocess.run(["bible", "-l1000000", "gen1:1-rev22:21"], capture_output=True, text=True,
                          check=True).stdout
    chapters = []
    for block in re.split(r"\n(?=\S[^\n]* \d+\n\n)", dump.strip("\n")):
        title, _, body = block.partition("\n\n")
        verses = [re.sub(r"^\s*\d+ ", "", line) for line in body.strip("\n").split("\n")]
        chapters.append((title.strip(), title.strip() + "\n\n" + "\n".join(verses) + "\n"))
    assert len(chapters) == 1189, len(chapters)
    return chapters


def b64(number: str) -> int:
    value = 0
    for ch in number:
        value = value * 64 + DICT_B64.index(ch)
    return value


def dict_entries(name: str) -> list[tuple[str, str]]:
    """(headword, entry text) of a dictd database, in file order, without its 00-database-* entries."""
    text = gzip.open(f"/usr/share/dictd/{name}.dict.dz").read()
    entries = []
    for line in Path(f"/usr/share/dictd/{name}.index").read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")
        if not word.startswith("00"):
            start = b64(offset)
            entries.append((start, word, text[start:start + b64(length)].decode("utf-8").strip("\n") + "\n"))
    entries.sort()
    return [(word, entry) for _, word, entry in entries]


def by_letter(title: str, entries: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """One document per initial letter (entries starting with a non-letter form their own group)."""
    groups: dict[str, list[str]] = {}
    for word, entry in entries:
        first = word[0].upper()
        groups.setdefault(first if first.isalpha() else "#", []).append(entry)
    return [(f"{title}: {letter}", "\n".join(texts)) for letter, texts in groups.items()]


def devils_dictionary() -> list[tuple[str, str]]:
    info = gzip.open("/usr/share/dictd/devil.dict.dz").read().decode("utf-8")
    preface = info[info.index("                              PREFACE"):info.index("ABASEMENT, n.")]
    return [("The Devil's Dictionary: Preface", preface.strip("\n") + "\n")] + by_letter(
        "The Devil's Dictionary", dict_entries("devil"))


def jargon_file() -> list[tuple[str, str]]:
    return by_letter("The Jargon File 4.4.7", dict_entries("jargon"))


def write(split: str, source: str, documents: list[tuple[str, str]]) -> int:
    folder = HERE / split
    folder.mkdir(exist_ok=True)
    with gzip.GzipFile(folder / f"{source}.jsonl.gz", "wb", compresslevel=9, mtime=0) as f:
        for title, text in documents:
            f.write((json.dumps({"title": title, "text": text}, ensure_ascii=False) + "\n").encode("utf-8"))
    return sum(len(text.encode("utf-8")) for _, text in documents)


def held_out(source: str, documents: list[tuple[str, str]]) -> set[int]:
    """Seeded random documents of the source until they hold VALID_FRACTION of its bytes."""
    order = list(range(len(documents)))
    random.Random(f"{SEED}-{source}").shuffle(order)
    total, valid, held = sum(len(text) for _, text in documents), set(), 0
    for i in order:
        if held >= VALID_FRACTION * total:
            break
        valid.add(i)
        held += len(documents[i][1])
    return valid


def main() -> None:
    for source, documents in [("kjv-bible", kjv_chapters()), ("devils-dictionary", devils_dictionary()),
                              ("jargon-file", jargon_file())]:
        valid = held_out(source, documents)
        train_docs = [d for i, d in enumerate(documents) if i not in valid]
        valid_docs = [d for i, d in enumerate(documents) if i in valid]
        train_bytes, valid_bytes = write("train", source, train_docs), write("valid", source, valid_docs)
        print(f"{source}: train {len(train_docs)} docs {train_bytes} bytes; valid {len(valid_docs)} docs "
              f"{valid_bytes} bytes: {', '.join(t for t, _ in valid_docs)}")


if __name__ == "__main__":
    main()
