"""On a CUDA machine: the GPU kernels at short lengths with carried state, as decoding and speculative
verification use them (skipped elsewhere; CI has no GPU)."""

import pytest
import torch
from torch.utils._pytree import tree_map

from mambabyte.architectures import build_model
from mambabyte.config import MambaByteConfig
from mambabyte.ops.causal_conv import causal_conv1d
from mambabyte.ops.dispatch import selective_step_torch
from mambabyte.ops.selective_scan import selective_scan_ref

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


def _inputs(batch, length, d_inner, d_state, device):
    g = torch.Generator(device="cpu").manual_seed(length)
    r = lambda *s: torch.randn(*s, generator=g).to(device)  # noqa: E731
    return (r(batch, length, d_inner), r(batch, length, d_inner) - 2, -torch.rand(d_inner, d_state, generator=g).to(device) * 4,
            r(batch, length, d_state), r(batch, length, d_state), r(d_inner), r(d_inner), r(batch, length, d_inner),
            r(batch, d_inner, d_state))


@cuda
@pytest.mark.parametrize("length", [1, 2, 3, 4, 5, 16, 17, 63, 64, 65, 130])
def test_triton_scan_with_initial_state_at_short_lengths(length):
    from mambabyte.ops.triton_scan import selective_scan_triton

    x, dt, A, B, C, D, bias, z, h0 = _inputs(2, length, 1536, 16, "cuda")
    y, final = selective_scan_triton(x, dt, A, B, C, D, bias, z=z, initial_state=h0)
    y_ref, final_ref = selective_scan_ref(x, dt, A, B, C, D, bias, z=z, initial_state=h0)
    assert (y - y_ref).abs().max() < 1e-3 * (1 + y_ref.abs().max())
    assert (final - final_ref).abs().max() < 1e-3 * (1 + final_ref.abs().max())


@cuda
@pytest.mark.parametrize("length", [1, 2, 3, 4, 9])
def test_triton_conv_with_state_at_short_lengths(length):
    from mambabyte.ops.triton_conv import causal_conv1d_triton

    g = torch.Generator().manual_seed(length)
    x = torch.randn(2, length, 64, generator=g)
    weight, bias, state = torch.randn(64, 1, 4, generator=g), torch.randn(64, generator=g), torch.randn(2, 64, 3, generator=g)
    out_ref, next_ref = causal_conv1d(x, weight, bias, state)  # CPU: the PyTorch path
    out, next_state = causal_conv1d_triton(x.cuda(), weight.cuda(), bias.cuda(), state.cuda())
    assert (out.cpu() - out_ref).abs().max() < 1e-4
    assert (next_state.cpu() - next_ref).abs().max() < 1e-6


