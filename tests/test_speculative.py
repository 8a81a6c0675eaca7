import math

import pytest
import torch

from mambabyte.architectures import build_model, presets_for
from mambabyte.config import MambaByteConfig, preset
from mambabyte.errors import UserError
from mambabyte.generate import Sampling
from mambabyte.model import MambaByteLM
from mambabyte.speculative import SpeculativeDecoder, speculative_stream
from mambabyte.subword import SubwordTokenizer

TEXT = [("the cat sat on the mat. the dog sat on the log. " * 20 + f"doc {i} ünïcödé").encode() for i in range(20)]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: extra threads only add synchronisation (and this machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    with torch.no_grad():
        logits, state = model(torch.tensor([list(context)]), state=model.init_state(1), return_state=True)
        last, out = logits[0, -1], []
        for _ in range(n):
            byte = int(last.argmax())
            out.append(byte)
            logits, state = model.step(torch.tensor([byte]), state)
            last = logits[0]
    return bytes(out)


class ScriptedDrafter(torch.nn.Module):
    """Drafts ``script`` (the bytes after a 1-byte context) one single-byte token at a time, whatever was written."""

    def __init__(self, tokenizer, script: bytes):
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.single = {t[0]: i for i, t in enumerate(tokenizer.token_bytes) if len(t) == 1}
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def init_state(self, batch):
        return torch.zeros((), dtype=torch.long)  # the state: how many bytes were read

    def forward(self, ids, state=None, return_state=False):
        seen = state + len(self.tokenizer.decode(ids[0].tolist()))
        return self._logits(seen, ids.shape[1]), seen

    def step(self, ids, state):
        seen = state + len(self.tokenizer.decode(ids.tolist()))
        return self._logits(seen, 1)[:, -1], seen

    def _logits(self, seen, length):
        logits = torch.zeros(1, length, self.tokenizer.vocab_size)
        generated = int(seen) - 1
        if generated < len(self.script):
            logits[0, -1, self.single[self.script[generated]]] = 1.0
        return logits


def check_round_stats(stats, max_bytes):
    """Every round writes the bytes it kept plus one, with one byte-model call; the first round reads nothing
    when nothing was drafted (the prompt's last logits judge it)."""
    assert stats.generated_bytes == max_bytes
    assert stats.rounds - 1 <= stats.byte_model_calls <= stats.rounds
    assert stats.generated_bytes == stats.accepted_bytes + stats.rounds


@pytest.mark.parametrize("draft_len", [1, 2, 3, 6])
@pytest.mark.parametrize("prompt", [b"", b"the cat", b"the dog sat on the l", b"\xff\xfe bad utf8", "東京".encode()])
def test_greedy_equals_plain_greedy(models, tokenizer, draft_len, prompt):
    byte_model, drafter = models
    context = b"\x00" + prompt
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len=draft_len)
    assert decoder.generate(context, 40) == plain_greedy(byte_model, context, 40)
    check_round_stats(decoder.stats, 40)


@pytest.mark.parametrize("draft_len", [2, 3, 4, 6])
def test_greedy_rolls_back_to_every_accepted_position(models, tokenizer, draft_len):
    """A drafter right most of the time: rounds end at every position of the draft, output still exact."""
    byte_model, _ = models
    target = plain_greedy(byte_model, b"\x00", 80)
    script = bytes(b ^ 1 if i % 7 == 3 or i % 11 == 5 else b for i, b in enumerate(target))
    decoder = SpeculativeDecoder(byte_model, ScriptedDrafter(tokenizer, script), tokenizer, draft_len=draft_len)
    assert decoder.generate(b"\x00", 80) == target
    check_round_stats(decoder.stats, 80)
    assert 0.3 < decoder.stats.acceptance_rate < 1


