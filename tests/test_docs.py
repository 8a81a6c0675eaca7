"""The Python examples in README.md and docs/ run as written (names they take as given are provided here)."""

import re
from pathlib import Path

import pytest
import torch

from mambabyte.checkpoint import save_pretrained
from mambabyte.config import MambaByteConfig, preset
from mambabyte.model import MambaByteLM
from mambabyte.subword import SubwordTokenizer

ROOT = Path(__file__).resolve().parents[1]
PAGES = ["README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
EXAMPLES = [(page, block) for page in PAGES
            for block in re.findall(r"```python\n(.*?)```", (ROOT / page).read_text(), flags=re.S)]
DOCS = [(f"document {i}: the quick brown fox jumps over the lazy dog. " * 60).encode() for i in range(6)]


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """A working directory with the files the examples name: my_texts/, runs/small, ckpt."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_texts").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "my_texts" / f"{i}.txt").write_bytes(doc)
    torch.manual_seed(0)
    save_pretrained(MambaByteLM(preset("tiny")), tmp_path / "runs" / "small")
    return tmp_path


def given_names() -> dict:
    torch.manual_seed(0)
    tokenizer = SubwordTokenizer.train(DOCS, vocab_size=300)
    return {
        "model": MambaByteLM(preset("tiny")).eval(),
        "byte_model": MambaByteLM(preset("tiny")).eval(),
        "subword_model": MambaByteLM(MambaByteConfig(d_model=16, n_layer=1, d_state=4, vocab_size=tokenizer.vocab_size)),
        "tokenizer": tokenizer,
        "documents": DOCS[:2],
    }


@pytest.mark.parametrize("page,code", EXAMPLES, ids=[f"{page}#{i}" for i, (page, _) in enumerate(EXAMPLES)])
def test_example_runs(workdir, page, code):
    exec(compile(code, page, "exec"), given_names())