@cuda
def test_triton_step_equals_torch_step():
    from mambabyte.ops.triton_step import selective_step_triton

    x, dt, A, B, C, D, bias, z, h0 = _inputs(3, 1, 1536, 16, "cuda")
    args = (x[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, bias, z[:, 0], h0)
    y, h = selective_step_triton(*args)
    y_ref, h_ref = selective_step_torch(*args)
    assert (y - y_ref).abs().max() < 1e-4 * (1 + y_ref.abs().max())
    assert (h - h_ref).abs().max() < 1e-4 * (1 + h_ref.abs().max())


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_split_forward_and_step_on_cuda(dtype):
    torch.manual_seed(0)
    model = build_model(MambaByteConfig(d_model=256, n_layer=4)).cuda().eval().to(dtype)
    ids = torch.randint(0, 256, (1, 40), device="cuda")
    tolerance = 1e-3 if dtype == torch.float32 else 0.15
    with torch.no_grad():
        whole = model(ids)
        state, parts, start = model.init_state(1), [], 0
        for n in (5, 1, 2, 1, 3, 28):
            logits, state = model(ids[:, start:start + n], state=state, return_state=True)
            parts.append(logits)
            start += n
        assert (torch.cat(parts, 1) - whole).abs().max() < tolerance
        logits, state = model(ids[:, :10], state=model.init_state(1), return_state=True)
        for t in range(10, 20):
            out, state = model.step(ids[:, t], state)
            assert (out - whole[:, t]).abs().max() < tolerance, t


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_forward_states_on_cuda_matches_cpu_and_equals_stepping(dtype):
    """The fused block kernels (ops.triton_decode) behind step/forward_states: close to the PyTorch path on the
    CPU, and a span gives bit for bit what stepping through it gives (speculative greedy == plain greedy)."""
    torch.manual_seed(0)
    model = build_model(MambaByteConfig(d_model=256, n_layer=3)).eval().to(dtype)
    ids = torch.randint(0, 256, (2, 30))
    with torch.no_grad():
        _, state = model(ids[:, :20], return_state=True)
        logits_cpu, states_cpu = model.forward_states(ids[:, 20:], state)
        model.cuda()
        state = [type(s)(s.conv.cuda(), s.ssm.cuda()) for s in state]
        logits, states = model.forward_states(ids[:, 20:].cuda(), state)
        tolerance = 1e-3 if dtype == torch.float32 else 0.15
        assert (logits.cpu() - logits_cpu).abs().max() < tolerance
        for got, want in zip(states, states_cpu):
            assert (got.ssm.cpu() - want.ssm).abs().max() < tolerance * (1 + want.ssm.abs().max())
        for t in range(10):
            step_logits, state = model.step(ids[:, 20 + t].cuda(), state)
            assert torch.equal(step_logits, logits[:, t]), t
            for got, want in zip(state, model.state_at(states, t)):
                assert torch.equal(got.conv, want.conv) and torch.equal(got.ssm, want.ssm), t


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_kernels_at_bench_size_fit_and_spans_equal_steps(dtype):
    """At bench-91m (the real tiles and shared memory: fp32 weights take twice the bf16 tiles' bytes), a span
    of 20 bytes at batch 2 (40 rows: the MANY_ROWS tiles) gives bit for bit what single steps give."""
    from mambabyte.architectures import presets_for

    torch.manual_seed(0)
    model = build_model(presets_for("mambabyte")["bench-91m"]).eval().cuda().to(dtype)
    ids = torch.randint(0, 256, (2, 28), device="cuda")
    with torch.no_grad():
        _, state = model(ids[:, :8], return_state=True)
        logits, states = model.forward_states(ids[:, 8:], state)
        for t in range(20):
            step_logits, state = model.step(ids[:, 8 + t], state)
            assert torch.equal(step_logits, logits[:, t]), t
        assert all(torch.equal(got.ssm, want.ssm) for got, want in zip(state, model.state_at(states, 19)))


@cuda
def test_decode_kernels_with_programmatic_dependent_launch_give_the_same_bits(monkeypatch):
    """CONFIG["pdl"] (each kernel launched while the previous runs, waiting before it reads an activation): the
    same logits and states, bit for bit, eagerly and replayed from a CUDA graph of in-place steps."""
    from mambabyte.ops import triton_decode

    if not triton_decode._pdl_supported(torch.device("cuda")):
        pytest.skip("this GPU or Triton has no programmatic dependent launch")
    torch.manual_seed(0)
    model = build_model(MambaByteConfig(d_model=256, n_layer=3)).eval().cuda().to(torch.bfloat16)
    ids = torch.randint(0, 256, (2, 24), device="cuda")

    def decode():
        with torch.no_grad():
            _, state = model(ids[:, :8], return_state=True)
            logits, states = model.forward_states(ids[:, 8:16], state)
            step_state = tree_map(torch.clone, model.state_at(states, 7))  # contiguous: the in-place kernels
            graph_ids = ids[:, 16].clone()
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm-up (compiles) before the capture: one step more in both runs
                model.step_(graph_ids, step_state)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                step_logits = model.step_(graph_ids, step_state)
            outputs = [logits]
            for t in range(16, 24):
                graph_ids.copy_(ids[:, t])
                graph.replay()
                outputs.append(step_logits.clone())
            torch.cuda.synchronize()
            return outputs, [s.ssm.clone() for s in step_state]

    monkeypatch.setitem(triton_decode.CONFIG, "pdl", False)
    expected = decode()
    monkeypatch.setitem(triton_decode.CONFIG, "pdl", True)
    got = decode()
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        assert torch.equal(a, b)


@cuda
@pytest.mark.parametrize("segments", [2, 3, 5])
def test_segmented_triton_scan_on_cuda_matches_reference(segments):
    """The sequence split into segments run in parallel (prefill, long training windows), with gradients."""
    from mambabyte.ops.triton_scan import selective_scan_triton

    inputs = [t.requires_grad_() for t in _inputs(2, 300, 256, 16, "cuda")]
    x, dt, A, B, C, D, bias, z, h0 = inputs
    reset = torch.rand(2, 300, generator=torch.Generator().manual_seed(0)) < 0.02
    results = []
    for scan, kwargs in ((selective_scan_triton, dict(segments=segments)), (selective_scan_ref, {})):
        y, final = scan(x, dt, A, B, C, D, bias, z=z, initial_state=h0, reset=reset.cuda(), **kwargs)
        grads = torch.autograd.grad((y * y.detach().sin()).sum() + final.square().sum(), inputs)
        results.append((y, final, *grads))
    for got, want in zip(*results):
        assert (got - want).abs().max() < 2e-3 * (1 + want.abs().max())


def _varied_byte_model(config: MambaByteConfig):
    """A random MambaByte whose greedy output varies (a fresh one repeats its last byte): its mixers outweigh
    the embedding in the residual stream."""
    model = build_model(config).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.mixer.out_proj.weight.mul_(10)
    return model


def _near_copy_drafter(byte_model, tokenizer, noise: float):
    """A subword drafter that mostly agrees with ``byte_model``: its weights, with each token's embedding that of
    its byte (0 for merged tokens) plus noise."""
    weights = byte_model.state_dict()
    embedding = weights["embedding.weight"]
    rows = torch.stack([embedding[t[0]] if len(t) == 1 else torch.zeros_like(embedding[0])
                        for t in tokenizer.token_bytes])
    jitter = noise * torch.randn(rows.shape, generator=torch.Generator().manual_seed(1))
    weights["embedding.weight"] = rows + jitter.to(rows)
    drafter = build_model(MambaByteConfig(d_model=byte_model.config.d_model, n_layer=byte_model.config.n_layer,
                                          vocab_size=tokenizer.vocab_size)).eval()
    drafter.load_state_dict(weights)
    return drafter


@cuda
def test_speculative_cuda_graphs_equal_plain_and_eager_decoding(monkeypatch):
    """Speculative decoding replaying CUDA graphs: greedy output == plain greedy decoding (the Decoder's graph)
    == the eager speculative path; sampled output == the eager path's with the same seed. Drafters: a random one
    (drafts rejected, spans of many lengths) and a noisy copy of the byte model (long kept prefixes, rollbacks
    inside drafts, a merged token to heal). Spans longer than 6 bytes are read eagerly here, between graphs."""
    import warnings

    from mambabyte import speculative_models
    from mambabyte.generate import generate
    from mambabyte.speculative import SpeculativeDecoder, speculative_stream
    from mambabyte.speculative_models import GraphByteVerifier, GraphDraftDecoder
    from mambabyte.subword import SubwordTokenizer

    text = [(f"the cat sat on the mat {i}. the dog sat on the log. " * 8).encode() for i in range(10)]
    torch.manual_seed(0)
    byte_model = _varied_byte_model(MambaByteConfig(d_model=256, n_layer=4)).cuda()
    subword = SubwordTokenizer.train(text, vocab_size=300)
    random_drafter = build_model(MambaByteConfig(d_model=256, n_layer=2, vocab_size=subword.vocab_size)).eval().cuda()
    one_merge = SubwordTokenizer.train(text, vocab_size=257)  # bytes and one merged token
    near_drafter = _near_copy_drafter(byte_model, one_merge, noise=0.003).cuda()
    prompts = [b"", b"the cat", "東京 the".encode()]
    monkeypatch.setattr(speculative_models, "MAX_GRAPH_SPAN", 6)
    plain = [generate(byte_model, prompt, 80, temperature=0, dtype=torch.float32) for prompt in prompts]
    graph_spans = set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for drafter, tokenizer, draft_len in ((random_drafter, subword, 1), (random_drafter, subword, 4),
                                              (near_drafter, one_merge, 3), (near_drafter, one_merge, 6)):
            decoder = SpeculativeDecoder(byte_model, drafter, tokenizer, draft_len, dtype=torch.float32)  # reused
            assert isinstance(decoder.verifier, GraphByteVerifier)
            assert isinstance(decoder.draft_decoder, GraphDraftDecoder)
            for prompt, expected in zip(prompts, plain):
                assert decoder.generate(b"\x00" + prompt, 80) == expected, (draft_len, prompt)
                eager = speculative_stream(byte_model, drafter, tokenizer, prompt, 80, draft_len=draft_len,
                                           temperature=0, cuda_graph=False, dtype=torch.float32)
                assert b"".join(eager) == expected, (draft_len, prompt)
            assert None not in decoder.draft_decoder._graphs.values()
            graph_spans |= set(decoder.verifier._graphs)
            if drafter is near_drafter:
                assert 0.1 < decoder.stats.acceptance_rate < 0.9, decoder.stats
            sampled = [b"".join(speculative_stream(byte_model, drafter, tokenizer, b"the", 60, draft_len=draft_len,
                                                   seed=3, temperature=0.8, top_k=20, cuda_graph=graph,
                                                   dtype=torch.float32))
                       for graph in (True, False)]
            assert sampled[0] == sampled[1] and len(sampled[0]) == 60
    assert not [w for w in caught if "CUDA graph" in str(w.message)]
    assert graph_spans and max(graph_spans) <= 6


@cuda
@pytest.mark.parametrize("weights", [torch.bfloat16, torch.float32])
def test_speculative_greedy_equals_plain_greedy_in_bf16(weights):
    """bf16 autocast (the default on CUDA) with bf16 weights, as `mambabyte generate --draft` runs, and with fp32
    weights (the conv window then comes back bf16): a prompt read and a decoding step round differently, so
    speculative decoding must read the context as plain decoding does and keep its state in the same dtypes;
    then its greedy output equals plain greedy decoding's byte for byte (graphs and eager), over long outputs."""
    from mambabyte.generate import generate
    from mambabyte.speculative import speculative_stream
    from mambabyte.subword import SubwordTokenizer

    text = [(f"the cat sat on the mat {i}. the dog sat on the log. " * 8).encode() for i in range(10)]
    torch.manual_seed(0)
    byte_model = _varied_byte_model(MambaByteConfig(d_model=256, n_layer=4)).cuda()
    one_merge = SubwordTokenizer.train(text, vocab_size=257)
    drafter = _near_copy_drafter(byte_model, one_merge, noise=0.003).cuda().to(torch.bfloat16)
    byte_model = byte_model.to(weights)
    prompts = [b"the cat", bytes(range(40, 240))]  # the second: a long prompt read as a whole
    for prompt in prompts:
        plain = generate(byte_model, prompt, 300, temperature=0)
        for graph in (True, False):
            for draft_len in (2, 5):
                out = b"".join(speculative_stream(byte_model, drafter, one_merge, prompt, 300, draft_len=draft_len,
                                                  temperature=0, cuda_graph=graph))
                assert out == plain, (prompt[:8], graph, draft_len)


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prompt_graphs_read_as_the_padded_eager_read(monkeypatch, dtype):
    """GRAPH_PROMPTS: a context read from the graph of its bucket gives bit for bit what the eager read of the
    same left-padded bytes gives (graphs=False), close to the unpadded read; two contexts of one length share a
    graph, and the first result survives the second read; a context that fills its bucket has a graph without
    reset flags."""
    from mambabyte import cuda_graphs, generate

    torch.manual_seed(0)
    model = build_model(MambaByteConfig(d_model=256, n_layer=3)).eval().cuda().to(dtype)
    tolerance = 1e-3 if dtype == torch.float32 else 0.15
    for length in (1, 63, 64, 65, 300):
        ids, other = (torch.randint(0, 256, (2, length), device="cuda") for _ in range(2))
        monkeypatch.setattr(cuda_graphs, "GRAPH_PROMPTS", True)
        logits, state = generate.read_bytes(model, ids, dtype=dtype)
        generate.read_bytes(model, other, dtype=dtype)  # the same graph, other bytes
        want_logits, want_state = generate.read_bytes(model, ids, dtype=dtype, graphs=False)
        monkeypatch.setattr(cuda_graphs, "GRAPH_PROMPTS", False)
        plain_logits, _ = generate.read_bytes(model, ids, dtype=dtype)
        assert torch.equal(logits, want_logits), length
        for got, want in zip(state, want_state):
            assert torch.equal(got.conv, want.conv) and torch.equal(got.ssm, want.ssm), length
        assert (logits - plain_logits).abs().max() < tolerance, length
    graphs = generate._PROMPT_GRAPHS[model][1]._graphs
    assert set(graphs) == {(2, 64, True), (2, 64, False), (2, 128, True), (2, 512, True)}  # (batch, bucket, reset)
    assert all(graphs.values())  # captured, not eager