@pytest.mark.parametrize("max_bytes", [0, 1, 2, 7])
def test_max_bytes_is_exact(models, tokenizer, max_bytes):
    byte_model, drafter = models
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len=3)
    assert decoder.generate(b"\x00the", max_bytes) == plain_greedy(byte_model, b"\x00the", max_bytes)
    assert decoder.stats.rounds - 1 <= decoder.stats.byte_model_calls <= decoder.stats.rounds
    if max_bytes == 1:  # no room for a draft: the prompt's logits give the byte, the byte model is not called
        assert decoder.stats.byte_model_calls == 0 and decoder.stats.rounds == 1


def test_accepts_everything_when_drafter_agrees(tokenizer):
    """A drafter that drafts the byte model's own greedy text: every round is one call that keeps the whole draft."""
    torch.manual_seed(1)
    byte_model = MambaByteLM(preset("tiny")).eval()
    target = plain_greedy(byte_model, b"\x00", 60)
    decoder = SpeculativeDecoder(byte_model, ScriptedDrafter(tokenizer, target), tokenizer, draft_len=5)
    assert decoder.generate(b"\x00", 60) == target
    assert decoder.stats.acceptance_rate == 1.0
    check_round_stats(decoder.stats, 60)
    # 5 one-byte tokens, the first of them the pending byte: 4 drafted bytes kept + 1 per call (the first round: 5 + 1)
    assert decoder.stats.bytes_per_call == 5


def chi_square(counts: torch.Tensor, p: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic of counts against probabilities p (cells expecting < 5 pooled) and its degrees of freedom."""
    n = float(counts.sum())
    keep = p * n >= 5
    expected = torch.cat([p[keep] * n, (p[~keep].sum() * n)[None]])
    observed = torch.cat([counts[keep], counts[~keep].sum()[None]])
    nonzero = expected > 0
    chi2 = float(((observed - expected)[nonzero] ** 2 / expected[nonzero]).sum())
    assert float(observed[~nonzero].sum()) == 0, "outcomes of probability 0 happened"
    return chi2, int(nonzero.sum()) - 1


def far_beyond(chi2: float, dof: int) -> bool:
    return chi2 > dof + 5 * math.sqrt(2 * dof)


def test_verification_rule_samples_the_byte_model_distribution(models, tokenizer):
    """The sequence written by one round (kept bytes + the next) has the byte model's joint distribution."""
    byte_model, drafter = models
    p = torch.zeros(4, 256)
    p[0, [97, 98, 99]] = torch.tensor([0.5, 0.3, 0.2])   # drafted 97
    p[1, [100, 101]] = torch.tensor([0.6, 0.4])          # drafted 100
    p[2, [104]] = 1.0                                    # drafted 104, all the mass: always kept
    p[3, [102, 103]] = torch.tensor([0.7, 0.3])          # the bonus byte
    outcomes = {b"b": 0.3, b"c": 0.2, b"ae": 0.5 * 0.4, b"adhf": 0.5 * 0.6 * 0.7, b"adhg": 0.5 * 0.6 * 0.3}
    decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, probs=torch.exp,
                                 generator=torch.Generator().manual_seed(0))
    counts = dict.fromkeys(outcomes, 0)
    for _ in range(3000):
        kept, byte = decoder._verify(p.log(), b"adh")
        written = b"adh"[:kept] + bytes([byte])
        assert written in counts, written
        counts[written] += 1
    observed = torch.tensor(list(counts.values()), dtype=torch.float)
    chi2, dof = chi_square(observed, torch.tensor(list(outcomes.values())))
    assert dof == 4 and not far_beyond(chi2, dof)
    never = torch.zeros(2, 256)
    never[:, 5] = 1.0
    assert decoder._verify(never.log(), b"a") == (0, 5)  # a drafted byte of probability 0 is never kept


