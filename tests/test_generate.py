"""Generation: sampling controls, batching without padding leaks, stop strings, strict UTF-8, chat, CLI."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._pytree import tree_flatten

from mambabyte.architectures import build_model
from mambabyte.checkpoint import save_pretrained
from mambabyte.cli import main
from mambabyte.config import preset
from mambabyte.errors import UserError
from mambabyte.generate import (Conversation, Decoder, Sampling, StopFilter, exponential_noise, generate,
                                byte_offsets, generate_batch, generate_text, stream)
from mambabyte.utf8 import READY, TRANSITIONS, advance


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(preset("tiny")).eval()


@pytest.fixture(scope="module")
def checkpoint(model, tmp_path_factory):
    return str(save_pretrained(model, tmp_path_factory.mktemp("ckpt") / "tiny", metadata={"separator": "\x01"}))


def test_greedy_equals_argmax_of_forward_on_the_growing_sequence(model):
    prompt = b"The cat"
    out = generate(model, prompt, 24, temperature=0)
    assert len(out) == 24
    sequence = b"\x00" + prompt
    with torch.no_grad():
        for byte in out:
            logits = model(torch.tensor([list(sequence)]))[0, -1]
            assert byte == int(logits.argmax())
            sequence += bytes([byte])


def test_same_seed_same_output_other_seed_other_output(model):
    first = generate(model, "abc", 48, seed=7, temperature=1.0)
    assert generate(model, "abc", 48, seed=7, temperature=1.0) == first
    assert generate(model, "abc", 48, seed=8, temperature=1.0) != first


def test_batched_prompts_of_different_lengths_match_each_prompt_alone(model):
    prompts = [b"", b"xyz", b"a much longer prompt than the others, " * 3, b"xyz"]
    options = dict(seed=11, temperature=0.9, top_k=100)
    batched = generate_batch(model, prompts, 40, **options)
    for row, prompt in enumerate(prompts):
        assert batched[row] == generate(model, prompt, 40, **dict(options, seed=11 + row)), row
    # and the state each row starts from is the state of its prompt read alone (no padding inside)
    together = Decoder(model, Sampling(), [0] * len(prompts))
    together.start(prompts)
    for row, prompt in enumerate(prompts):
        alone = Decoder(model, Sampling(), [0])
        alone.start([prompt])
        for a, b in zip(tree_flatten(together.state)[0], tree_flatten(alone.state)[0]):
            torch.testing.assert_close(a[row:row + 1], b, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(together.logits[row:row + 1], alone.logits, atol=1e-5, rtol=1e-5)


def test_state_size_does_not_grow_with_generated_bytes(model):
    decoder = Decoder(model, Sampling(), [0, 1])
    decoder.start([b"short", b"a longer prompt"])
    before = [(t.shape, t.dtype) for t in tree_flatten(decoder.state)[0]]
    for count, _ in enumerate(decoder.decode(100), 1):
        pass
    assert count == 100
    assert [(t.shape, t.dtype) for t in tree_flatten(decoder.state)[0]] == before


def test_strict_utf8_output_always_decodes(model):
    invalid_without = 0
    for seed in range(30):
        out = generate(model, "é", 1 + seed % 23, seed=seed, utf8="strict")
        out.decode("utf-8")  # raises if invalid
        invalid_without += not _valid(generate(model, "é", 1 + seed % 23, seed=seed))
    assert invalid_without > 0  # the random model does emit invalid UTF-8 when unconstrained


def _valid(data: bytes) -> bool:
    try:
        data.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.binary(max_size=12), st.text(max_size=6).map(lambda s: s.encode("utf-8", "surrogatepass"))))
def test_utf8_automaton_accepts_exactly_valid_utf8(data):
    state, accepted = READY, True
    for byte in data:
        state = TRANSITIONS[state][byte]
        if state < 0:
            accepted = False
            break
    assert (accepted and state == READY) == _valid(data)
    if _valid(data):
        assert advance(READY, data) == READY


def test_exponential_race_samples_the_distribution():
    probs = torch.softmax(torch.randn(256, generator=torch.Generator().manual_seed(0)) * 2, -1)
    rows = 20000
    noise = exponential_noise(torch.arange(rows) * 2**40, torch.tensor(3), byte_offsets())
    chosen = (probs / noise).argmax(-1)
    frequency = torch.bincount(chosen, minlength=256).float() / rows
    assert (frequency - probs).abs().max() < 0.02


def test_filters():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05] + [0.0] * 252)
    logits = probs.clamp(min=1e-30).log()[None]
    kept = lambda **kw: (Sampling(**kw).probs(logits)[0] > 0).nonzero().flatten().tolist()  # noqa: E731
    assert kept(top_k=2) == [0, 1]
    assert kept(top_p=0.75) == [0, 1]
    assert kept(top_p=0.85) == [0, 1, 2]
    assert kept(min_p=0.25) == [0, 1, 2]
    assert kept(top_k=3, top_p=0.6) == [0, 1]
    torch.testing.assert_close(Sampling(top_k=2).probs(logits)[0, :2], torch.tensor([0.625, 0.375]))
    seen = torch.tensor([[True, False, True, False]])
    penalized = Sampling(repetition_penalty=2.0).penalize(torch.tensor([[2.0, 2.0, -1.0, -1.0]]), seen)
    assert penalized.tolist() == [[1.0, 2.0, -2.0, -1.0]]


@pytest.mark.parametrize("options", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1),
                                     dict(min_p=2), dict(repetition_penalty=0), dict(utf8="loose")])
def test_invalid_options_are_user_errors(options):
    with pytest.raises(UserError):
        Sampling(**options)


def test_stop_filter_cuts_at_the_first_stop_and_holds_back_prefixes():
    stops = [b"END", b"\n\n"]
    data = b"one\ntwo EN three\n\nfour END"
    whole = StopFilter(stops)
    assert whole.push(data) == b"one\ntwo EN three" and whole.stopped
    byte_by_byte = StopFilter(stops)
    out = b"".join(byte_by_byte.push(bytes([b])) for b in data)
    assert out == b"one\ntwo EN three" and byte_by_byte.stopped
    unfinished = StopFilter(stops)
    assert unfinished.push(b"abcE") == b"abc" and unfinished.flush() == b"E"


def test_generation_stops_before_the_stop_string(model):
    free = generate(model, "x", 200, seed=5)
    stop = free[60:62]
    expected = free[:free.index(stop)]
    assert generate(model, "x", 200, seed=5, stop=[stop]) == expected
    assert b"".join(stream(model, "x", 200, seed=5, stop=[stop])) == expected


def test_stream_yields_what_generate_returns(model):
    chunks = list(stream(model, "hello", 50, seed=2, top_p=0.9))
    assert len(chunks) > 1 and b"".join(chunks) == generate(model, "hello", 50, seed=2, top_p=0.9)
    assert generate_text(model, "hello", 50, seed=2, top_p=0.9) == b"".join(chunks).decode("utf-8", "replace")


def test_conversation_reads_only_new_bytes_and_matches_a_fresh_start(model):
    conversation = Conversation(model, temperature=0)
    assert conversation.bytes_read == 1  # the separator
    first = b"".join(conversation.reply(b"hello there\n", 30, stop=[b"e"]))
    read_after_first = conversation.bytes_read
    assert read_after_first == 1 + len(b"hello there\n")
    second = b"".join(conversation.reply(b"and again\n", 30, stop=[b"e"]))
    assert conversation.bytes_read == read_after_first + len(b"and again\n")
    # the state kept the first reply and its stop string: the same as reading the whole transcript
    stopped = len(first) < 30
    transcript = b"hello there\n" + first + (b"e" if stopped else b"") + b"and again\n"
    assert second == generate(model, transcript, 30, temperature=0, stop=[b"e"])


def test_cli_generate_streams_what_the_library_generates(model, checkpoint, capsysbinary):
    assert main(["generate", checkpoint, "--prompt", "hi", "--max-bytes", "30", "--seed", "3", "--raw",
                 "--top-k", "40"]) == 0
    expected = generate(model, "hi", 30, seed=3, top_k=40, separator=b"\x01")
    assert capsysbinary.readouterr().out == expected
    assert main(["generate", checkpoint, "--prompt", "hi", "--max-bytes", "30", "--seed", "3", "--top-k", "40"]) == 0
    assert capsysbinary.readouterr().out == expected.decode("utf-8", "replace").encode("utf-8") + b"\n"


def test_cli_samples_prompt_from_stdin(model, checkpoint, capsysbinary, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"from stdin")))
    assert main(["generate", checkpoint, "--max-bytes", "12", "--num-samples", "3", "--raw", "--seed", "4"]) == 0
    samples = generate_batch(model, [b"from stdin"] * 3, 12, seed=4, separator=b"\x01")
    assert capsysbinary.readouterr().out == b"".join(sample + b"\x01" for sample in samples)


def test_cli_chat_answers_each_line(checkpoint, capsysbinary, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"hello\nmore\n")))
    assert main(["chat", checkpoint, "--max-bytes", "10", "--raw", "--temperature", "0"]) == 0
    assert capsysbinary.readouterr().out.count(b"\n") == 2


@pytest.mark.parametrize("argv", [["--top-p", "1.5"], ["--temperature", "-1"], ["--num-samples", "0"],
                                  ["--max-bytes", "-3"], ["--stop", ""]])
def test_cli_bad_options_exit_2_with_one_line(checkpoint, capsys, argv):
    assert main(["generate", checkpoint, "--prompt", "x", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "error" in err


def test_cli_missing_checkpoint_exits_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothing"), "--prompt", "x"]) == 2
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_graph_decoding_equals_eager(model):
    cuda = build_model(preset("tiny")).cuda().eval()
    cuda.load_state_dict(model.state_dict())
    options = dict(seed=1, top_k=50, repetition_penalty=1.2, utf8="strict", dtype=torch.float32)
    graphed = generate_batch(cuda, ["a", "bcd"], 64, **options)
    eager = generate_batch(cuda, ["a", "bcd"], 64, cuda_graph=False, **options)
    assert graphed == eager


@pytest.mark.parametrize("backend, calls", [("chunked", 4), ("cpu", 1)])
def test_prompt_chunks_follow_the_scan_backends_memory(model, monkeypatch, backend, calls):
    """The PyTorch scan keeps (length, d_inner, d_state) intermediates, the compiled kernels do not: a prompt
    is read in memory-bounded chunks only where the backend needs them, with the same result either way."""
    from mambabyte import generate as generation
    from mambabyte.ops.dispatch import SCAN_BACKENDS

    if backend not in SCAN_BACKENDS:
        pytest.skip(f"no {backend} backend here")
    monkeypatch.setenv("MAMBABYTE_SCAN", backend)
    c = model.config
    monkeypatch.setattr(generation, "PREFILL_MEMORY", 64 * c.d_inner * c.d_state * 16)  # 64 positions per chunk
    seen = []

    def counting_forward(ids, **kwargs):
        seen.append(ids.shape[1])
        return type(model).forward(model, ids, **kwargs)

    monkeypatch.setattr(model, "forward", counting_forward)
    prompt = bytes(range(200))
    decoder = Decoder(model, Sampling(temperature=0), [0])
    decoder.start([prompt])
    assert len(seen) == calls and sum(seen) == len(prompt) + 1
    expected = model(torch.tensor([list(b"\x00" + prompt)]))[0, -1]
    torch.testing.assert_close(decoder.logits[0], expected, atol=1e-4, rtol=1e-4)


def test_prompt_buckets_are_powers_of_two_from_the_smallest():
    from mambabyte.cuda_graphs import MIN_BUCKET, bucket

    assert [bucket(n) for n in (1, MIN_BUCKET, MIN_BUCKET + 1, 1000, 1024, 1025)] == [
        MIN_BUCKET, MIN_BUCKET, 2 * MIN_BUCKET, 1024, 1024, 2048]


def test_left_padded_context_reads_as_the_context(tiny_model):
    """What GRAPH_PROMPTS reads: the context left-padded to its bucket with a reset at its first byte gives the
    context's own next-byte logits and state (the padding never reaches the state)."""
    from mambabyte.cuda_graphs import bucket, left_padded

    ids = torch.randint(0, 256, (2, 70), generator=torch.Generator().manual_seed(0))
    padded, reset = left_padded(ids)
    assert padded.shape == reset.shape == (2, bucket(70)) and torch.equal(padded[:, -70:], ids)
    assert reset.sum().item() == 2 and reset[:, bucket(70) - 70].all()
    full = ids[:, :bucket(40)]
    assert left_padded(full)[0] is full and left_padded(full)[1] is None  # fills its bucket: nothing to reset
    with torch.no_grad():
        want, want_state = tiny_model(ids, return_state=True)
        got, got_state = tiny_model(padded, return_state=True, reset=reset)
    torch.testing.assert_close(got[:, -1], want[:, -1], atol=1e-4, rtol=1e-4)
    for a, b in zip(got_state, want_state):
        torch.testing.assert_close(a.ssm, b.ssm, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(a.conv, b.conv, atol=1e-4, rtol=1e-4)
