import pytest
import torch

from mambabyte.config import MambaByteConfig, preset
from mambabyte.model import MambaByteLM
from mambabyte.speculative import SpeculativeDecoder
from mambabyte.subword import SubwordTokenizer

TEXT = [("the cat sat on the mat. the dog sat on the log. " * 20 + f"doc {i} ünïcödé").encode() for i in range(20)]


@pytest.fixture(scope="module")
def tokenizer():
    return SubwordTokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def models(tokenizer):
    torch.manual_seed(0)
    byte_model = MambaByteLM(preset("tiny")).eval()
    drafter = MambaByteLM(MambaByteConfig(d_model=16, n_layer=1, d_state=4, vocab_size=tokenizer.vocab_size)).eval()
    return byte_model, drafter


def plain_greedy(model, context: bytes, n: int) -> bytes:
    logits, state = model(torch.tensor([list(context)]), state=model.init_state(1), return_state=True)
    last, out = logits[0, -1], []
    for _ in range(n):
        byte = int(last.argmax())
        out.append(byte)
        logits, state = model.step(torch.tensor([byte]), state)
        last = logits[0]
    return bytes(out)


@pytest.mark.parametrize("draft_len", [1, 3, 6])
@pytest.mark.parametrize("prompt", [b"", b"the cat", b"\xff\xfe broken utf8", "東京".encode()])
def test_greedy_equals_plain_greedy(models, tokenizer, draft_len, prompt):
    byte_model, drafter = models
    context = b"\x00" + prompt
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len=draft_len)
    with torch.no_grad():
        expected = plain_greedy(byte_model, context, 40)
    assert decoder.generate(context, 40) == expected
    assert decoder.stats.generated_bytes == 40
    assert decoder.stats.byte_model_calls >= 2


def test_accepts_everything_when_drafter_agrees(tokenizer):
    """A byte model that always predicts the drafted text accepts whole drafts: more than one byte per call."""
    torch.manual_seed(1)
    byte_model = MambaByteLM(preset("tiny")).eval()
    drafter = MambaByteLM(MambaByteConfig(d_model=16, n_layer=1, d_state=4, vocab_size=tokenizer.vocab_size)).eval()
    with torch.no_grad():
        target = plain_greedy(byte_model, b"\x00", 60)
        single = {tokenizer.token_bytes[i][0]: i for i in range(tokenizer.vocab_size) if len(tokenizer.token_bytes[i]) == 1}

    class Oracle(torch.nn.Module):
        """Drafts the byte model's greedy continuation, one single-byte token at a time."""

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(1))

        def init_state(self, batch):
            return 0  # the state: how many bytes were read

        def forward(self, ids, state=None, return_state=False):
            seen = state + len(tokenizer.decode(ids[0].tolist()))
            return self._logits(seen, ids.shape[1]), seen

        def step(self, ids, state):
            seen = state + len(tokenizer.decode(ids.tolist()))
            return self._logits(seen, 1)[:, -1], seen

        def _logits(self, seen, length):
            logits = torch.zeros(1, length, tokenizer.vocab_size)
            generated = seen - 1  # bytes after the 1-byte context
            if generated < len(target):
                logits[0, -1, single[target[generated]]] = 1.0
            return logits

    decoder = SpeculativeDecoder(byte_model, Oracle(), tokenizer, draft_len=5)
    assert decoder.generate(b"\x00", 60) == target
    assert decoder.stats.acceptance_rate == 1.0
    # draft_len 5 tokens of one byte, the first of them the pending byte: 4 new + 1 bonus per 2 calls
    assert decoder.stats.bytes_per_call > 2.3


def test_sampling_follows_the_byte_model_distribution(tokenizer, models):
    """Speculative sampling of the first byte matches the byte model's own distribution (chi-square)."""
    byte_model, drafter = models
    temperature = 0.5
    probs = lambda logits: torch.softmax(logits / temperature, dim=-1)  # noqa: E731
    context = b"\x00the "
    with torch.no_grad():
        p = probs(byte_model(torch.tensor([list(context)]))[0, -1])
    counts = torch.zeros(256)
    gen = torch.Generator().manual_seed(0)
    n = 1500
    for _ in range(n):
        decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len=2, probs=probs, generator=gen)
        counts[decoder.generate(context, 1)[0]] += 1
    keep = p * n >= 5
    expected = torch.cat([p[keep] * n, (p[~keep].sum() * n)[None]])
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    chi2 = float(((observed - expected) ** 2 / expected.clamp(min=1e-9)).sum())
    dof = int(keep.sum())
    assert chi2 < dof + 5 * (2 * dof) ** 0.5  # far beyond this would mean a biased sampler


def test_cli_draft_equals_plain_greedy(models, tokenizer, tmp_path):
    import subprocess
    import sys

    from mambabyte.checkpoint import save_pretrained

    byte_model, drafter = models
    save_pretrained(byte_model, tmp_path / "byte")
    save_pretrained(drafter, tmp_path / "draft")
    tokenizer.save(tmp_path / "draft")
    base = [sys.executable, "-m", "mambabyte.cli", "generate", str(tmp_path / "byte"), "--prompt", "the cat",
            "--temperature", "0", "--max-bytes", "30", "--raw"]
    plain = subprocess.run(base, capture_output=True, check=True).stdout
    drafted = subprocess.run(base + ["--draft", str(tmp_path / "draft"), "--draft-len", "3", "--draft-report"],
                             capture_output=True)
    assert drafted.returncode == 0, drafted.stderr
    assert drafted.stdout == plain and len(plain) == 30
    assert b"acceptance" in drafted.stderr
    no_tokenizer = subprocess.run(base + ["--draft", str(tmp_path / "byte")], capture_output=True, text=True)
    assert no_tokenizer.returncode == 2 and "Traceback" not in no_tokenizer.stderr


def test_trainer_trains_a_subword_drafter(tokenizer, tmp_path):
    """`train --tokenizer`: windows of tokens, held-out bits per byte, and a checkpoint load_drafter accepts."""
    from mambabyte.speculative import load_drafter
    from mambabyte.train import TrainConfig, train

    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(TEXT):
        (tmp_path / "docs" / f"{i}.txt").write_bytes(doc)
    tokenizer.save(tmp_path / "tok")
    result = train(TrainConfig(data=str(tmp_path / "docs"), out=str(tmp_path / "run"), preset="tiny",
                               tokenizer=str(tmp_path / "tok"), max_steps=30, seq_len=32, batch_size=4,
                               valid_fraction=0.2, eval_every=0, eval_bytes=2048, progress=False))
    drafter, loaded = load_drafter(result.checkpoint)
    assert drafter.config.vocab_size == tokenizer.vocab_size
    assert loaded.token_bytes == tokenizer.token_bytes
    assert 0 < result.valid_bits_per_byte < 8  # per byte, and it learned the repetitive text


def test_token_healing_drafts_continue_the_pending_token(tokenizer, models):
    """The drafter never starts inside a token: its first token must begin with the bytes it has not read."""
    _, drafter = models
    decoder = SpeculativeDecoder(models[0], drafter, tokenizer, draft_len=3)
    with torch.no_grad():
        logits, state, pending = decoder._drafter_read(b"\x00the ca", drafter.init_state(1), None)
        tokens, _, _, piece = decoder._draft(state, logits, pending)
    assert pending and b"\x00the ca".endswith(pending)
    assert tokenizer.token_bytes[tokens[0]].startswith(pending)
    assert tokenizer.decode(tokens) == pending + piece