def test_sampling_follows_the_byte_model_distribution(tokenizer, models):
    """End to end: the first byte written follows the byte model's distribution after top-k and temperature,
    with a drafter that proposes the likeliest byte (often kept) and one that proposes noise (rejected)."""
    byte_model, random_drafter = models
    rules = Sampling(temperature=0.5, top_k=6)
    context = b"\x00the "
    with torch.no_grad():
        p = rules.probs(byte_model(torch.tensor([list(context)]))[:, -1])[0]
    likeliest = ScriptedDrafter(tokenizer, b"????" + bytes([int(p.argmax())]) * 8)  # after "the ": the likeliest byte
    for drafter in (likeliest, random_drafter):
        decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len=2, probs=rules.probs,
                                     generator=torch.Generator().manual_seed(0))
        counts = torch.zeros(256)
        for _ in range(1000):
            counts[decoder.generate(context, 2)[0]] += 1
        chi2, dof = chi_square(counts, p)
        assert dof == 5 and not far_beyond(chi2, dof)
        if drafter is likeliest:
            assert 0.1 < decoder.stats.acceptance_rate < 0.9, decoder.stats  # both paths taken


@pytest.mark.parametrize("arch", ["transformer", "megabyte"])
def test_refuses_byte_models_without_per_position_states(tokenizer, models, arch):
    _, drafter = models
    byte_model = build_model(presets_for(arch)["tiny"]).eval()
    with pytest.raises(UserError, match=arch):
        b"".join(speculative_stream(byte_model, drafter, tokenizer, b"the", 8, temperature=0))


def test_stop_strings_end_the_output(models, tokenizer):
    byte_model, drafter = models
    expected = plain_greedy(byte_model, b"\x00the", 40)
    stop = expected[10:13]
    out = b"".join(speculative_stream(byte_model, drafter, tokenizer, b"the", 40, temperature=0, stop=[stop]))
    assert out == expected[: expected.index(stop)]


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
        pending = decoder._drafter_start(b"\x00the ca")
        tokens, piece = decoder._draft(pending)
    assert pending and b"\x00the ca".endswith(pending)
    assert tokenizer.token_bytes[tokens[0]].startswith(pending)
    assert tokenizer.decode(tokens) == pending + piece


@pytest.mark.parametrize("draft_len", [1, 3, 5])
@pytest.mark.parametrize("temperature", [0.0, 0.8])
@pytest.mark.parametrize("scripted", [False, True])
def test_fixed_buffer_path_equals_eager_path(models, tokenizer, draft_len, temperature, scripted):
    """The buffers CUDA graphs replay from (states, the drafter's per-token states, rollback copies), run here
    without a graph: the same bytes and statistics as the eager path, greedy and sampled. The scripted drafter is
    right most of the time, so both models roll back to inner positions of a draft."""
    from mambabyte.cuda_graphs import GraphCapture
    from mambabyte.speculative_models import GraphByteVerifier, GraphDraftDecoder

    byte_model, drafter = models
    contexts = [b"\x00the cat", b"\x00", b"\x00\xff the dog sat o"]
    if scripted:
        target = plain_greedy(byte_model, b"\x00", 50)
        script = bytes(b ^ 1 if i % 7 == 3 else b for i, b in enumerate(target))
        drafter, contexts = ScriptedDrafter(tokenizer, script), [b"\x00"]
    probs = None if temperature == 0 else Sampling(temperature=temperature).probs
    runs = []
    for buffered in (False, True):
        decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len, probs, torch.Generator().manual_seed(0))
        if buffered:
            capture = GraphCapture()
            capture.failed = True  # captures nothing: the graphs' bodies run eagerly on the buffers
            decoder.draft_decoder = GraphDraftDecoder(drafter, draft_len, tokenizer.vocab_size, capture)
            decoder.verifier = GraphByteVerifier(byte_model, capture)
        runs.append(([decoder.generate(context, 50) for context in contexts], decoder.stats))
    assert runs[0] == runs[1]
    if scripted and draft_len > 1 and temperature == 0:
        assert 0.2 < runs[1][1].acceptance_rate < 1
